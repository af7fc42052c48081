"""The reviews task's proxy reward model (``reward.kind=proxy``), built once and cached:

1. the tiny actor samples two responses to each of ``reward.proxy.num_pairs`` training prompts;
2. the hidden gold reward labels each pair with Bradley-Terry noise (``reward.proxy.label_noise``);
3. a tiny DeBERTa-v2 classifier with its own sentencepiece tokenizer (``rlhf.models.tiny_classifier``)
   learns the pairs with the reward-model stage (``rlhf.app.reward_model_loop``), a tenth held out,
   its scores centred, then scaled to the gold's units (``rescale``);
4. its held-out accuracy on the noisy labels and against the noise-free gold ordering is kept.

The folder ``<cache>/proxy-<hash>/`` holds ``pairs.jsonl``, the stage's ``metrics.jsonl``, ``model/``
(what the run scores with, as ``reward=classifier reward.path=<it>/model`` would), ``proxy.json`` and
``done`` (the sha256 of the others: an entry cut short or altered is built again, never loaded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.app.reward_model_loop import evaluate, save_folder, score_head, train_reward_model
from rlhf.app.tasks import resolve_actor_paths
from rlhf.config.errors import ConfigError
from rlhf.config.options import RewardKind
from rlhf.config.reward_model_schema import PairDataConfig, RewardModelModelConfig, RewardModelTrainConfig
from rlhf.config.schema import LoggingConfig, ProxyConfig, WandbConfig
from rlhf.data.pairs import Pair, split_pairs
from rlhf.data.prompts import load_prompts
from rlhf.models.generation import generate
from rlhf.models.loading import load_tokenizer
from rlhf.models.tiny import WARMUP_MAX_PROMPT_LENGTH, default_cache_dir, publish
from rlhf.models.tiny_classifier import save_tiny_classifier
from rlhf.tasks import reviews

log = logging.getLogger(__name__)

BUILD_VERSION = 3  # bump when the build changes, so old caches are not reused
PAIRS_FILE, INFO_FILE, DONE_FILE = "pairs.jsonl", "proxy.json", "done"
EVAL_FRACTION = 0.1
MAX_LENGTH = 96  # the classifier's input bound: a prompt and its response are about 40 pieces
SPM_VOCABULARY = 120  # upper bound of the classifier's sentencepiece pieces
SAMPLE_BATCH = 128  # prompts per generate call while sampling pairs
MAX_BATCHES = 1000  # bound on those calls: an actor whose two samples always agree is an error


def ensure_proxy(
    cfg: DictConfig, *, actor_path: str, tokenizer_path: str, train_prompts: list[str]
) -> tuple[str, dict[str, float]]:
    """(folder of the proxy reward model, its figures ``proxy/*``), built on the first call."""
    proxy: ProxyConfig = OmegaConf.to_object(cfg.reward.proxy)
    root = Path(cfg.model.cache_dir).expanduser() if cfg.model.cache_dir else default_cache_dir()
    blob = {
        "version": BUILD_VERSION,
        "proxy": asdict(proxy),
        "actor": Path(actor_path).parent.name,  # the tiny actor's folder is named by its own hash
        "prompts": hashlib.sha256("\n".join(train_prompts).encode()).hexdigest(),
        "gold": asdict(reviews.GOLD),
    }
    target = root / f"proxy-{hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]}"
    if target.exists() and not intact(target):
        discard(target)
    if not intact(target):
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:  # before minutes of sampling and training
            staging.mkdir(parents=True)
        except OSError as error:
            raise ConfigError(
                f"model.cache_dir={str(root)!r} is not allowed: the proxy reward model is built there and it "
                f"cannot be written ({error.strerror}): give a writable model.cache_dir"
            ) from None
        try:
            build_proxy(
                cfg, proxy, staging, actor_path=actor_path, tokenizer_path=tokenizer_path, prompts=train_prompts
            )
        except BaseException:  # an error or a stop signal: a build cut short leaves nothing behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / DONE_FILE).write_text(json.dumps(manifest(staging), indent=1))
        publish(staging, target)
    return str(target / "model"), json.loads((target / INFO_FILE).read_text())


def run_proxy_path(cfg: DictConfig) -> str | None:
    """The folder of the proxy reward model a run with ``reward.kind=proxy`` scored with (built again if the
    cache lost it: the build is deterministic), else None: how ``rlhf.generate`` rebuilds the run's reward."""
    if cfg.reward.kind != RewardKind.proxy:
        return None
    actor_path, tokenizer_path = resolve_actor_paths(cfg)
    train_prompts, _ = load_prompts(cfg.data)
    return ensure_proxy(cfg, actor_path=actor_path, tokenizer_path=tokenizer_path, train_prompts=train_prompts)[0]


def manifest(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a built entry but ``done``, which holds it: an entry whose files differ
    was cut short or altered after its build."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != DONE_FILE)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def intact(folder: Path) -> bool:
    """Whether ``folder`` holds a whole build, as it was published."""
    try:
        return json.loads((folder / DONE_FILE).read_text()) == manifest(folder)
    except (OSError, ValueError):
        return False


def discard(entry: Path) -> None:
    """Remove a damaged cache entry, so that it is built again (moved aside first: no process finds it
    half-removed; when another process moved it first, nothing is left to do)."""
    log.warning("the proxy reward model in %s is incomplete or altered: building it again", entry)
    aside = entry.with_name(f".{entry.name}.damaged.{os.getpid()}")
    try:
        entry.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def build_proxy(
    cfg: DictConfig, proxy: ProxyConfig, folder: Path, *, actor_path: str, tokenizer_path: str, prompts: list[str]
) -> None:
    """Steps 1-4 of the module docstring into ``folder``."""
    # 1-2. sampled pairs, labelled by the gold reward with noise
    pairs = sample_pairs(actor_path, tokenizer_path, prompts, proxy)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / PAIRS_FILE).open("w") as file:
        for prompt, chosen, rejected in pairs:
            file.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    train_pairs, eval_pairs = split_pairs(pairs, eval_fraction=EVAL_FRACTION, seed=proxy.seed)
    # 3. the classifier, trained by the reward-model stage
    texts = [reviews.join(prompt, response) for prompt, chosen, rejected in pairs for response in (chosen, rejected)]
    save_tiny_classifier(
        folder / "init",
        texts=texts,
        hidden_size=proxy.hidden_size,
        num_layers=proxy.num_layers,
        vocab_size=SPM_VOCABULARY,
        seed=proxy.seed,
    )
    rm_cfg = stage_config(cfg, proxy, folder)
    results = train_reward_model(rm_cfg, folder, train_pairs=train_pairs, eval_pairs=eval_pairs)
    shutil.rmtree(folder / "init")
    if proxy.label_noise > 0:
        rescale(folder / "model", proxy.label_noise)
    # 4. its figures
    info = {
        "proxy/num_pairs": len(pairs),
        "proxy/eval_accuracy": results["best/eval_accuracy"],
        "proxy/gold_accuracy": gold_accuracy(rm_cfg, folder / "model", eval_pairs),
        "proxy/label_agreement": label_agreement(pairs),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
    log.info(
        "proxy reward model trained on %d pairs: held-out accuracy %.3f on its labels, %.3f against the gold",
        *(len(train_pairs), info["proxy/eval_accuracy"], info["proxy/gold_accuracy"]),
    )


@torch.no_grad()
def sample_pairs(actor_path: str, tokenizer_path: str, prompts: list[str], proxy: ProxyConfig) -> list[Pair]:
    """``proxy.num_pairs`` (prompt, chosen, rejected) of two sampled responses each (temperature 1), the
    preference drawn from the gold reward with Bradley-Terry noise; identical responses are skipped. The
    prompts are taken in a seeded order, again in a new order when they run out."""
    rng = random.Random(proxy.seed)
    torch.manual_seed(proxy.seed)
    model = AutoModelForCausalLM.from_pretrained(actor_path).eval()
    tokenizer = load_tokenizer(tokenizer_path)
    pairs: list[Pair] = []
    for _ in range(MAX_BATCHES):
        batch = rng.sample(prompts, min(SAMPLE_BATCH, len(prompts)))
        samples = generate(
            model,
            tokenizer,
            batch + batch,
            max_new_tokens=reviews.MAX_RESPONSE_WORDS,
            temperature=1.0,
            max_prompt_length=WARMUP_MAX_PROMPT_LENGTH,
            do_sample=True,
        )
        golds = reviews.gold_reward(batch + batch, samples.responses)
        for i, prompt in enumerate(batch):
            a, b, gold_a, gold_b = (
                samples.responses[i],
                samples.responses[i + len(batch)],
                golds[i],
                golds[i + len(batch)],
            )
            if a != b:
                first = reviews.prefers_first(gold_a, gold_b, noise=proxy.label_noise, rng=rng)
                pairs.append((prompt, a, b) if first else (prompt, b, a))
        if len(pairs) >= proxy.num_pairs:
            return pairs[: proxy.num_pairs]
    raise RuntimeError(
        f"the tiny actor sampled {len(pairs)} distinct pairs in {MAX_BATCHES} batches, fewer than "
        f"reward.proxy.num_pairs={proxy.num_pairs}"
    )


def stage_config(cfg: DictConfig, proxy: ProxyConfig, folder: Path) -> DictConfig:
    """The reward-model stage's config for the proxy: the classifier in ``folder/init``, pair input,
    centred scores, no W&B run of its own (its ``metrics.jsonl`` stays in ``folder``)."""
    return OmegaConf.structured(
        RewardModelTrainConfig(
            model=RewardModelModelConfig(path=str(folder / "init")),
            data=PairDataConfig(path=str(folder / PAIRS_FILE), eval_fraction=EVAL_FRACTION),
            logging=LoggingConfig(wandb=WandbConfig(mode="disabled"), progress_bar=cfg.logging.progress_bar),
            seed=proxy.seed,
            input_format="pair",
            max_length=MAX_LENGTH,
            batch_size=proxy.batch_size,
            epochs=proxy.epochs,
            lr=proxy.lr,
            eval_every=25,
            center=True,
            output_dir=str(folder),
        )
    )


def rescale(model_dir: Path, scale: float) -> None:
    """Multiply the saved classifier's scores by ``scale`` (its score head's weight and bias).

    Labels drawn with P(a over b) = sigmoid((gold(a) - gold(b)) / label_noise) teach a Bradley-Terry model
    scores of gold / label_noise (plus a constant, removed by centering): times label_noise, the proxy
    is in the gold's units, so proxy and gold share one axis and a kl.beta means the same against either.
    Pair accuracies are unchanged."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head = score_head(model)
    with torch.no_grad():
        head.weight *= scale
        if head.bias is not None:
            head.bias *= scale
    save_folder(model, tokenizer, model_dir)


def gold_accuracy(rm_cfg: DictConfig, model_dir: Path, pairs: list[Pair]) -> float:
    """Held-out pair accuracy of the trained proxy against the noise-free gold ordering (ties left out)."""
    ordered = []
    for prompt, a, b in pairs:
        gold_a, gold_b = reviews.gold_reward([prompt, prompt], [a, b])
        if gold_a != gold_b:
            ordered.append((prompt, a, b) if gold_a > gold_b else (prompt, b, a))
    if not ordered:
        return float("nan")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
    return evaluate(model, tokenizer, ordered, rm_cfg, prefix="gold")["gold/accuracy"]


def label_agreement(pairs: list[Pair]) -> float:
    """Share of the pairs whose noisy label agrees with the gold ordering (ties left out): the accuracy a
    perfect proxy would reach on the labels."""
    agree = [
        gold_chosen > gold_rejected
        for gold_chosen, gold_rejected in (reviews.gold_reward([p, p], [c, r]) for p, c, r in pairs)
        if gold_chosen != gold_rejected
    ]
    return sum(agree) / len(agree) if agree else float("nan")
