"""One PPO iteration, as numbered steps: rollout, score, experience, PPO epochs, KL controller."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from rlhf.experience import Experience, make_experience
from rlhf.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from rlhf.masked import masked_mean, masked_var
from rlhf.models import action_logits, action_values
from rlhf.reward import check_finite
from rlhf.rollout import Samples, generate


class PPOTrainer:
    """Holds the models, optimizers and KL controller; ``step`` runs one PPO iteration.

    With a shared critic trunk, ``critic_optimizer`` is None and ``actor_optimizer`` holds the
    actor's and the value head's parameters: one backward of pg + vf_coef * vf, one step.
    """

    def __init__(
        self,
        actor: nn.Module,
        reference: nn.Module,
        critic: nn.Module,
        reward: Callable[[list[str], list[str]], torch.Tensor],
        reward_normalizer: Callable[[torch.Tensor], torch.Tensor],
        tokenizer,
        actor_optimizer: torch.optim.Optimizer,
        critic_optimizer: torch.optim.Optimizer | None,
        schedulers: list[torch.optim.lr_scheduler.LRScheduler],
        kl_controller,
        cfg,
        shuffle_generator: torch.Generator,
    ):
        self.actor, self.reference, self.critic, self.reward = actor, reference, critic, reward
        self.reward_normalizer = reward_normalizer  # training rewards only; evaluation stays raw
        self.tokenizer = tokenizer
        self.actor_optimizer, self.critic_optimizer = actor_optimizer, critic_optimizer
        self.schedulers = schedulers  # stepped once per PPO iteration
        self.kl_controller = kl_controller
        self.cfg = cfg
        self.generator = shuffle_generator  # mini-batch shuffling only
        self.steps_done = 0
        self.consecutive_skips = 0  # optimizer steps skipped in a row for non-finite values

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forwards when ``hardware.autocast_dtype`` is not float32."""
        dtype = self.cfg.hardware.autocast_dtype
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.cfg.hardware.device, dtype=getattr(torch, dtype))

    def generate(self, prompts: list[str], do_sample: bool = True) -> Samples:
        """Responses of the current actor to ``prompts`` with the rollout settings."""
        rollout = self.cfg.rollout
        return generate(
            self.actor, self.tokenizer, prompts, rollout.max_new_tokens, rollout.temperature,
            self.cfg.data.max_prompt_length, do_sample=do_sample,
        )  # fmt: skip

    def score(self, samples: Samples, evaluation: bool = False) -> torch.Tensor:
        """(B,) scores, with the missing-EOS penalty replacing the score of truncated responses.

        A NaN/inf score stops the run naming the samples (``reward.on_nonfinite=error``) or is kept as
        it is for the caller to mask out (``mask``).
        """
        scores = self.reward(samples.prompts, samples.responses).float()
        if self.cfg.reward.on_nonfinite == "error":
            where = (
                f"held-out evaluation after step {self.steps_done}" if evaluation else f"step {self.steps_done + 1}"
            )
            check_finite(scores, where)
        penalty = self.cfg.reward.missing_eos_penalty
        if penalty is not None:
            scores = torch.where(samples.truncated.cpu(), torch.full_like(scores, penalty), scores)
        return scores

    def step(self, prompts: list[str]) -> dict[str, float]:
        """One PPO iteration on a batch of prompts; returns the step's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # 1. rollout: sample responses with the actor
        with self.autocast():
            samples = self.generate(prompts)
        t1 = time.perf_counter()
        # 2. score: reward model or reward function on the decoded text, then optional scaling;
        # samples with a non-finite score (reward.on_nonfinite=mask) lose their actions: advantage 0,
        # out of every statistic
        raw_scores = self.score(samples)
        finite = torch.isfinite(raw_scores)
        samples.action_mask &= finite[:, None].to(samples.action_mask.device)
        scores = torch.zeros_like(raw_scores)
        scores[finite] = self.reward_normalizer(raw_scores[finite])
        # 3. experience: log-probs, reference log-probs, KL-shaped rewards, values, GAE
        kl_coef = self.kl_controller.value
        with self.autocast():
            exp = make_experience(
                samples, scores, self.actor, self.reference, self.critic, kl_coef, cfg.kl.estimator,
                cfg.rollout.temperature, cfg.gae.gamma, cfg.gae.lam, cfg.gae.whiten_rewards,
                cfg.gae.whiten_advantages,
                cfg.gae.advantage_clip,
            )  # fmt: skip
        t2 = time.perf_counter()
        # 4. PPO epochs over shuffled mini-batches
        update_stats = self.ppo_update(exp)
        lr_metrics = self.optimizer_metrics()  # the learning rates this step used
        for scheduler in self.schedulers:
            scheduler.step()
        t3 = time.perf_counter()
        # 5. KL controller: move beta towards its target (no-op when fixed)
        kl_per_seq = ((exp.old_logprobs - exp.ref_logprobs) * exp.action_mask).sum(dim=1)
        self.kl_controller.update(kl_per_seq.mean().item(), len(prompts))
        self.steps_done += 1
        # 6. metrics
        metrics = rollout_metrics(samples, exp, kl_coef)
        metrics["objective/scores"] = raw_scores[finite].mean().item()  # in the reward's own units
        metrics["objective/nonfinite_scores"] = int((~finite).sum())
        metrics["objective/scores_normalized"] = exp.scores.mean().item()
        metrics.update(update_stats)
        metrics.update(lr_metrics)
        metrics["objective/kl_coef_next"] = self.kl_controller.value
        metrics["time/rollout"] = t1 - t0
        metrics["time/experience"] = t2 - t1
        metrics["time/update"] = t3 - t2
        metrics["time/step"] = t3 - t0
        metrics["time/tokens_per_s"] = samples.response_length.sum().item() / max(t1 - t0, 1e-9)
        self.last_samples, self.last_experience = samples, exp
        return metrics

    def ppo_update(self, exp: Experience) -> dict[str, float]:
        """``ppo.epochs`` passes of shuffled mini-batches; returns the stats averaged over them."""
        ppo = self.cfg.ppo
        batch_size = exp.sequences.shape[0]
        num_actions = exp.action_mask.shape[1]
        self.actor.train()
        self.critic.train()
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for epoch in range(ppo.epochs):
            order = torch.randperm(batch_size, generator=self.generator)
            for start in range(0, batch_size, ppo.minibatch_size):
                mb = exp.select(order[start : start + ppo.minibatch_size].to(exp.sequences.device))
                mask = mb.action_mask
                with self.autocast():
                    logits = action_logits(
                        self.actor, mb.sequences, mb.attention_mask, num_actions, self.cfg.rollout.temperature
                    )  # (b, A, V), float32
                    values = action_values(self.critic, mb.sequences, mb.attention_mask, num_actions)
                logprobs = logprobs_from_logits(logits, mb.sequences[:, -num_actions:])
                entropy = masked_mean(entropy_from_logits(logits), mask)
                pg_loss, pg_stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, ppo.clip_eps)
                vf_loss, vf_stats = value_loss(values, mb.old_values, mb.returns, mask, ppo.value_clip_eps)
                loss = pg_loss + ppo.vf_coef * vf_loss - ppo.entropy_coef * entropy
                actor_norm, critic_norm, skipped = self.optimize(loss)
                self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
                sums["optim/skipped_steps"] += skipped
                if self.consecutive_skips >= ppo.max_consecutive_skips:
                    raise FloatingPointError(
                        f"step {self.steps_done + 1}: {self.consecutive_skips} optimizer steps in a row were skipped "
                        f"for a non-finite loss or gradient (ppo.max_consecutive_skips={ppo.max_consecutive_skips})"
                    )
                if epoch == 0 and start == 0:
                    # The first mini-batch sees the weights that produced old_logprobs: ratio must be 1.
                    sums["policy/ratio_dev_first"] = pg_stats["ratio_max_dev"].item()
                for key, value in (
                    ("loss/policy", pg_loss), ("loss/value", vf_loss), ("loss/total", loss),
                    ("policy/entropy", entropy), ("policy/clipfrac", pg_stats["clipfrac"]),
                    ("policy/approx_kl", pg_stats["approx_kl"]), ("policy/ratio_mean", pg_stats["ratio"]),
                    ("val/clipfrac", vf_stats["clipfrac"]), ("optim/actor_grad_norm", actor_norm),
                    ("optim/critic_grad_norm", critic_norm),
                ):  # fmt: skip
                    sums[key] += float(value.detach())
                count += 1
        totals = ("policy/ratio_dev_first", "optim/skipped_steps")  # reported as they are, not averaged
        return {k: (v if k in totals else v / count) for k, v in sums.items()}

    def optimize(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Backward, clip each model's gradient norm, step; returns the norms before clipping and
        whether the step was skipped. A non-finite loss or gradient norm skips the step: parameters
        and optimizer state stay bitwise as they were.

        With a shared trunk the critic's own parameters are just the value head (the trunk is the
        actor's and is clipped with it).
        """
        max_norm = self.cfg.ppo.max_grad_norm
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        shared = self.critic_optimizer is None
        critic_params = self.critic.value_head.parameters() if shared else self.critic.parameters()
        actor_norm = nn.utils.clip_grad_norm_(self.actor.parameters(), max_norm)
        critic_norm = nn.utils.clip_grad_norm_(critic_params, max_norm)
        if not (torch.isfinite(loss) and torch.isfinite(actor_norm) and torch.isfinite(critic_norm)):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            return actor_norm, critic_norm, True
        for optimizer in optimizers:
            optimizer.step()
        return actor_norm, critic_norm, False

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The actor's optimizer, and the critic's unless the critic shares the actor's trunk."""
        return [opt for opt in (self.actor_optimizer, self.critic_optimizer) if opt is not None]

    def state_dict(self) -> dict:
        """What the trainer needs to continue exactly: optimizers, schedulers, KL coefficient,
        reward statistics, the shuffling generator and its counters."""
        return {
            "steps_done": self.steps_done,
            "consecutive_skips": self.consecutive_skips,
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer else None,
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "kl_coef": self.kl_controller.value,
            "reward_normalizer": self.reward_normalizer.state_dict(),
            "shuffle_generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.consecutive_skips = state["steps_done"], state["consecutive_skips"]
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(scheduler_state)
        self.kl_controller.value = state["kl_coef"]
        self.reward_normalizer.load_state_dict(state["reward_normalizer"])
        self.generator.set_state(state["shuffle_generator"])

    def optimizer_metrics(self) -> dict[str, float]:
        """Current learning rates."""
        metrics = {"optim/actor_lr": self.actor_optimizer.param_groups[0]["lr"]}
        if self.critic_optimizer is not None:
            metrics["optim/critic_lr"] = self.critic_optimizer.param_groups[0]["lr"]
        return metrics


def token_debug_rows(samples: Samples, exp: Experience, tokenizer, num_samples: int) -> list[dict]:
    """One row per action token of the first ``num_samples`` samples: the view that exposes
    off-by-one and padding bugs (the score must sit on the EOS row, nothing after it)."""
    rows = []
    responses = samples.sequences[:, -samples.num_actions :]
    for i in range(min(num_samples, responses.shape[0])):
        for t in range(int(exp.action_mask[i].sum())):
            rows.append({
                "sample": i, "position": t, "token": tokenizer.decode([int(responses[i, t])]),
                "logprob": exp.old_logprobs[i, t].item(), "ref_logprob": exp.ref_logprobs[i, t].item(),
                "kl": exp.kl[i, t].item(), "value": exp.old_values[i, t].item(), "reward": exp.rewards[i, t].item(),
                "advantage": exp.advantages[i, t].item(), "return": exp.returns[i, t].item(),
            })  # fmt: skip
    return rows


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over action tokens (1 is perfect, <= 0 is useless)."""
    var_returns = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8))


def rollout_metrics(samples: Samples, exp: Experience, kl_coef: float) -> dict[str, float]:
    """Objective, KL, advantage and rollout statistics of one batch."""
    mask = exp.action_mask
    k1 = (exp.old_logprobs - exp.ref_logprobs) * mask
    num_tokens = mask.sum().clamp(min=1)
    return {
        "objective/scores": exp.scores.mean().item(),
        "objective/scores_std": exp.scores.std().item() if len(exp.scores) > 1 else 0.0,
        "objective/rlhf_reward": exp.rewards.sum(dim=1).mean().item(),
        "objective/kl": k1.sum(dim=1).mean().item(),
        "objective/kl_per_token": (k1.sum() / num_tokens).item(),
        "objective/kl_penalty": exp.kl.sum(dim=1).mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": (-exp.old_logprobs * mask).sum(dim=1).mean().item(),
        "objective/neg_kl_frac": ((k1 < 0) & mask).sum().item() / num_tokens.item(),
        "val/explained_var": explained_variance(exp.old_values, exp.returns, mask),
        "val/values_mean": masked_mean(exp.old_values, mask).item(),
        "val/returns_mean": masked_mean(exp.returns, mask).item(),
        "adv/mean": masked_mean(exp.advantages, mask).item(),
        "adv/std": masked_var(exp.advantages, mask).sqrt().item(),
        "rollout/response_length": samples.response_length.mean().item(),
        "rollout/eos_rate": 1.0 - samples.truncated.float().mean().item(),
    }
