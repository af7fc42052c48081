"""The built-in tasks as a run uses them: the tiny actor each one builds (``resolve_actor_paths``) and the
gold reward a run logs beside the reward it trains on (``gold_reward_of``).

arithmetic: the tiny actor is warmed up on the sums until it is partly right; its exact-match reward is
the truth, so no gold is logged. reviews: the tiny actor is a language model of the generated reviews, and
the gold reward is hidden from the run: it trains on a learned proxy of it (``reward.kind=proxy``) or,
as the ceiling, on the gold itself (``reward=gold``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from omegaconf import DictConfig, OmegaConf

from rlhf.config.schema import DataConfig, TinyModelConfig
from rlhf.models.tiny import ensure_tiny_actor
from rlhf.tasks import arithmetic, reviews

# The tasks whose true reward is hidden from the run: it is logged beside the reward trained on. (On
# arithmetic the reward function is the exact truth already.)
GOLD_REWARDS: dict[str, Callable[[list[str], list[str]], list[float]]] = {"reviews": reviews.gold_reward}

# The tiny actor's warm-up label smoothing when model.tiny.warmup_label_smoothing is null.
LABEL_SMOOTHING = {"arithmetic": 0.3, "reviews": 0.0}


def gold_reward_of(cfg: DictConfig) -> Callable[[list[str], list[str]], list[float]] | None:
    """The hidden gold reward of the run's built-in task (``objective/gold_scores``), or None."""
    return GOLD_REWARDS.get(cfg.data.task)


def tiny_settings(cfg: DictConfig, task: str) -> TinyModelConfig:
    """``model.tiny`` with the task's label smoothing where it is null."""
    tiny = OmegaConf.to_object(cfg.model.tiny)
    if tiny.warmup_label_smoothing is None:
        tiny = replace(tiny, warmup_label_smoothing=LABEL_SMOOTHING[task])
    return tiny


def resolve_actor_paths(cfg: DictConfig) -> tuple[str, str]:
    """(model path, tokenizer path): ``model.path``, or the tiny actor built on the run's built-in task
    (on arithmetic when the prompts come from a dataset)."""
    if cfg.model.path:
        return cfg.model.path, cfg.model.tokenizer_path or cfg.model.path
    if cfg.data.task == "reviews":
        return reviews_actor(cfg)
    # The run's own split when it trains on the task (its held-out prompts stay unseen in the warm-up
    # too); the task's default split when the run's prompts come from elsewhere.
    task = cfg.data if cfg.data.task == "arithmetic" else DataConfig()
    train_prompts, eval_prompts = arithmetic.split_prompts(
        max_operand=task.max_operand, num_eval=task.num_eval, seed=task.seed
    )
    answers = [arithmetic.solve(p) for p in train_prompts]
    model_dir, tokenizer_dir = ensure_tiny_actor(
        tiny_settings(cfg, "arithmetic"),
        cfg.model.cache_dir,
        train_prompts,
        answers,
        eval_prompts,
        arithmetic.exact_match_reward,
        progress_bar=cfg.logging.progress_bar,
    )
    return str(model_dir), str(tokenizer_dir)


def reviews_actor(cfg: DictConfig) -> tuple[str, str]:
    """The tiny actor of the reviews task: a word-level language model of the generated corpus, whose
    reviews starting with one of the run's held-out prompts are left out."""
    _, eval_prompts = reviews.split_prompts(num_eval=cfg.data.num_eval, seed=cfg.data.seed)
    held_out = set(eval_prompts)
    corpus = [
        pair for pair in reviews.make_corpus(num_reviews=reviews.CORPUS_REVIEWS, seed=0) if pair[0] not in held_out
    ]
    model_dir, tokenizer_dir = ensure_tiny_actor(
        tiny_settings(cfg, "reviews"),
        cfg.model.cache_dir,
        [prompt for prompt, _ in corpus],
        [continuation for _, continuation in corpus],
        eval_prompts,
        reviews.well_formed_rate,
        vocabulary=reviews.VOCABULARY,
        progress_bar=cfg.logging.progress_bar,
    )
    return str(model_dir), str(tokenizer_dir)
