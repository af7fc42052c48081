"""Scoring responses: one interface, ``reward(prompts, responses) -> scores (B,)``.

Two kinds (config group ``reward``): a Python function chosen by Hydra ``_target_``, or a frozen
Hugging Face sequence classifier that reads the decoded (prompt, response) with its own tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable

import hydra
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.models import DTYPES, disable_dropout


class FunctionReward:
    """Wraps ``fn(prompts, responses) -> list of floats``."""

    def __init__(self, fn: Callable[[list[str], list[str]], list[float]]):
        self.fn = fn

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.fn(prompts, responses), dtype=torch.float32)


class ClassifierReward:
    """A frozen sequence classifier scoring the (prompt, response) text pair; score = logit 0.

    Inputs are right-padded: DeBERTa-style reward models pool the first token, and left padding
    shifts their scores.
    """

    def __init__(self, path: str, max_length: int, batch_size: int, device: torch.device, dtype: str = "float32"):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
        disable_dropout(self.model)
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(
                prompts[start : start + self.batch_size],
                responses[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores)


def build_reward(
    kind: str, fn: object, path: str | None, max_length: int, batch_size: int, device: torch.device
) -> FunctionReward | ClassifierReward:
    """The reward of a run from the ``reward`` config values."""
    if kind == "function":
        return FunctionReward(hydra.utils.instantiate(fn))
    if kind == "model":
        return ClassifierReward(path, max_length, batch_size, device)
    raise ValueError(f"reward.kind={kind!r}: expected 'function' or 'model'")


def check_finite(scores: torch.Tensor, step: int) -> None:
    """Stop before any update when a score is NaN or infinite, naming the samples."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"step {step}: the reward is not finite for sample(s) {bad} (scores {scores[bad].tolist()})")
