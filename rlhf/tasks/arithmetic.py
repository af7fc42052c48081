"""The built-in task: short additions with a verifiable answer ("12+7=" -> "19").

It needs nothing from the network, so ``python train.py`` runs anywhere. The reward is a plain
Python function with the reward interface ``(prompts, responses) -> scores``.
"""

from __future__ import annotations

import random
import re

_PROMPT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def make_prompts(max_operand: int) -> list[str]:
    """Every "a+b=" with 0 <= a, b <= max_operand, in a fixed order."""
    return [f"{a}+{b}=" for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_prompts(*, max_operand: int, num_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle all prompts with ``seed`` and hold out ``num_eval`` of them: (train, eval)."""
    prompts = make_prompts(max_operand)
    random.Random(seed).shuffle(prompts)
    return prompts[num_eval:], prompts[:num_eval]


def solve(prompt: str) -> str:
    """The correct answer to a prompt, as text."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"not an addition prompt of the form 'a+b=': {prompt!r}")
    return str(int(match.group(1)) + int(match.group(2)))


def exact_match_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response (stripped) is exactly the sum, else 0.0."""
    return [float(response.strip() == solve(prompt)) for prompt, response in zip(prompts, responses, strict=True)]
