"""The reward-model training loop: Bradley-Terry steps over preference pairs, held-out evaluation, the
best checkpoint and the optional centering of its scores (``rlhf.app.reward_model`` runs it).

Each pair is scored as two sequences, ``(prompt, chosen)`` and ``(prompt, rejected)``, in one forward
of 2B rows, encoded by ``rlhf.rewards.scorers.encode_for_reward`` (what ``ClassifierReward`` reads).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from rlhf.app.jobinfo import group_of, run_name_of
from rlhf.config.errors import InputError
from rlhf.config.redact import loggable_config
from rlhf.core.losses import bradley_terry_loss
from rlhf.data.pairs import Pair
from rlhf.models.loading import DTYPES, disable_dropout, loading
from rlhf.rewards.scorers import encode_for_reward
from rlhf.runtime.distributed import quiet_deepspeed_detection
from rlhf.runtime.tracking import Tracker, WandbSettings

MODEL_DIR = "model"  # the best checkpoint, a from_pretrained folder with its tokenizer


def load_classifier(rm_cfg: DictConfig, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer): a 1-label sequence classifier and its right-padding tokenizer, set up as
    ``ClassifierReward`` sets them up (a pad token, the model's pad id), dropout off."""
    tokenizer_path = rm_cfg.model.tokenizer_path or rm_cfg.model.path
    with loading("model.tokenizer_path", tokenizer_path):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, padding_side="right")
    if rm_cfg.input_format == "chat" and not tokenizer.chat_template:
        raise InputError(f"input_format=chat needs a tokenizer with a chat template; {tokenizer_path!r} has none")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer at {tokenizer_path!r} has no pad or EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    with loading("model.path", rm_cfg.model.path):
        model = AutoModelForSequenceClassification.from_pretrained(
            rm_cfg.model.path, num_labels=1, dtype=DTYPES[rm_cfg.model.dtype]
        ).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return model, tokenizer


def check_round_trip(model: Any, tokenizer: Any, pairs: list[Pair], rm_cfg: DictConfig) -> None:
    """The saved folder's tokenizer, as ``AutoTokenizer`` reloads it next to the model's config.json (what
    ``reward.path`` loads), must encode like the one trained with: transformers picks the tokenizer class
    from the model type, so a foreign tokenizer can come back as another class with other ids."""
    prompts, responses = [p for p, _, _ in pairs[:8]], [c for _, c, _ in pairs[:8]]
    settings = {"input_format": rm_cfg.input_format, "max_length": rm_cfg.max_length}
    with tempfile.TemporaryDirectory() as folder:
        model.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        reloaded = AutoTokenizer.from_pretrained(folder, padding_side="right")
    if reloaded.pad_token is None:
        reloaded.pad_token = tokenizer.pad_token
    ours = encode_for_reward(tokenizer, prompts, responses, **settings)["input_ids"]
    theirs = encode_for_reward(reloaded, prompts, responses, **settings)["input_ids"]
    if not torch.equal(ours, theirs):
        raise InputError(
            f"the tokenizer of {rm_cfg.model.tokenizer_path or rm_cfg.model.path!r} comes back from the saved folder "
            f"as {type(reloaded).__name__} (the class transformers picks for model type "
            f"{model.config.model_type!r}) and encodes the pairs differently, so reward.path=<folder> would not score "
            "what was trained: use a tokenizer of the model's own type"
        )


def score_pairs(
    model: Any, tokenizer: Any, pairs: list[Pair], rm_cfg: DictConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores (B,), rejected scores (B,)) of ``pairs`` in one forward of 2B rows."""
    prompts = [prompt for prompt, _, _ in pairs] * 2
    responses = [chosen for _, chosen, _ in pairs] + [rejected for _, _, rejected in pairs]
    batch = encode_for_reward(
        tokenizer, prompts, responses, input_format=rm_cfg.input_format, max_length=rm_cfg.max_length
    )
    scores = model(**batch.to(model.device)).logits[:, 0].float()  # (2B,)
    return scores[: len(pairs)], scores[len(pairs) :]


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str) -> dict[str, float]:
    """Pair accuracy (chosen scored higher), mean margin, and the spread and mean of all scores."""
    both = torch.cat([chosen, rejected])
    return {
        f"{prefix}/accuracy": (chosen > rejected).float().mean().item(),
        f"{prefix}/margin": (chosen - rejected).mean().item(),
        f"{prefix}/score_std": both.std().item() if both.numel() > 1 else 0.0,
        f"{prefix}/score_mean": both.mean().item(),
    }


@torch.no_grad()
def evaluate(
    model: Any, tokenizer: Any, pairs: list[Pair], rm_cfg: DictConfig, prefix: str = "eval"
) -> dict[str, float]:
    """``pair_stats`` over ``pairs`` scored in batches of ``batch_size`` pairs."""
    model.eval()
    scored = [
        score_pairs(model, tokenizer, pairs[i : i + rm_cfg.batch_size], rm_cfg)
        for i in range(0, len(pairs), rm_cfg.batch_size)
    ]
    model.train()
    chosen, rejected = torch.cat([c for c, _ in scored]), torch.cat([r for _, r in scored])
    return {f"{prefix}/loss": bradley_terry_loss(chosen, rejected).item(), **pair_stats(chosen, rejected, prefix)}


def score_head(model: Any) -> torch.nn.Linear:
    """The classifier's last 1-output linear layer (``classifier``, ``score``, ``out_proj``...)."""
    heads = [module for module in model.modules() if isinstance(module, torch.nn.Linear) and module.out_features == 1]
    if not heads:
        raise InputError(f"{type(model).__name__} has no 1-output linear score head to center")
    return heads[-1]


def biased_score_head(model: Any) -> torch.nn.Linear:
    """The score head, which must have a bias for ``center=true`` (checked before training too)."""
    head = score_head(model)
    if head.bias is None:
        raise InputError(f"center=true: the score head of {type(model).__name__} has no bias; use center=false")
    return head


def center_scores(model: Any, tokenizer: Any, pairs: list[Pair], rm_cfg: DictConfig) -> float:
    """Shift the score head's bias so the scores of ``pairs`` (chosen and rejected) have mean 0; returns
    the shift. A shift of every score leaves pair accuracies, margins and the Bradley-Terry loss unchanged."""
    head = biased_score_head(model)
    mean = evaluate(model, tokenizer, pairs, rm_cfg, prefix="center")["center/score_mean"]
    with torch.no_grad():
        head.bias -= mean
    return mean


def batches(pairs: list[Pair], *, batch_size: int, rng: random.Random) -> list[list[Pair]]:
    """One epoch of mini-batches of ``pairs`` in a fresh seeded order."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    return [[pairs[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def train_reward_model(
    rm_cfg: DictConfig, run_dir: Path, *, train_pairs: list[Pair], eval_pairs: list[Pair]
) -> dict[str, float]:
    """Train, evaluate every ``eval_every`` steps and at the end, keep the best checkpoint in
    ``<run dir>/model``; returns the run's final figures (also the W&B summary)."""
    started = time.time()
    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    quiet_deepspeed_detection()  # transformers' save_pretrained imports an installed DeepSpeed
    torch.manual_seed(rm_cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # 1. model and tokenizer, as the PPO run's ClassifierReward will load them
    model, tokenizer = load_classifier(rm_cfg, device)
    if rm_cfg.center:
        biased_score_head(model)  # refused now, not after the training it would follow
    check_round_trip(model, tokenizer, train_pairs, rm_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=rm_cfg.lr, weight_decay=rm_cfg.weight_decay)
    logged, settings = tracker_settings(rm_cfg)
    tracker = Tracker(run_dir, config=logged, settings=settings)
    try:
        best = run_epochs(
            rm_cfg,
            run_dir=run_dir,
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            tracker=tracker,
            train_pairs=train_pairs,
            eval_pairs=eval_pairs,
        )
        # 5. centering (optional) of the best checkpoint, on the training pairs
        results = {"best/eval_accuracy": best, "time/total": 0.0, "center/shift": 0.0}
        if rm_cfg.center:
            results["center/shift"] = recenter(rm_cfg, run_dir / MODEL_DIR, train_pairs, device)
        results["time/total"] = time.time() - started
        tracker.summary(results)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return results


def run_epochs(
    rm_cfg: DictConfig,
    *,
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    tracker: Tracker,
    train_pairs: list[Pair],
    eval_pairs: list[Pair],
) -> float:
    """The loop over epochs and mini-batches; returns the best held-out accuracy (-1 with nothing held out)."""
    rng = random.Random(rm_cfg.seed)
    steps = rm_cfg.epochs * -(-len(train_pairs) // rm_cfg.batch_size)
    bar = tqdm(total=steps, desc="reward model", disable=not rm_cfg.logging.progress_bar)
    best, step = (-1.0, 0.0), 0
    if eval_pairs:  # the untrained model's figures, to compare with
        tracker.log(evaluate(model, tokenizer, eval_pairs, rm_cfg), step=0)
    model.train()
    for _ in range(rm_cfg.epochs):
        for batch in batches(train_pairs, batch_size=rm_cfg.batch_size, rng=rng):
            # 2. Bradley-Terry step on one mini-batch of pairs
            chosen, rejected = score_pairs(model, tokenizer, batch, rm_cfg)
            loss = bradley_terry_loss(chosen, rejected)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            metrics = {"loss/bt": loss.item(), **pair_stats(chosen.detach(), rejected.detach(), "train")}
            # 3. held-out evaluation; the best checkpoint by held-out accuracy is kept
            if eval_pairs and (step % rm_cfg.eval_every == 0 or step == steps):
                metrics.update(evaluate(model, tokenizer, eval_pairs, rm_cfg))
                # Ties in accuracy (small held-out sets) go to the lower held-out loss.
                if (metrics["eval/accuracy"], -metrics["eval/loss"]) > best:
                    best = (metrics["eval/accuracy"], -metrics["eval/loss"])
                    save_folder(model, tokenizer, run_dir / MODEL_DIR)
            # 4. log
            tracker.log(metrics, step=step)
            bar.update()
            held_out = {"best_held_out_acc": f"{best[0]:.2f}"} if best[0] >= 0 else {}
            bar.set_postfix(loss=f"{metrics['loss/bt']:.3f}", **held_out)
    bar.close()
    if not eval_pairs:  # nothing held out: the last model is the one kept
        save_folder(model, tokenizer, run_dir / MODEL_DIR)
    return best[0]


def recenter(rm_cfg: DictConfig, folder: Path, train_pairs: list[Pair], device: torch.device) -> float:
    """Load the saved best checkpoint, center its scores on the training pairs, save it again."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=DTYPES[rm_cfg.model.dtype]).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    disable_dropout(model)
    shift = center_scores(model, tokenizer, train_pairs, rm_cfg)
    save_folder(model, tokenizer, folder)
    return shift


def tracker_settings(rm_cfg: DictConfig) -> tuple[dict[str, Any], WandbSettings]:
    """(the loggable config, W&B settings) of the run, as the PPO run builds them."""
    logged = loggable_config(rm_cfg)
    wandb_cfg = logged["logging"]["wandb"]
    settings = WandbSettings(
        mode=rm_cfg.logging.wandb.mode,
        project=wandb_cfg["project"],
        name=run_name_of(rm_cfg),
        entity=wandb_cfg["entity"],
        group=group_of(rm_cfg),
        tags=tuple(wandb_cfg["tags"]),
    )
    return logged, settings


def save_folder(model: Any, tokenizer: Any, target: Path) -> None:
    """``model`` and ``tokenizer`` as one ``from_pretrained`` folder, replacing ``target`` whole."""
    staged = target.with_name(target.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
