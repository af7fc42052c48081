"""Sample from a trained policy and score it with the run's reward.

    python -m rlhf.generate RUN_DIR "3+4=" "12+5="       # the prompts given
    python -m rlhf.generate RUN_DIR --num 8 --greedy     # 8 held-out prompts of the run's task
    python -m rlhf.generate RUN_DIR --checkpoint RUN_DIR/checkpoints/step-00000050

It loads the run's ``model/`` (written at the end of training) or, with ``--checkpoint``, the
checkpoint's ``actor.safetensors`` into the actor the run's config builds. Prompts go through the
chat template and generation code of training (``rlhf.models.generation.generate``); the reward, the task's
prompts and the actor are rebuilt from the run's ``.hydra/config.yaml`` (or the checkpoint's
``config.yaml``) with the functions training uses (``rlhf.app.build``, ``rlhf.data.prompts``, ``rlhf.rewards``).
Prints one tab-separated line per prompt: prompt, response, score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

MODEL_DIR = "model"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"  # a LoRA run's model/ holds its adapters only


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf.generate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run dir written by train.py")
    parser.add_argument("prompts", nargs="*", help="prompts to answer (default: --num held-out prompts of the task)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint dir (RUN_DIR/checkpoints/step-N), not model/")
    parser.add_argument("--num", type=int, default=8, help="held-out prompts to sample when no prompt is given")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, help="default: the run's rollout.temperature")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's rollout.max_new_tokens")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be at least 1, got {args.num}")
    empty = [i for i, prompt in enumerate(args.prompts) if not prompt.strip()]
    if empty:
        parser.error(f"prompt {empty[0]} is empty")
    if args.temperature is not None and args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature} (use --greedy for greedy decoding)")
    return args


def find_weights(run_dir: Path, checkpoint: Path | None) -> tuple[Path, Path]:
    """(the folder holding the weights, the config file of the run), or an error naming what was looked for."""
    if checkpoint is not None:
        if not (checkpoint / "actor.safetensors").is_file() or not (checkpoint / "config.yaml").is_file():
            raise SystemExit(f"error: {checkpoint} is not a checkpoint: it needs actor.safetensors and config.yaml")
        return checkpoint, checkpoint / "config.yaml"
    if not run_dir.is_dir():
        raise SystemExit(f"error: {run_dir} is not a directory")
    config = run_dir / HYDRA_CONFIG
    model = run_dir / MODEL_DIR
    if (model / "config.json").is_file() or (model / ADAPTER_CONFIG).is_file():
        if not config.is_file():
            raise SystemExit(f"error: {config} not found: the run's config is needed to rebuild its reward")
        return run_dir / MODEL_DIR, config
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*/actor.safetensors"))
    hint = f"; it has checkpoints: use --checkpoint {checkpoints[-1].parent}" if checkpoints else ""
    raise SystemExit(
        f"error: no trained model in {run_dir}: looked for {model}/config.json (or {ADAPTER_CONFIG} of LoRA "
        f"adapters), written at the end of a run with trainer.save_model=true{hint}"
    )


def load_config(path: Path) -> DictConfig:
    """The run's config over the schema's defaults (a config written by an older version may lack keys)."""
    from rlhf.config.schema import TrainConfig

    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))


def load_policy(cfg: DictConfig, weights: Path, is_checkpoint: bool):
    """(actor, tokenizer): ``model/`` as saved (LoRA adapters: on the run's initial actor), or the run's
    initial actor with the checkpoint's weights."""
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from rlhf.app.build import resolve_actor_paths
    from rlhf.models.loading import add_lora, load_actor, load_tokenizer
    from rlhf.runtime.checkpoint import retied

    hf_logging.disable_progress_bar()
    adapters = not is_checkpoint and (weights / ADAPTER_CONFIG).is_file()
    model_path, tokenizer_path = resolve_actor_paths(cfg) if is_checkpoint or adapters else (str(weights),) * 2
    if not cfg.model.path:
        # The built-in tiny actor's tokenizer, from its own folder: saved in model/ beside a Qwen2 config.json
        # it comes back from AutoTokenizer as a Qwen2Tokenizer with other ids (word-level reviews are garbled).
        tokenizer_path = resolve_actor_paths(cfg)[1]
    if adapters:
        tokenizer_path = str(weights)  # saved with the adapters, the pad token the run added included
    tokenizer = load_tokenizer(
        tokenizer_path, trust_remote_code=cfg.model.trust_remote_code, add_pad_token=cfg.model.add_pad_token
    )
    actor = load_actor(
        model_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, vocab_size=len(tokenizer)
    )
    actor.config.pad_token_id = actor.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapters:
        from peft import PeftModel

        actor = PeftModel.from_pretrained(actor, str(weights))
    if is_checkpoint:
        lora = cfg.model.lora
        if lora.enabled:
            actor = add_lora(
                actor, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
            )
        actor.load_state_dict(retied(actor, load_file(str(weights / "actor.safetensors"))))
    return actor.eval(), tokenizer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    weights, config_path = find_weights(args.run_dir, args.checkpoint)
    cfg = load_config(config_path)

    import torch  # seconds: after the arguments and files are checked

    from rlhf.app.proxy import run_proxy_path
    from rlhf.data.prompts import fit_prompt_lengths, load_prompts
    from rlhf.models.generation import generate
    from rlhf.rewards.normalize import checked_scores
    from rlhf.rewards.scorers import build_reward

    torch.manual_seed(cfg.seed)
    actor, tokenizer = load_policy(cfg, weights, args.checkpoint is not None)
    prompts = args.prompts
    if not prompts:  # the held-out prompts as training evaluated them (data.overlong applied)
        data = cfg.data
        held_out = load_prompts(data)[1]
        prompts = fit_prompt_lengths(
            tokenizer, held_out, max_length=data.max_prompt_length, policy=data.overlong, name="held-out"
        )
        prompts = prompts[: args.num]
    reward = build_reward(cfg.reward, torch.device("cpu"), path=run_proxy_path(cfg))
    temperature = args.temperature or cfg.rollout.temperature
    max_new_tokens = args.max_new_tokens or cfg.rollout.max_new_tokens
    samples = generate(
        actor,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        max_prompt_length=cfg.data.max_prompt_length,
        do_sample=not args.greedy,
    )
    # As in training, a response cut at max_new_tokens gets reward.missing_eos_penalty; a NaN/inf score
    # is printed as it is.
    scores = checked_scores(
        reward(samples.prompts, samples.responses).float(),
        samples,
        on_nonfinite="mask",
        missing_eos_penalty=cfg.reward.missing_eos_penalty,
        where="generate",
    )
    print("prompt\tresponse\tscore")
    for prompt, response, score in zip(samples.prompts, samples.responses, scores.tolist(), strict=True):
        print(f"{prompt!r}\t{response!r}\t{score:.3f}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a prompt too long for data.max_prompt_length, a model that fails to load
        raise SystemExit(f"error: {error}") from None
