"""End to end through the code ``train(cfg)`` runs: weights move where they should, W&B and
metrics.jsonl hold what was logged, and a short run on the default task raises the reward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.app.build import build_trainer
from rlhf.app.run import train
from rlhf.core.losses import logprobs_from_logits, policy_loss
from rlhf.models.actions import action_logits
from tests.helpers import CLI_RUN_OVERRIDES, wandb_inspect


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())]


def test_one_step_moves_actor_and_critic_not_reference_or_reward(make_cfg, reward_model_dir):
    cfg = make_cfg("reward=classifier", f"reward.path={reward_model_dir}")
    trainer, train_prompts, _ = build_trainer(cfg)
    actor, critic, reference = snapshot(trainer.actor), snapshot(trainer.critic), snapshot(trainer.rollout.reference)
    reward_model = snapshot(trainer.rollout.reward.model)
    result = trainer.step(train_prompts[:8])
    metrics = result.metrics
    assert set(changed(actor, trainer.actor)) == set(actor), "every actor tensor should move"
    assert set(changed(critic, trainer.critic)) == set(critic), "every critic tensor should move"
    assert changed(reference, trainer.rollout.reference) == []
    assert changed(reward_model, trainer.rollout.reward.model) == []
    # The critic has its own trunk by default.
    assert trainer.critic.backbone is not trainer.actor.base_model
    assert metrics["policy/ratio_dev_first"] < 1e-6
    assert torch.isfinite(result.experience.scores).all()


def test_shared_critic_trains_one_trunk(make_cfg):
    cfg = make_cfg("model.shared_critic=true")
    trainer, train_prompts, _ = build_trainer(cfg)
    assert trainer.critic.backbone is trainer.actor.base_model
    assert trainer.critic_optimizer is None
    head = snapshot(trainer.critic.value_head)
    actor = snapshot(trainer.actor)
    trainer.step(train_prompts[:8])
    assert set(changed(head, trainer.critic.value_head)) == set(head)
    assert set(changed(actor, trainer.actor)) == set(actor)


def test_first_minibatch_ratio_is_one_and_nothing_clips(make_cfg):
    # The update's first forward uses the weights that produced old_logprobs, on a different batch
    # composition (a shuffled mini-batch): ratio must be 1 and no token clipped.
    cfg = make_cfg("rollout.batch_size=16")
    trainer, train_prompts, _ = build_trainer(cfg)
    result = trainer.step(train_prompts[:16])
    exp = result.experience
    mb = exp.select(torch.tensor([5, 1, 12, 3]))
    num_actions = mb.action_mask.shape[1]
    # Recompute the experience of the already-updated actor for a fresh check of the invariant.
    from rlhf.ppo.experience import compute_logprobs, compute_values, make_experience
    from rlhf.ppo.settings import ExperienceSettings

    samples = result.samples
    logprobs, ref_logprobs = (
        compute_logprobs(model, samples, 1.0) for model in (trainer.actor, trainer.rollout.reference)
    )
    settings = ExperienceSettings(kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=True)
    values = compute_values(trainer.critic, samples)
    exp = make_experience(
        samples,
        scores=exp.scores,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        kl_coef=0.05,
        settings=settings,
    )
    mb = exp.select(torch.tensor([5, 1, 12, 3]))
    with torch.no_grad():
        logits = action_logits(trainer.actor, mb.sequences, mb.attention_mask, num_actions, 1.0)
        logprobs = logprobs_from_logits(logits, mb.sequences[:, -num_actions:])
    _, stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.action_mask, clip_eps=0.2)
    assert stats["ratio_max_dev"] < 1e-5
    assert stats["clipfrac"] == 0


def test_train_logs_metrics_file_and_offline_wandb_run(make_cfg, tmp_path):
    cfg = make_cfg(
        "trainer.steps=2", "kl.beta=0.07", "gae.lam=0.9", "logging.wandb.mode=offline", "logging.samples_every=1"
    )
    summary = train(cfg)
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    expected = {
        "objective/scores", "objective/rlhf_reward", "objective/kl", "objective/kl_coef", "objective/entropy",
        "policy/clipfrac", "policy/approx_kl", "policy/entropy", "loss/policy", "loss/value", "val/clipfrac",
        "val/explained_var", "adv/mean", "val/returns_mean", "rollout/response_length", "rollout/eos_rate",
        "optim/actor_lr", "optim/critic_lr", "optim/actor_grad_norm", "optim/critic_grad_norm", "time/rollout",
        "time/experience", "time/update", "time/tokens_per_s",
    }  # fmt: skip
    assert expected <= set(rows[1])
    assert rows[1]["objective/kl_coef"] == pytest.approx(0.07)
    assert "eval/score" in rows[0] and "eval/score" in rows[2]
    assert summary["final/eval_score"] == rows[2]["eval/score"]
    # The trained policy is saved as an ordinary Hugging Face folder.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert saved.config.model_type == "qwen2" and (run_dir / "model" / "tokenizer.json").exists()

    info = wandb_inspect(run_dir, "--summary")[0]
    assert info["config"]["kl"]["beta"] == pytest.approx(0.07)
    assert info["config"]["gae"]["lam"] == pytest.approx(0.9)
    assert info["summary"]["final/eval_score"] == pytest.approx(summary["final/eval_score"])
    history = [r for r in wandb_inspect(run_dir) if r.get("type") == "history"]
    logged = set().union(*(record["history"]["item"] for record in history))
    assert expected <= logged
    # The samples table is logged as a W&B table (flattened keys in the history record).
    tables = [r["history"]["item"] for r in history if "samples._type" in r["history"]["item"]]
    assert [t["samples._type"] for t in tables] == ["table-file", "table-file"]
    assert tables[0]["samples.nrows"] == 8


def test_eval_kl_is_the_summed_log_ratio_of_the_held_out_samples(make_cfg):
    # eval/kl = mean over held-out responses of sum_t (log pi - log pi_ref), recomputed here from the same
    # samples (same seed) with a naive per-position log_softmax of each model.
    from rlhf.app.run import evaluate

    trainer, train_prompts, eval_prompts = build_trainer(make_cfg("rollout.batch_size=16"))
    trainer.step(train_prompts[:16])  # the actor moves away from the reference
    torch.manual_seed(123)
    metrics = evaluate(trainer, eval_prompts[:16])
    torch.manual_seed(123)
    samples = trainer.rollout.generate(eval_prompts[:16])
    num_actions = samples.num_actions
    totals = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        for model, sign in ((trainer.actor, 1.0), (trainer.rollout.reference, -1.0)):
            logits = model(input_ids=samples.sequences, attention_mask=samples.attention_mask,
                           position_ids=(samples.attention_mask.cumsum(1) - 1).clamp(min=0)).logits  # fmt: skip
            for i in range(16):
                for t in range(int(samples.action_mask[i].sum())):
                    position = samples.sequences.shape[1] - num_actions + t  # the token; predicted at position - 1
                    logp = torch.log_softmax(logits[i, position - 1].double(), dim=-1)
                    totals[i] += sign * logp[samples.sequences[i, position]]
    assert totals.abs().sum() > 0, "the actor should have moved"
    assert metrics["eval/kl"] == pytest.approx(totals.mean().item(), abs=1e-5)


@pytest.mark.slow
def test_default_task_reward_rises(make_cfg):
    # The default config (only shortened), W&B off: training reward of the last 10 steps beats the first 10.
    cfg = make_cfg("trainer.steps=80", "rollout.batch_size=64", "ppo.minibatch_size=16", "ppo.epochs=4")
    trainer_run = train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.trainer.output_dir) / "metrics.jsonl").read_text().splitlines()]
    scores = [row["objective/scores"] for row in rows if "objective/scores" in row]
    first, last = sum(scores[:10]) / 10, sum(scores[-10:]) / 10
    assert last > first + 0.1, (first, last)
    assert trainer_run["final/eval_score"] > trainer_run["initial/eval_score"]


def test_default_reference_knows_the_answers_but_samples_diffusely(make_cfg):
    # The built-in warm-up: the answers are the tiny actor's mode (greedy >= target) while its samples
    # are right at most half the time, so PPO has something to learn and the KL something to measure.
    from rlhf.app.build import resolve_actor_paths

    cfg = make_cfg()
    model_dir, tokenizer_dir = resolve_actor_paths(cfg)
    assert Path(model_dir, "config.json").exists() and Path(tokenizer_dir, "tokenizer.json").exists()
    built = json.loads(Path(model_dir).parent.joinpath("done").read_text())
    assert built["held_out_greedy_accuracy"] >= cfg.model.tiny.warmup_target_accuracy
    assert 0.1 <= built["held_out_sampled_accuracy"] <= 0.5
    # A second call finds the cached build.
    assert resolve_actor_paths(cfg) == (model_dir, tokenizer_dir)


def test_command_line_run_writes_hydra_dir_metrics_and_named_wandb_run(cli_run):
    # The real entry point: Hydra composes, train() runs, W&B is named by the overrides (the run: conftest.py).
    run_dir, result = cli_run
    overrides = CLI_RUN_OVERRIDES
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out reward (sampled)" in result.stdout
    assert (run_dir / ".hydra" / "overrides.yaml").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    # The KL printed and summarised beside the held-out reward is measured on the held-out responses
    # (0 for the reference itself at step 0); the training batch's KL keeps its own name.
    summary = json.loads((run_dir / "status.json").read_text())["summary"]
    assert rows[0]["eval/kl"] == 0.0
    assert summary["final/eval_kl"] == rows[2]["eval/kl"] and summary["final/kl"] == rows[2]["objective/kl"]
    assert (
        f"KL to reference on the held-out prompts: {summary['final/eval_kl']:.3f} nats per response "
        f"(last training batch: {summary['final/kl']:.3f})" in result.stdout
    )
    run_record = next(r for r in wandb_inspect(run_dir) if r.get("type") == "run")["run"]
    assert run_record["display_name"] == ",".join(overrides)


@pytest.mark.slow  # a CLI run; not slow: the command-line run above
def test_normalized_run_logs_raw_scores_and_keeps_normalized_ones_apart(tiny_cache, tmp_path):
    # reward.normalize=fixed trains on 2 * score + 1; objective/scores(_std) and the samples table's
    # score column stay in the reward function's units, the training rewards have their own names.
    import statistics

    from rlhf.tasks.arithmetic import exact_match_reward

    run_dir = tmp_path / "normalized"
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.steps=1", "rollout.batch_size=8", "ppo.minibatch_size=4",
         "ppo.epochs=1", "reward.normalize=fixed", "reward.gain=2", "reward.bias=1", "logging.num_samples=8",
         "logging.wandb.mode=disabled", "logging.progress_bar=false", f"model.cache_dir={tiny_cache}",
         f"hydra.run.dir={run_dir}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # the whole batch of step 1
    raw = exact_match_reward([row["prompt"] for row in rows], [row["response"] for row in rows])
    assert [row["score"] for row in rows] == raw
    assert [row["score_normalized"] for row in rows] == [2 * score + 1 for score in raw]
    assert 0 < sum(raw) < 8, "the batch must mix right and wrong answers for the std to tell raw from normalized"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert metrics["objective/scores"] == pytest.approx(statistics.mean(raw))
    assert metrics["objective/scores_std"] == pytest.approx(statistics.stdev(raw))
    assert metrics["objective/scores_normalized"] == pytest.approx(2 * statistics.mean(raw) + 1)
    assert metrics["objective/scores_normalized_std"] == pytest.approx(2 * statistics.stdev(raw))
