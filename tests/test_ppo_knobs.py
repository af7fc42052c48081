"""Issue 19's PPO knobs: asymmetric and dual clipping, loss aggregation, KL as a loss term, critic
warm-up. Each formula against a float64 loop written from its paper on ragged masks (with an empty
row), hand-computed cases, and one command-line run per knob family checking the metric it adds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from rlhf.app.build import build_trainer
from rlhf.config import options
from rlhf.core.kl import kl_loss
from rlhf.core.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    entropy_from_logits,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)
from rlhf.models.actions import action_logits
from rlhf.models.critic import action_values
from rlhf.ppo.update import loss_units, policy_objective, value_objective
from tests.helpers import REPO, SHORT, metrics_by_step
from tests.reference import ragged_mask

LENGTHS = [0, 1, 6, 4, 2]  # an empty row (a sample dropped for a non-finite score), a one-token row, a full row
WIDTH = 6
MAX_LENGTH = 8  # rollout.max_new_tokens: larger than the widest row, as when every response ended early


def aggregate_loop(losses: torch.Tensor, lengths: list[int], mode: str, max_length: int) -> float:
    """The papers' forms over the real tokens of each row; rows without tokens count nowhere."""
    rows = [[losses[b, t].item() for t in range(n)] for b, n in enumerate(lengths) if n > 0]
    if not rows:
        return 0.0
    if mode == "token_mean":  # PPO: every token of the batch alike
        flat = [x for row in rows for x in row]
        return sum(flat) / len(flat)
    if mode == "seq_mean_token_mean":  # GRPO: 1/G sum_i 1/|o_i| sum_t
        return sum(sum(row) / len(row) for row in rows) / len(rows)
    return sum(sum(row) / max_length for row in rows) / len(rows)  # Dr. GRPO: 1/G sum_i 1/L_max sum_t


def random_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(len(LENGTHS), WIDTH, generator=gen, dtype=torch.float64)
    old = logprobs + 0.6 * torch.randn(len(LENGTHS), WIDTH, generator=gen, dtype=torch.float64)
    advantages = 2 * torch.randn(len(LENGTHS), WIDTH, generator=gen, dtype=torch.float64)
    return logprobs, old, advantages, ragged_mask(LENGTHS, WIDTH)


def test_core_and_config_name_the_same_aggregations():
    assert tuple(options.LossAgg) == LOSS_AGGREGATIONS
    assert tuple(options.KLMode) == ("reward", "loss")


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_loss_matches_the_papers_loops_on_ragged_rows(mode):
    gen = torch.Generator().manual_seed(0)
    losses = torch.randn(len(LENGTHS), WIDTH, generator=gen, dtype=torch.float64)
    mask = ragged_mask(LENGTHS, WIDTH)
    junk = torch.where(mask, losses, torch.full_like(losses, math.inf))  # padding must never leak
    got = aggregate_loss(junk, mask, mode, max_length=MAX_LENGTH).item()
    assert got == pytest.approx(aggregate_loop(losses, LENGTHS, mode, MAX_LENGTH), abs=1e-12)


def test_aggregations_differ_on_uneven_lengths_by_hand():
    # Row 0: one token, loss 4. Row 1: three tokens, loss 1 each. Row 2: empty (counts nowhere).
    # token_mean = (4 + 1 + 1 + 1) / 4 = 1.75; seq_mean_token_mean = (4/1 + 3/3) / 2 = 2.5;
    # seq_mean_token_sum with max length 4 = (4/4 + 3/4) / 2 = 0.875.
    losses = torch.tensor([[4.0, 9.0, 9.0], [1.0, 1.0, 1.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = ragged_mask([1, 3, 0], 3)
    expected = {"token_mean": 1.75, "seq_mean_token_mean": 2.5, "seq_mean_token_sum": 0.875}
    for mode, value in expected.items():
        assert aggregate_loss(losses, mask, mode, max_length=4).item() == pytest.approx(value, abs=1e-15)
    # What the update weights ranks by: tokens, or responses with at least one token.
    assert loss_units(mask, "token_mean") == 4 and loss_units(mask, "seq_mean_token_sum") == 2


def test_every_aggregation_of_an_all_empty_batch_is_zero_and_bad_modes_are_named():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for mode in LOSS_AGGREGATIONS:
        assert aggregate_loss(torch.full((2, 3), math.nan), mask, mode, max_length=3).item() == 0.0
    with pytest.raises(ValueError, match="'mean'"):
        aggregate_loss(torch.zeros(2, 3), mask, "mean")
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(torch.zeros(2, 3), mask, "seq_mean_token_sum")


def clipped_token_loss(r: float, a: float, low: float, high: float, c: float | None) -> tuple[float, bool, bool]:
    """One token's loss from the papers: PPO's -min(r A, clip(r, 1 - low, 1 + high) A) (DAPO's asymmetric
    range), then for A < 0 Ye et al.'s -max(that objective, c A). Returns (loss, clipped, dual-bounded)."""
    objective = min(r * a, min(max(r, 1 - low), 1 + high) * a)
    clipped = min(max(r, 1 - low), 1 + high) * a < r * a
    bounded = c is not None and a < 0 and c * a > objective
    if bounded:
        objective = c * a
    return -objective, clipped, bounded


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize(("low", "high", "c"), [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 1.5), (0.2, 0.2, 3.0)])
def test_policy_loss_matches_a_float64_loop(mode, low, high, c):
    logprobs, old, advantages, mask = random_inputs(1)
    clip = {"clip_eps_low": low, "clip_eps_high": high, "dual_clip_c": c}
    loss, stats = policy_loss(logprobs, old, advantages, mask, 0.2, **clip, loss_agg=mode, max_length=MAX_LENGTH)
    per_token = torch.zeros_like(logprobs)
    clipped = bounded = count = 0
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            r = math.exp(logprobs[b, t].item() - old[b, t].item())
            per_token[b, t], was_clipped, was_bounded = clipped_token_loss(r, advantages[b, t].item(), low, high, c)
            clipped, bounded, count = clipped + was_clipped, bounded + was_bounded, count + 1
    assert loss.item() == pytest.approx(aggregate_loop(per_token, LENGTHS, mode, MAX_LENGTH), abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(clipped / count)
    if c is None:
        assert "dual_clipfrac" not in stats
    else:
        assert stats["dual_clipfrac"].item() == pytest.approx(bounded / count)


@pytest.mark.parametrize(
    ("ratio", "advantage", "high", "c", "loss", "clipfrac", "dual_clipfrac"),
    [
        # clip-higher: r = 1.25, A = 1. Symmetric eps 0.2: min(1.25, 1.2) = 1.2 -> loss -1.2, clipped;
        # high = 0.28: 1.25 < 1.28, min(1.25, 1.25) -> loss -1.25, not clipped.
        (1.25, 1.0, 0.2, None, -1.2, 1.0, None),
        (1.25, 1.0, 0.28, None, -1.25, 0.0, None),
        # dual clip, A = -1, c = 3: r = 5 -> PPO's loss max(5, 1.2) = 5 is bounded to 3;
        # r = 2 -> loss 2 < 3 stays; A = +1, r = 5 -> loss -1.2 (clipped), the bound is for A < 0 only.
        (5.0, -1.0, 0.2, 3.0, 3.0, 0.0, 1.0),
        (2.0, -1.0, 0.2, 3.0, 2.0, 0.0, 0.0),
        (5.0, 1.0, 0.2, 3.0, -1.2, 1.0, 0.0),
    ],
)
def test_clip_higher_and_dual_clip_by_hand(ratio, advantage, high, c, loss, clipfrac, dual_clipfrac):
    logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    advantages, mask = torch.tensor([[advantage]], dtype=torch.float64), torch.tensor([[True]])
    value, stats = policy_loss(
        logprobs, torch.zeros_like(logprobs), advantages, mask, 0.2, clip_eps_high=high, dual_clip_c=c
    )
    assert value.item() == pytest.approx(loss)
    assert stats["clipfrac"].item() == clipfrac
    if dual_clipfrac is not None:
        assert stats["dual_clipfrac"].item() == dual_clipfrac


def test_dual_clipped_tokens_get_no_gradient():
    # A = -1, c = 3: the token at r = 5 is bounded (constant loss 3), the one at r = 2 is not: d(loss)/d(logprob)
    # = d(r * 1)/d(logprob) / 2 tokens = r / 2 = 1.
    logprobs = torch.tensor([[math.log(5.0), math.log(2.0)]], dtype=torch.float64, requires_grad=True)
    old, advantages = torch.zeros(1, 2, dtype=torch.float64), -torch.ones(1, 2, dtype=torch.float64)
    loss, _ = policy_loss(logprobs, old, advantages, torch.ones(1, 2, dtype=torch.bool), 0.2, dual_clip_c=3.0)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_aggregates_like_the_policy_loss(mode, clip_eps):
    gen = torch.Generator().manual_seed(2)
    values, old, returns = (torch.randn(len(LENGTHS), WIDTH, generator=gen, dtype=torch.float64) for _ in range(3))
    loss, _ = value_loss(values, old, returns, ragged_mask(LENGTHS, WIDTH), clip_eps, loss_agg=mode, max_length=8)
    per_token = torch.zeros_like(values)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            v, v_old, ret = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            error = (v - ret) ** 2
            if clip_eps is not None:
                error = max(error, (v_old + min(max(v - v_old, -clip_eps), clip_eps) - ret) ** 2)
            per_token[b, t] = 0.5 * error
    assert loss.item() == pytest.approx(aggregate_loop(per_token, LENGTHS, mode, 8), abs=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_matches_a_loop_and_has_a_gradient(mode, estimator):
    logprobs, ref, _, mask = random_inputs(3)
    logprobs.requires_grad_(True)
    loss = kl_loss(logprobs, ref, mask, estimator, loss_agg=mode, max_length=MAX_LENGTH)
    per_token = torch.zeros_like(ref)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            log_r = ref[b, t].item() - logprobs[b, t].item()  # Schulman 2020: r = pi_ref / pi
            per_token[b, t] = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.expm1(log_r) - log_r}[estimator]
    assert loss.item() == pytest.approx(aggregate_loop(per_token, LENGTHS, mode, MAX_LENGTH), abs=1e-12)
    loss.backward()
    assert (logprobs.grad[~mask] == 0).all() and (logprobs.grad[mask] != 0).all()
    if estimator == "k1" and mode == "token_mean":  # d/d logprob of mean(logprob - ref) = 1 / 13 tokens
        assert logprobs.grad[mask].tolist() == pytest.approx([1 / 13] * 13)


def test_the_objectives_pass_every_knob_from_the_config_to_the_core(make_cfg):
    knobs = ["ppo.clip_eps_low=0.1", "ppo.clip_eps_high=0.3", "ppo.dual_clip_c=1.5", "ppo.entropy_coef=0.01"]
    cfg = make_cfg(*knobs, "ppo.loss_agg=seq_mean_token_sum", "kl.mode=loss", "kl.estimator=k2")
    trainer, prompts, _ = build_trainer(cfg)
    _, _, exp = trainer.experience(trainer.rollout.generate(prompts[:8]))
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy and the critic far enough that ratios clip
        for param in [*trainer.actor.parameters(), *trainer.critic.parameters()]:
            param.add_(0.1 * torch.randn_like(param))
    got = policy_objective(trainer.actor, exp, settings=trainer.settings, kl_coef=0.3)
    num_actions, mask = exp.action_mask.shape[1], exp.action_mask
    with torch.no_grad():
        logits = action_logits(trainer.actor, exp.sequences, exp.attention_mask, num_actions, 1.0)
        values = action_values(trainer.critic, exp.sequences, exp.attention_mask, num_actions)
    logprobs = logprobs_from_logits(logits, exp.sequences[:, -num_actions:])
    agg = {"loss_agg": "seq_mean_token_sum", "max_length": 4}  # rollout.max_new_tokens
    clip = {"clip_eps_low": 0.1, "clip_eps_high": 0.3, "dual_clip_c": 1.5}
    pg, stats = policy_loss(logprobs, exp.old_logprobs, exp.advantages, mask, 0.2, **clip, **agg)
    entropy = aggregate_loss(entropy_from_logits(logits), mask, "seq_mean_token_sum", max_length=4)
    kl = kl_loss(logprobs, exp.ref_logprobs, mask, "k2", **agg)
    assert got["loss"].item() == pytest.approx((pg - 0.01 * entropy + 0.3 * kl).item(), rel=1e-5)
    assert got["policy/kl_loss"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert stats["dual_clipfrac"] > 0 and got["policy/dual_clipfrac"].item() == pytest.approx(stats["dual_clipfrac"])
    vf, _ = value_loss(values, exp.old_values, exp.returns, mask, None, **agg)
    assert value_objective(trainer.critic, exp, settings=trainer.settings)["loss/value"].item() == pytest.approx(
        vf.item(), rel=1e-5
    )


# Command-line runs, one per knob family, as tests/helpers.py SHORT (one step of 8 prompts).


def run_ok(tmp_path, tiny_cache, *overrides: str) -> dict[int, dict]:
    """The metrics by step of ``python train.py <SHORT> <overrides>`` (the overrides last, so they win)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", *SHORT, "logging.wandb.mode=disabled", f"model.cache_dir={tiny_cache}"]
    result = subprocess.run(
        [*command, *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics_by_step(run_dir)


def test_clip_higher_and_dual_clip_run_and_log_the_dual_clipfrac(tmp_path, tiny_cache):
    metrics = run_ok(tmp_path, tiny_cache, "ppo.clip_eps_high=0.28", "ppo.dual_clip_c=3")
    assert 0.0 <= metrics[1]["policy/dual_clipfrac"] <= 1.0
    assert math.isfinite(metrics[1]["loss/policy"])


def test_kl_as_a_loss_term_logs_it_keeps_it_out_of_the_reward_and_adapts_beta(tmp_path, tiny_cache):
    overrides = ["kl=adaptive", "kl.mode=loss", "kl.estimator=k3", "kl.beta=0.1", "kl.target=0.001"]
    step = run_ok(tmp_path, tiny_cache, *overrides, "trainer.steps=2")[2]  # step 2 samples from a moved policy
    assert step["objective/kl_penalty"] > 0 and step["policy/kl_loss"] > 0  # k3 >= 0, and the policy moved
    # The rewards carry the score alone (not minus beta * the k3 above): their per-sequence sum is the score.
    assert step["objective/rlhf_reward"] == pytest.approx(step["objective/scores_normalized"], abs=1e-6)
    # The actor's loss is pg + beta * kl_loss (no entropy bonus), the critic's vf_coef 0.5 * value loss.
    total = step["loss/policy"] + step["objective/kl_coef"] * step["policy/kl_loss"] + 0.5 * step["loss/value"]
    assert step["loss/total"] == pytest.approx(total, rel=1e-5)
    assert step["objective/kl_coef_next"] != step["objective/kl_coef"]  # the controller still adapts beta


def test_critic_warmup_freezes_the_actor_and_says_so(tmp_path, tiny_cache):
    metrics = run_ok(tmp_path, tiny_cache, "ppo.critic_warmup_steps=1", "trainer.steps=2", "trainer.eval_every=1")
    assert metrics[1]["optim/actor_frozen"] == 1.0 and metrics[2]["optim/actor_frozen"] == 0.0
    assert "optim/actor_grad_norm" not in metrics[1] and "optim/actor_grad_norm" in metrics[2]
    assert "optim/critic_grad_norm" in metrics[1]
    # The frozen actor samples the held-out prompts as the reference did at step 0.
    assert metrics[1]["eval/kl"] == 0.0 and metrics[2]["eval/kl"] != 0.0


def test_critic_warmup_moves_the_critic_and_not_the_actor(make_cfg):
    # 4 steps: the LR schedule decays to 0 over trainer.steps and counts the warm-up iterations too.
    trainer, prompts, _ = build_trainer(make_cfg("ppo.critic_warmup_steps=1", "trainer.steps=4"))
    actor = {name: p.detach().clone() for name, p in trainer.actor.named_parameters()}
    critic = {name: p.detach().clone() for name, p in trainer.critic.named_parameters()}
    trainer.step(prompts[:8])
    assert all(torch.equal(actor[name], p) for name, p in trainer.actor.named_parameters())
    assert not all(torch.equal(critic[name], p) for name, p in trainer.critic.named_parameters())
    trainer.step(prompts[8:16])
    assert not all(torch.equal(actor[name], p) for name, p in trainer.actor.named_parameters())


def test_a_sweep_over_loss_agg_runs_each_aggregation(tmp_path, tiny_cache):
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in SHORT if not o.startswith("trainer.steps")]
    sweep = ["-m", "ppo.loss_agg=token_mean,seq_mean_token_sum", "trainer.steps=2", *overrides]
    command = [sys.executable, "train.py", *sweep, "logging.wandb.mode=disabled", f"model.cache_dir={tiny_cache}"]
    result = subprocess.run(
        [*command, f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [metrics_by_step(sweep_dir / str(job)) for job in (0, 1)]
    for job, loss_agg in enumerate(("token_mean", "seq_mean_token_sum")):
        assert json.loads((sweep_dir / str(job) / "status.json").read_text())["status"] == "completed"
        assert f"ppo.loss_agg={loss_agg}" in (sweep_dir / str(job) / ".hydra" / "overrides.yaml").read_text()
        assert sorted(runs[job]) == [0, 1, 2]
    # The same rollout of step 1 (same seed), averaged two ways: the losses differ.
    assert runs[0][1]["objective/scores"] == runs[1][1]["objective/scores"]
    assert runs[0][1]["loss/policy"] != runs[1][1]["loss/policy"]
    assert runs[0][1]["loss/value"] != runs[1][1]["loss/value"]


@pytest.mark.slow
def test_two_ranks_average_a_seq_mean_loss_over_the_whole_mini_batch(tiny_cache, tmp_path):
    # tests/test_distributed.py's parity with ppo.loss_agg=seq_mean_token_mean: two DDP ranks of batch b
    # (ragged, of different shapes) step as one process of batch 2b; the ranks' losses weigh by their
    # responses, their token statistics by their tokens.
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for command in (
        [*torchrun, "tests/ddp_worker.py", str(two), str(tiny_cache), "4", "2", "hardware=ddp_cpu"],
        [sys.executable, "tests/ddp_worker.py", str(one), str(tiny_cache), "8", "4", "hardware=cpu"],
    ):
        result = subprocess.run(
            [*command, "ppo.loss_agg=seq_mean_token_mean"], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-4000:]
    rank0, single = (torch.load(d / "rank0.pt", weights_only=False) for d in (two, one))
    for model in ("actor", "critic"):
        for name, weight in rank0[model].items():
            # the key biases' gradient is 0 but for rounding, which Adam scales up (tests/test_distributed.py)
            atol = 5e-5 if name.endswith("k_proj.bias") else 1e-6
            torch.testing.assert_close(weight, single[model][name], rtol=1e-4, atol=atol, msg=f"{model}.{name}")
    for key in ("loss/policy", "loss/value", "loss/total", "policy/clipfrac", "policy/entropy", "val/clipfrac"):
        assert rank0["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-6), key
