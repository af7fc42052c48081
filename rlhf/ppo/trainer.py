"""One PPO iteration, as numbered steps: rollout, score, experience, PPO epochs, KL controller."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, wait
from typing import TypeVar

import torch
from torch import nn

from rlhf.core.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from rlhf.core.masked import masked_mean
from rlhf.core.types import Experience, Samples
from rlhf.models.actions import action_logits
from rlhf.models.critic import action_values
from rlhf.models.generation import generate
from rlhf.ppo.experience import compute_logprobs, compute_values, make_experience
from rlhf.ppo.metrics import rollout_metrics, score_metrics
from rlhf.rewards.normalize import check_finite
from rlhf.runtime.distributed import Distributed, Single
from rlhf.runtime.threads import model_threads

A = TypeVar("A")


B = TypeVar("B")


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
        dist: Distributed | None = None,
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
        self.dist = dist or Single()
        # The modules the update's forwards go through: with several ranks, DistributedDataParallel
        # or DeepSpeed engines (the critic sharing the actor's trunk is one process only).
        self.train_actor = self.dist.wrap(actor, actor_optimizer)
        self.train_critic = self.dist.wrap(critic, critic_optimizer) if critic_optimizer else critic
        # per optimizer: steps skipped in a row for a non-finite loss or gradient
        self.consecutive_skips = {name: 0 for name in self.optimizers()}
        self.pool = model_threads(cfg.hardware.num_threads) if cfg.hardware.parallel_models else None
        self.cancelled = threading.Event()  # set when one of two parallel loops fails: the other stops

    def in_parallel(self, first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
        """``(first(), second())``: at once on the two model threads with ``hardware.parallel_models``,
        else one after the other. Grad mode and autocast are per thread: each callable sets its own."""
        if self.pool is None:
            return first(), second()
        futures = self.pool.submit(first), self.pool.submit(second)
        try:
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            if pending:  # one failed: tell the other to stop at its next mini-batch
                self.cancelled.set()
        except BaseException:  # a stop signal's exception in this thread
            self.cancelled.set()
            raise
        finally:
            wait(futures)
        return futures[0].result(), futures[1].result()

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
            self.actor,
            self.tokenizer,
            prompts,
            max_new_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            max_prompt_length=self.cfg.data.max_prompt_length,
            do_sample=do_sample,
            synced=self.dist.sharded,
        )

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
            if self.dist.world_size > 1:  # the sample indices are those of this rank's share
                where += f" on rank {self.dist.rank}"
            check_finite(scores, where)
        penalty = self.cfg.reward.missing_eos_penalty
        if penalty is not None:
            scores = torch.where(samples.truncated.cpu(), torch.full_like(scores, penalty), scores)
        return scores

    def score_and_values(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) scores (see ``score``) and (B, A) critic values of a rollout."""
        scores = self.score(samples)
        with self.autocast():
            return scores, compute_values(self.critic, samples)

    def policy_logprobs(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) log-probs of the sampled tokens under the actor and under the reference."""
        temperature = self.cfg.rollout.temperature
        with self.autocast():
            return compute_logprobs(self.actor, samples, temperature), compute_logprobs(
                self.reference, samples, temperature
            )

    def step(self, prompts: list[str]) -> dict[str, float]:
        """One PPO iteration on a batch of prompts (the global batch: with several ranks, each
        samples its own share); returns the step's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # 1. rollout: sample responses with the actor
        with self.autocast():
            samples = self.generate(self.dist.shard(prompts))
        t1 = time.perf_counter()
        generated = samples.response_length.sum().item()
        # 2. score and experience forwards (no gradients): the reward on the decoded text, the critic's
        # values, the actor's and the reference's log-probs; two halves, at once with hardware.parallel_models
        self.actor.eval()
        self.critic.eval()
        (raw_scores, values), (logprobs, ref_logprobs) = self.in_parallel(
            lambda: self.score_and_values(samples), lambda: self.policy_logprobs(samples)
        )
        if self.dist.world_size > 1:  # every rank goes on with the global batch
            samples, raw_scores, logprobs, ref_logprobs, values = self.gather_rollout(
                samples, raw_scores, logprobs, ref_logprobs, values
            )
        # samples with a non-finite score (reward.on_nonfinite=mask) lose their actions: advantage 0,
        # out of every statistic
        finite = torch.isfinite(raw_scores)
        samples.action_mask &= finite[:, None].to(samples.action_mask.device)
        scores = torch.zeros_like(raw_scores)
        scores[finite] = self.reward_normalizer(raw_scores[finite])
        # 3. experience: per-token KL, KL-shaped rewards, GAE advantages and returns
        kl_coef = self.kl_controller.value
        exp = make_experience(
            samples, scores, logprobs, ref_logprobs, values, kl_coef, cfg.kl.estimator, cfg.gae.gamma, cfg.gae.lam,
            cfg.gae.whiten_rewards, cfg.gae.whiten_advantages, cfg.gae.advantage_clip,
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
        metrics.update(score_metrics(raw_scores=raw_scores, scores=exp.scores, finite=finite))
        metrics.update(update_stats)
        metrics.update(lr_metrics)
        metrics["objective/kl_coef_next"] = self.kl_controller.value
        metrics["time/rollout"] = t1 - t0
        metrics["time/experience"] = t2 - t1
        metrics["time/update"] = t3 - t2
        metrics["time/step"] = t3 - t0
        metrics["time/tokens_per_s"] = generated / max(t1 - t0, 1e-9)  # this rank's
        # raw_scores: (B,) in the reward's own units, for the samples table (exp.scores are normalised)
        self.last_samples, self.last_experience, self.last_raw_scores = samples, exp, raw_scores
        return metrics

    def gather_rollout(self, samples: Samples, *per_sample: torch.Tensor) -> tuple:
        """Every rank's samples and per-sample tensors ((B,) scores, (B, A) log-probs and values),
        concatenated in rank order: prompts left-padded and responses right-padded to the longest."""
        gather, num_actions = self.dist.gather, samples.num_actions

        def prompt_then_response(tensor: torch.Tensor, pad_value: int) -> torch.Tensor:
            prompt = gather(tensor[:, :-num_actions], pad_value=pad_value, pad_first=True)
            return torch.cat([prompt, gather(tensor[:, -num_actions:], pad_value=pad_value)], dim=1)

        action_mask = gather(samples.action_mask)
        gathered = Samples(
            sequences=prompt_then_response(samples.sequences, self.tokenizer.pad_token_id),
            attention_mask=prompt_then_response(samples.attention_mask, 0), action_mask=action_mask,
            num_actions=action_mask.shape[1], response_length=gather(samples.response_length),
            total_length=gather(samples.total_length), truncated=gather(samples.truncated),
            prompts=self.dist.gather_objects(samples.prompts), responses=self.dist.gather_objects(samples.responses),
        )  # fmt: skip
        return (gathered, *(gather(tensor) for tensor in per_sample))

    def ppo_update(self, exp: Experience) -> dict[str, float]:
        """``ppo.epochs`` passes of shuffled mini-batches; returns the stats averaged over them.

        Actor and critic see the same mini-batches in the same order. Their graphs and optimizers are
        separate, so each trains in its own loop (at once on two threads with
        ``hardware.parallel_models``): the same gradients as one backward of the summed loss, and a
        non-finite loss or gradient skips that model's step only. A critic sharing the actor's trunk
        trains in one loop with one backward of the sum; its own parameters are the value head.
        """
        ppo = self.cfg.ppo
        batch_size = exp.sequences.shape[0]  # the global batch: every rank holds all of it
        size = ppo.minibatch_size * self.dist.world_size  # ppo.minibatch_size is per rank
        orders = [torch.randperm(batch_size, generator=self.generator) for _ in range(ppo.epochs)]
        minibatches = [order[i : i + size] for order in orders for i in range(0, batch_size, size)]
        self.actor.train()
        self.critic.train()
        self.cancelled.clear()
        # The parameters the optimizers step, not the modules' current ones: FSDP puts gathered copies
        # of the root's parameters on the module from its forward to the end of its backward.
        actor_params = parameters_of(self.actor_optimizer)
        if self.critic_optimizer is None:

            def objective(mb: Experience) -> dict[str, torch.Tensor]:
                policy, value = self.policy_objective(mb), self.value_objective(mb)
                return {**policy, **value, "loss": policy["loss"] + value["loss"]}

            head = list(self.critic.value_head.parameters())
            trunk = [p for p in actor_params if all(p is not h for h in head)]
            stats = self.train_minibatches("actor", objective, {"actor": trunk, "critic": head}, exp, minibatches)
        else:
            actor, critic = self.in_parallel(
                lambda: self.train_minibatches(
                    "actor", self.policy_objective, {"actor": actor_params}, exp, minibatches
                ),
                lambda: self.train_minibatches(
                    "critic", self.value_objective, {"critic": parameters_of(self.critic_optimizer)}, exp, minibatches
                ),
            )
            stats = {**actor, **critic, "loss": actor["loss"] + critic["loss"]}
        stats["loss/total"] = stats.pop("loss")
        ratio_dev_first = stats.get("policy/ratio_dev_first")
        stats = self.dist.mean(stats)
        if ratio_dev_first is not None:  # the largest deviation of any rank, not their mean
            stats["policy/ratio_dev_first"] = self.dist.max(ratio_dev_first)
        return stats

    def train_minibatches(
        self,
        name: str,
        objective: Callable[[Experience], dict[str, torch.Tensor]],
        clip: dict[str, list[nn.Parameter]],
        exp: Experience,
        minibatches: list[torch.Tensor],
    ) -> dict[str, float]:
        """The ``name`` optimizer over the mini-batches in turn: the objective's forward and loss,
        backward, the gradient norm of each group in ``clip`` clipped (``optim/<group>_grad_norm``
        is the norm before clipping), step. A non-finite loss or norm skips the step, leaving the
        parameters and the optimizer state bitwise as they were; ``ppo.max_consecutive_skips`` in a
        row stop the run. Returns the objective's statistics averaged over the mini-batches."""
        ppo, optimizer = self.cfg.ppo, self.optimizers()[name]
        sums: dict[str, float] = defaultdict(float)
        totals = {f"optim/{name}_skipped_steps": 0.0}  # reported as they are, not averaged
        world = self.dist.world_size
        module = self.train_actor if name == "actor" else self.train_critic  # DDP, a DeepSpeed engine, or the model
        for i, index in enumerate(minibatches):
            if self.cancelled.is_set():
                break
            rows = self.dist.shard(index)  # this rank's rows of the global mini-batch
            mb = exp.select(rows.to(exp.sequences.device)).trim_padding()
            optimizer.zero_grad(set_to_none=True)
            stats = objective(mb)
            # Each rank's loss and statistics are means over its own action tokens, and the gradient
            # reduction (then ``Distributed.mean``) averages over the ranks: weighting by the rank's
            # share of the tokens makes those averages the means over all of the mini-batch's tokens,
            # as in one process.
            weight = (
                1.0 if world == 1 else world * int(mb.action_mask.sum()) / max(int(exp.action_mask[index].sum()), 1)
            )
            norms, stepped = self.dist.backward_and_step(
                module, optimizer, stats["loss"] * weight, clip, ppo.max_grad_norm
            )
            stats.update({f"optim/{group}_grad_norm": norm for group, norm in norms.items()})
            if stepped:
                self.consecutive_skips[name] = 0
            else:
                self.consecutive_skips[name] += 1
                totals[f"optim/{name}_skipped_steps"] += 1
                if self.consecutive_skips[name] >= ppo.max_consecutive_skips:
                    raise FloatingPointError(
                        f"step {self.steps_done + 1} ({name}): {self.consecutive_skips[name]} optimizer steps in a "
                        "row were skipped for a non-finite loss or gradient "
                        f"(ppo.max_consecutive_skips={ppo.max_consecutive_skips})"
                    )
            ratio_max_dev = stats.pop("ratio_max_dev", None)
            if i == 0 and ratio_max_dev is not None:
                # The first mini-batch sees the weights that produced old_logprobs: ratio must be 1.
                totals["policy/ratio_dev_first"] = ratio_max_dev.item()
            for key, value in stats.items():
                # grad norms are the same on every rank (the gradients are all-reduced): not weighted
                sums[key] += float(value.detach()) * (1.0 if key.startswith("optim/") else weight)
        return {**{key: value / len(minibatches) for key, value in sums.items()}, **totals}

    def policy_objective(self, mb: Experience) -> dict[str, torch.Tensor]:
        """The actor's forward on a mini-batch: its loss term (clipped policy loss minus the entropy
        bonus) and the policy's statistics."""
        ppo, num_actions = self.cfg.ppo, mb.action_mask.shape[1]
        with self.autocast():
            logits = action_logits(
                self.train_actor, mb.sequences, mb.attention_mask, num_actions, self.cfg.rollout.temperature
            )  # (b, A, V), float32
        logprobs = logprobs_from_logits(logits, mb.sequences[:, -num_actions:])
        entropy = masked_mean(entropy_from_logits(logits), mb.action_mask)
        pg_loss, stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.action_mask, ppo.clip_eps)
        return {
            "loss": pg_loss - ppo.entropy_coef * entropy, "loss/policy": pg_loss, "policy/entropy": entropy,
            "policy/clipfrac": stats["clipfrac"], "policy/approx_kl": stats["approx_kl"],
            "policy/ratio_mean": stats["ratio"], "ratio_max_dev": stats["ratio_max_dev"],
        }  # fmt: skip

    def value_objective(self, mb: Experience) -> dict[str, torch.Tensor]:
        """The critic's forward on a mini-batch: its loss term (vf_coef times the clipped value loss)."""
        ppo, num_actions = self.cfg.ppo, mb.action_mask.shape[1]
        with self.autocast():
            values = action_values(self.train_critic, mb.sequences, mb.attention_mask, num_actions)
        vf_loss, stats = value_loss(values, mb.old_values, mb.returns, mb.action_mask, ppo.value_clip_eps)
        return {"loss": ppo.vf_coef * vf_loss, "loss/value": vf_loss, "val/clipfrac": stats["clipfrac"]}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The actor's optimizer, and the critic's unless the critic shares the actor's trunk."""
        optimizers = {"actor": self.actor_optimizer, "critic": self.critic_optimizer}
        return {name: optimizer for name, optimizer in optimizers.items() if optimizer is not None}

    def state_dict(self) -> dict:
        """What the trainer needs to continue exactly: optimizers, schedulers, KL coefficient,
        reward statistics, the shuffling generator and its counters."""
        return {
            "steps_done": self.steps_done,
            "consecutive_skips": self.consecutive_skips,
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
        self.steps_done, self.consecutive_skips = state["steps_done"], dict(state["consecutive_skips"])
        self.dist.load_optimizer_state_dict(self.actor, self.actor_optimizer, state["actor_optimizer"])
        if self.critic_optimizer is not None:
            self.dist.load_optimizer_state_dict(self.critic, self.critic_optimizer, state["critic_optimizer"])
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


def parameters_of(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters ``optimizer`` steps."""
    return [param for group in optimizer.param_groups for param in group["params"]]
