"""What happens to scores after the scorer: the finite check, the missing-EOS penalty and running
normalisation."""

from __future__ import annotations

import math

import torch

from rlhf.core.types import Samples


class RewardNormalizer:
    """Training-reward transform: ``running`` (subtract the running mean, divide by the running std,
    over every score seen so far including this batch), ``fixed`` (gain * score + bias) or ``none``;
    then clip to [-clip, clip] when ``clip`` is set. Held-out evaluation always reports raw scores."""

    def __init__(self, kind: str, *, gain: float = 1.0, bias: float = 0.0, clip: float | None = None) -> None:
        self.kind, self.gain, self.bias, self.clip = kind, gain, bias, clip
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # running moments (Chan et al. parallel update)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, scores: torch.Tensor) -> None:
        n, mean = scores.numel(), scores.double().mean().item()
        m2 = ((scores.double() - mean) ** 2).sum().item()
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.kind == "running":
            self.update(scores)
            scores = (scores - self.mean) / max(self.std, 1e-8)
        elif self.kind == "fixed":
            scores = self.gain * scores + self.bias
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores


def check_finite(scores: torch.Tensor, where: str) -> None:
    """Stop before any update when a score is NaN or infinite, naming where (``"step 3"``) and the samples."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{where}: the reward is not finite for sample(s) {bad} (scores {scores[bad].tolist()}); "
            "reward.on_nonfinite=mask drops such samples instead"
        )


def checked_scores(
    scores: torch.Tensor, samples: Samples, *, on_nonfinite: str, missing_eos_penalty: float | None, where: str
) -> torch.Tensor:
    """(B,) ``scores`` with the missing-EOS penalty replacing the score of truncated responses.

    A NaN/inf score stops the run naming the samples and ``where`` (``reward.on_nonfinite=error``) or
    is kept as it is for the caller to mask out (``mask``)."""
    if on_nonfinite == "error":
        check_finite(scores, where)
    if missing_eos_penalty is not None:
        scores = torch.where(samples.truncated.cpu(), torch.full_like(scores, missing_eos_penalty), scores)
    return scores
