"""One PPO iteration, as numbered steps: rollout, score, experience, PPO epochs, KL controller."""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from rlhf.core.types import Experience, Samples
from rlhf.ppo.experience import make_experience, training_scores
from rlhf.ppo.metrics import gold_metrics, rollout_metrics, score_metrics
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.settings import KLController, PPOSettings
from rlhf.ppo.update import (
    AGGREGATED_STATS,
    Learner,
    SkipCounter,
    parameters_of,
    policy_objective,
    rank_weight,
    shared_objective,
    value_objective,
)

if TYPE_CHECKING:
    from rlhf.rewards.normalize import RewardNormalizer


@dataclass
class StepResult:
    """One PPO iteration: its metrics and the global batch's rollout they describe."""

    metrics: dict[str, float]
    samples: Samples
    experience: Experience
    raw_scores: torch.Tensor  # (B,) in the reward's own units (experience.scores are normalised)


class PPOTrainer:
    """Holds the models, optimizers and KL controller; ``step`` runs one PPO iteration.

    With a shared critic trunk, ``critic_optimizer`` is None and ``actor_optimizer`` holds the
    actor's and the value head's parameters: one backward of pg + vf_coef * vf, one step.
    """

    def __init__(
        self,
        *,
        rollout: Rollout,
        reward_normalizer: RewardNormalizer,
        actor_optimizer: torch.optim.Optimizer,
        critic_optimizer: torch.optim.Optimizer | None,
        schedulers: list[torch.optim.lr_scheduler.LRScheduler],
        kl_controller: KLController,
        settings: PPOSettings,
        shuffle_generator: torch.Generator,
    ):
        self.rollout = rollout  # the models' forwards without gradients; also what the evaluation samples
        self.actor, self.critic, self.tokenizer = rollout.actor, rollout.critic, rollout.tokenizer
        self.dist, self.threads = rollout.dist, rollout.threads  # one set of ranks, one pair of model threads
        self.reward_normalizer = reward_normalizer  # training rewards only; evaluation stays raw
        self.actor_optimizer, self.critic_optimizer = actor_optimizer, critic_optimizer
        self.schedulers = schedulers  # stepped once per PPO iteration
        self.kl_controller, self.settings = kl_controller, settings
        self.generator = shuffle_generator  # mini-batch shuffling only
        self.steps_done = 0
        # The modules the update's forwards go through: with several ranks, DistributedDataParallel
        # or DeepSpeed engines (the critic sharing the actor's trunk is one process only).
        self.train_actor = self.dist.wrap(self.actor, actor_optimizer)
        self.train_critic = self.dist.wrap(self.critic, critic_optimizer) if critic_optimizer else self.critic
        # A critic-free estimator (advantage.estimator other than gae) has neither critic nor its optimizer.
        self.skips = SkipCounter(list(self.optimizers()), limit=settings.max_consecutive_skips)

    def step(self, prompts: list[str]) -> StepResult:
        """One PPO iteration on a batch of prompts (the global batch: with several ranks, each
        samples its own share)."""
        t0 = time.perf_counter()
        # 1. rollout: sample responses with the actor
        with self.rollout.autocast():
            samples = self.rollout.sample(self.dist.shard(prompts))
        t1 = time.perf_counter()
        generated = samples.response_length.sum().item()
        # 2-3. score, experience forwards, KL-shaped rewards, GAE advantages and returns
        samples, raw_scores, exp = self.experience(samples)
        kl_coef = self.kl_controller.value
        t2 = time.perf_counter()
        # 4. PPO epochs over shuffled mini-batches (the critic's alone while ppo.critic_warmup_steps last)
        warming_up = self.critic_warming_up()
        update_stats = self.ppo_update(exp)
        lr_metrics = self.optimizer_metrics()  # the learning rates this step used
        with warnings.catch_warnings():
            if warming_up:  # the actor's schedule runs on while its optimizer waits: torch warns of that
                warnings.simplefilter("ignore", UserWarning)
            for scheduler in self.schedulers:
                scheduler.step()
        t3 = time.perf_counter()
        # 5. KL controller: move beta towards its target (no-op when fixed)
        kl_per_seq = ((exp.old_logprobs - exp.ref_logprobs) * exp.action_mask).sum(dim=1)
        self.kl_controller.update(kl_per_seq.mean().item(), len(kl_per_seq))  # samples: rollout.n per prompt
        self.steps_done += 1
        # 6. metrics
        metrics = rollout_metrics(samples, exp, kl_coef, critic=self.critic is not None)
        metrics.update(score_metrics(raw_scores=raw_scores, scores=exp.scores, finite=torch.isfinite(raw_scores)))
        if self.rollout.gold is not None:  # the task's gold reward, never trained on
            gold = torch.tensor(self.rollout.gold(samples.prompts, samples.responses), dtype=torch.float32)
            metrics.update(gold_metrics(gold_scores=gold, raw_scores=raw_scores.float().cpu()))
        metrics.update(update_stats)
        metrics.update(lr_metrics)
        if self.settings.critic_warmup_steps > 0:
            metrics["optim/actor_frozen"] = float(warming_up)  # 1: the actor's optimizer did not step
        metrics["objective/kl_coef_next"] = self.kl_controller.value
        metrics["time/rollout"] = t1 - t0
        metrics["time/experience"] = t2 - t1
        metrics["time/update"] = t3 - t2
        metrics["time/step"] = t3 - t0
        metrics["time/tokens_per_s"] = generated / max(t1 - t0, 1e-9)  # this rank's
        return StepResult(metrics=metrics, samples=samples, experience=exp, raw_scores=raw_scores)

    def experience(self, samples: Samples) -> tuple[Samples, torch.Tensor, Experience]:
        """The forwards without gradients, then the experience of the global batch: (samples,
        (B,) raw scores, experience)."""
        samples, raw_scores, logprobs, ref_logprobs, values = self.rollout.forwards(samples, step=self.steps_done + 1)
        exp = make_experience(
            samples,
            scores=training_scores(samples, raw_scores, normalize=self.reward_normalizer),
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            kl_coef=self.kl_controller.value,
            settings=self.settings.experience,
        )
        return samples, raw_scores, exp

    def ppo_update(self, exp: Experience) -> dict[str, float]:
        """``ppo.epochs`` passes of shuffled mini-batches; returns the stats averaged over them.

        Actor and critic see the same mini-batches in the same order. Their graphs and optimizers are
        separate, so each trains in its own loop (at once on two threads with
        ``hardware.parallel_models``): the same gradients as one backward of the summed loss, and a
        non-finite loss or gradient skips that model's step only. A critic sharing the actor's trunk
        trains in one loop with one backward of the sum; its own parameters are the value head.
        """
        # One shuffle per epoch, drawn up front: the two models' loops must not share the generator.
        batch_size = exp.sequences.shape[0]  # the global batch: every rank holds all of it
        orders = [torch.randperm(batch_size, generator=self.generator) for _ in range(self.settings.epochs)]
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        self.threads.cancelled.clear()
        learners = self.learners()
        if len(learners) == 1:
            stats = self.train_epochs(learners[0], exp, orders)
        else:
            actor, critic = self.threads.run(
                *(partial(self.train_epochs, learner, exp, orders) for learner in learners)
            )
            stats = {**actor, **critic, "loss": actor["loss"] + critic["loss"]}
        stats["loss/total"] = stats.pop("loss")
        ratio_dev_first = stats.get("policy/ratio_dev_first")
        stats = self.dist.mean(stats)
        if ratio_dev_first is not None:  # the largest deviation of any rank, not their mean
            stats["policy/ratio_dev_first"] = self.dist.max(ratio_dev_first)
        return stats

    def learners(self) -> list[Learner]:
        """The actor's and the critic's sides of the update, or one side for a shared critic trunk."""
        # The parameters the optimizers step, not the modules' current ones: FSDP puts gathered copies
        # of the root's parameters on the module from its forward to the end of its backward.
        actor_params, settings = parameters_of(self.actor_optimizer), self.settings
        kl_coef = self.kl_controller.value  # kl.mode=loss: this iteration's beta weights the policy's KL term
        if self.critic is None:  # critic-free: the policy alone
            actor_objective = partial(policy_objective, self.train_actor, settings=settings, kl_coef=kl_coef)
            return [Learner("actor", self.train_actor, self.actor_optimizer, actor_objective, {"actor": actor_params})]
        if self.critic_optimizer is None:
            head = list(self.critic.value_head.parameters())
            trunk = [p for p in actor_params if all(p is not h for h in head)]
            shared = partial(shared_objective, self.train_actor, self.train_critic, settings=settings, kl_coef=kl_coef)
            return [Learner("actor", self.train_actor, self.actor_optimizer, shared, {"actor": trunk, "critic": head})]
        actor_objective = partial(policy_objective, self.train_actor, settings=settings, kl_coef=kl_coef)
        critic_objective = partial(value_objective, self.train_critic, settings=settings)
        critic_params = parameters_of(self.critic_optimizer)
        actor_clip, frozen = {"actor": actor_params}, self.critic_warming_up()
        return [
            Learner("actor", self.train_actor, self.actor_optimizer, actor_objective, actor_clip, frozen=frozen),
            Learner("critic", self.train_critic, self.critic_optimizer, critic_objective, {"critic": critic_params}),
        ]

    def train_epochs(self, learner: Learner, exp: Experience, orders: list[torch.Tensor]) -> dict[str, float]:
        """The learner's optimizer over the mini-batches of every epoch's order in turn: forward and
        loss, backward, the gradient norm of each group in ``learner.clip`` clipped
        (``optim/<group>_grad_norm`` is the norm before clipping), step. A non-finite loss or norm skips
        the step, leaving the parameters and the optimizer state bitwise as they were. Returns the
        objective's statistics averaged over the mini-batches (nothing once cancelled: the other
        loop's error ends the update)."""
        world, batch_size = self.dist.world_size, exp.sequences.shape[0]  # every rank holds the global batch
        size = self.settings.minibatch_size * world  # ppo.minibatch_size is per rank
        sums: dict[str, float] = defaultdict(float)
        totals = {f"optim/{learner.name}_skipped_steps": 0.0}  # reported as they are, not averaged
        for epoch, order in enumerate(orders):
            for start in range(0, batch_size, size):
                if self.threads.cancelled.is_set():
                    return {}
                index = order[start : start + size]
                mb = exp.select(self.dist.shard(index).to(exp.sequences.device)).trim_padding()  # this rank's rows
                # Each rank's loss and statistics are means over its own action tokens (its own responses for the
                # losses of ppo.loss_agg's seq_mean modes), and the gradient reduction (then ``Distributed.mean``)
                # averages over the ranks: weighting by the rank's share of them makes those averages the means
                # over all of the mini-batch.
                rows, loss_agg = exp.action_mask[index], self.settings.loss_agg
                weight = rank_weight(mb.action_mask, rows, world=world, loss_agg=loss_agg)
                token_weight = rank_weight(mb.action_mask, rows, world=world, loss_agg="token_mean")
                stats, stepped = self.train_minibatch(learner, mb, weight)
                totals[f"optim/{learner.name}_skipped_steps"] += self.skips.count(
                    learner.name, stepped=stepped, step=self.steps_done + 1
                )
                ratio_max_dev = stats.pop("ratio_max_dev", None)
                if epoch == start == 0 and ratio_max_dev is not None:
                    # The first mini-batch sees the weights that produced old_logprobs: ratio must be 1.
                    totals["policy/ratio_dev_first"] = ratio_max_dev.item()
                for key, value in stats.items():
                    # grad norms are the same on every rank (the gradients are all-reduced): not weighted
                    scale = 1.0 if key.startswith("optim/") else weight if key in AGGREGATED_STATS else token_weight
                    sums[key] += float(value.detach()) * scale
        count = len(orders) * math.ceil(batch_size / size)
        return {**{key: value / count for key, value in sums.items()}, **totals}

    def train_minibatch(self, learner: Learner, mb: Experience, weight: float) -> tuple[dict, bool]:
        """One mini-batch of ``learner``: forward and loss (times ``weight``), backward, clipping, step;
        returns the statistics and whether the optimizer stepped. A frozen learner (the actor during
        ppo.critic_warmup_steps) runs its forward for the statistics only, without gradients."""
        if learner.frozen:
            with torch.no_grad():
                return learner.objective(mb), True
        learner.optimizer.zero_grad(set_to_none=True)
        stats = learner.objective(mb)
        loss = stats["loss"] * weight
        norms, stepped = self.dist.backward_and_step(
            learner.module, learner.optimizer, loss, learner.clip, self.settings.max_grad_norm
        )
        stats.update({f"optim/{group}_grad_norm": norm for group, norm in norms.items()})
        return stats, stepped

    def critic_warming_up(self) -> bool:
        """Whether this iteration is one of the first ``ppo.critic_warmup_steps``, which train the critic
        alone (value pretraining, VC-PPO)."""
        return self.steps_done < self.settings.critic_warmup_steps

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The actor's optimizer, and the critic's unless the critic shares the actor's trunk."""
        optimizers = {"actor": self.actor_optimizer, "critic": self.critic_optimizer}
        return {name: optimizer for name, optimizer in optimizers.items() if optimizer is not None}

    def optimizer_metrics(self) -> dict[str, float]:
        """Current learning rates."""
        return {f"optim/{name}_lr": optimizer.param_groups[0]["lr"] for name, optimizer in self.optimizers().items()}

    def state_dict(self) -> dict:
        """What the trainer needs to continue exactly: optimizers, schedulers, KL coefficient,
        reward statistics, the shuffling generator and its counters."""
        return {
            "steps_done": self.steps_done,
            "consecutive_skips": self.skips.in_a_row,
            # with FSDP: gathered on rank 0 from every rank's shard (a collective)
            "actor_optimizer": self.dist.optimizer_state_dict(self.actor, self.actor_optimizer),
            "critic_optimizer": (
                self.dist.optimizer_state_dict(self.critic, self.critic_optimizer) if self.critic_optimizer else None
            ),
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "kl_coef": self.kl_controller.value,
            "reward_normalizer": self.reward_normalizer.state_dict(),
            "shuffle_generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output."""
        self.steps_done, self.skips.in_a_row = state["steps_done"], dict(state["consecutive_skips"])
        self.dist.load_optimizer_state_dict(self.actor, self.actor_optimizer, state["actor_optimizer"])
        if self.critic_optimizer is not None:
            self.dist.load_optimizer_state_dict(self.critic, self.critic_optimizer, state["critic_optimizer"])
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(scheduler_state)
        self.kl_controller.value = state["kl_coef"]
        self.reward_normalizer.load_state_dict(state["reward_normalizer"])
        self.generator.set_state(state["shuffle_generator"])
