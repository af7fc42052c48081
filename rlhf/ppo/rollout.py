"""The rollout side of a PPO step: the models' work without gradients (responses sampled from the
actor, their scores, the critic's values, the actor's and the reference's log-probs), the global
batch gathered from every rank, and the forwards' precision."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlhf.core.types import Samples
from rlhf.models.critic import Critic
from rlhf.models.generation import generate
from rlhf.ppo.experience import compute_logprobs, compute_values
from rlhf.ppo.settings import PPOSettings
from rlhf.rewards.normalize import checked_scores

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf.runtime.distributed import Distributed
    from rlhf.runtime.threads import ModelThreads


def autocast(*, device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forwards when ``hardware.autocast_dtype`` is not float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def gather_rollout(
    dist: Distributed, samples: Samples, *per_sample: torch.Tensor, pad_token_id: int
) -> tuple[Samples | torch.Tensor, ...]:
    """Every rank's samples and per-sample tensors ((B,) scores, (B, A) log-probs and values),
    concatenated in rank order: prompts left-padded and responses right-padded to the longest."""
    gather, num_actions = dist.gather, samples.num_actions

    def prompt_then_response(tensor: torch.Tensor, pad_value: int) -> torch.Tensor:
        prompt = gather(tensor[:, :-num_actions], pad_value=pad_value, pad_first=True)
        return torch.cat([prompt, gather(tensor[:, -num_actions:], pad_value=pad_value)], dim=1)

    action_mask = gather(samples.action_mask)
    gathered = Samples(
        sequences=prompt_then_response(samples.sequences, pad_token_id),
        attention_mask=prompt_then_response(samples.attention_mask, 0),
        action_mask=action_mask,
        num_actions=action_mask.shape[1],
        response_length=gather(samples.response_length),
        total_length=gather(samples.total_length),
        truncated=gather(samples.truncated),
        prompts=dist.gather_objects(samples.prompts),
        responses=dist.gather_objects(samples.responses),
        # every rank's prompts numbered apart (its share of the global batch is the same size on every rank)
        group_ids=gather(samples.group_ids + dist.rank * len(samples.group_ids)),
        baseline_scores=None if samples.baseline_scores is None else gather(samples.baseline_scores),
    )
    return (gathered, *(gather(tensor) for tensor in per_sample))


class Rollout:
    """The actor, the reference, the critic and the reward as a rollout uses them: no gradients, the
    rollout settings, and the two halves of the experience forwards at once with
    ``hardware.parallel_models``."""

    def __init__(
        self,
        *,
        actor: nn.Module,
        reference: nn.Module,
        critic: Critic | None,
        reward: Callable[[list[str], list[str]], torch.Tensor],
        tokenizer: PreTrainedTokenizerBase,
        settings: PPOSettings,
        dist: Distributed,
        threads: ModelThreads,
        gold: Callable[[list[str], list[str]], list[float]] | None = None,
        reward_figures: dict[str, float] | None = None,
    ):
        self.actor, self.reference, self.critic, self.reward = actor, reference, critic, reward
        self.tokenizer, self.settings, self.dist, self.threads = tokenizer, settings, dist, threads
        # The task's gold reward, reported beside the reward (objective/gold_scores), never trained on;
        # and what the reward's build measured (the proxy's accuracies), logged once at step 0.
        self.gold, self.reward_figures = gold, dict(reward_figures or {})

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(device=self.settings.device, dtype=self.settings.autocast_dtype)

    def generate(self, prompts: list[str], do_sample: bool = True) -> Samples:
        """Responses of the current actor to ``prompts`` with the rollout settings."""
        s = self.settings
        return generate(
            self.actor,
            self.tokenizer,
            prompts,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            max_prompt_length=s.max_prompt_length,
            do_sample=do_sample,
            synced=self.dist.sharded,
        )

    def sample(self, prompts: list[str]) -> Samples:
        """The rollout of a PPO step: ``samples_per_prompt`` responses to each prompt, next to each other
        and sharing a group id; with remax also each prompt's greedy response, scored (the baseline)."""
        n = self.settings.samples_per_prompt
        samples = self.generate([prompt for prompt in prompts for _ in range(n)])
        samples.group_ids = torch.arange(len(prompts)).repeat_interleave(n)
        if self.settings.experience.estimator == "remax":
            greedy = self.generate(prompts, do_sample=False)
            baseline = self.score(greedy, where="the greedy baseline (advantage=remax)")
            samples.baseline_scores = baseline.repeat_interleave(n)
        return samples

    def score(self, samples: Samples, *, where: str) -> torch.Tensor:
        """(B,) scores of the reward (see ``checked_scores``); ``where`` names the step in errors."""
        scores = self.reward(samples.prompts, samples.responses).float()
        if self.dist.world_size > 1:  # the sample indices are those of this rank's share
            where += f" on rank {self.dist.rank}"
        s = self.settings
        return checked_scores(
            scores, samples, on_nonfinite=s.on_nonfinite, missing_eos_penalty=s.missing_eos_penalty, where=where
        )

    def score_and_values(self, samples: Samples, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) scores (see ``score``) and (B, A) critic values of a rollout."""
        scores = self.score(samples, where=where)
        if self.critic is None:  # a critic-free estimator: no value forward
            return scores, torch.zeros(samples.action_mask.shape, device=samples.action_mask.device)
        with self.autocast():
            return scores, compute_values(self.critic, samples)

    def policy_logprobs(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) log-probs of the sampled tokens under the actor and under the reference."""
        temperature, chunk = self.settings.temperature, self.settings.logits_chunk_tokens
        with self.autocast():
            return compute_logprobs(self.actor, samples, temperature, logits_chunk_tokens=chunk), compute_logprobs(
                self.reference, samples, temperature, logits_chunk_tokens=chunk
            )

    def forwards(
        self, samples: Samples, *, step: int
    ) -> tuple[Samples, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experience forwards of PPO iteration ``step``: (samples, (B,) raw scores, (B, A) log-probs
        of the actor and of the reference, (B, A) values), of the global batch with several ranks."""
        # the reward on the decoded text and the critic's values; the actor's and the reference's
        # log-probs: two halves, at once with hardware.parallel_models
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        (raw_scores, values), (logprobs, ref_logprobs) = self.threads.run(
            partial(self.score_and_values, samples, where=f"step {step}"), partial(self.policy_logprobs, samples)
        )
        if self.dist.world_size > 1:  # every rank goes on with the global batch
            pad_token_id = self.tokenizer.pad_token_id
            return gather_rollout(
                self.dist, samples, raw_scores, logprobs, ref_logprobs, values, pad_token_id=pad_token_id
            )
        return samples, raw_scores, logprobs, ref_logprobs, values
