"""hardware.parallel_models: actor and critic side by side on two threads train exactly as one
after the other; a failure on one side stops the other; mini-batches drop shared prompt padding."""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf.app.build import build_trainer
from rlhf.ppo.experience import compute_logprobs, compute_values


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_parallel_models_train_bitwise_like_sequential(make_cfg):
    # Each worker thread runs on num_threads // 2 = 1 intra-op thread: the same kernels as a sequential
    # run with one thread, so two PPO steps must give the same bits.
    runs = {}
    for parallel in (False, True):
        threads = 2 if parallel else 1
        cfg = make_cfg("ppo.epochs=2", f"hardware.num_threads={threads}", f"hardware.parallel_models={parallel}")
        trainer, train_prompts, _ = build_trainer(cfg)
        assert trainer.threads.parallel == parallel
        metrics = [trainer.step(train_prompts[:8]).metrics, trainer.step(train_prompts[8:16]).metrics]
        runs[parallel] = metrics, weights(trainer.actor), weights(trainer.critic)
    (seq_metrics, seq_actor, seq_critic), (par_metrics, par_actor, par_critic) = runs[False], runs[True]
    assert any(not torch.equal(seq_actor[n], p) for n, p in weights(build_trainer(cfg)[0].actor).items())
    for name in seq_actor:
        assert torch.equal(seq_actor[name], par_actor[name]), name
    for name in seq_critic:
        assert torch.equal(seq_critic[name], par_critic[name]), name
    for seq, par in zip(seq_metrics, par_metrics, strict=True):
        assert {k: v for k, v in seq.items() if not k.startswith("time/")} == {
            k: v for k, v in par.items() if not k.startswith("time/")
        }


def test_worker_threads_run_on_half_the_threads(make_cfg):
    trainer, _, _ = build_trainer(make_cfg("hardware.num_threads=4", "hardware.parallel_models=true"))
    seen = trainer.threads.run(torch.get_num_threads, torch.get_num_threads)
    assert seen == (2, 2) and torch.get_num_threads() == 4
    # Both run at once: each waits at a barrier for the other (one after the other would time out).
    barrier = threading.Barrier(2, timeout=30)

    def meet() -> str:
        barrier.wait()
        return threading.current_thread().name

    names = trainer.threads.run(meet, meet)
    assert all(name.startswith("rlhf-model") for name in names) and names[0] != names[1]


def test_a_failure_on_one_thread_stops_the_other(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("hardware.num_threads=2", "hardware.parallel_models=true"))

    def fails():
        raise FloatingPointError("actor failed")

    def waits_for_cancel():
        return trainer.threads.cancelled.wait(timeout=30)

    with pytest.raises(FloatingPointError, match="actor failed"):
        trainer.threads.run(fails, waits_for_cancel)
    assert trainer.threads.cancelled.is_set()
    # A cancelled loop takes no more optimizer steps.
    result = trainer.step(train_prompts[:8])
    exp = result.experience
    before = weights(trainer.critic)
    (critic,) = [learner for learner in trainer.learners() if learner.name == "critic"]
    trainer.threads.cancelled.set()
    trainer.train_epochs(critic, exp, [torch.arange(8)])
    assert all(torch.equal(before[n], p) for n, p in trainer.critic.named_parameters())


def test_trimmed_minibatch_gives_the_same_logprobs_and_values(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg())
    result = trainer.step(train_prompts[:8])
    exp, samples = result.experience, result.samples
    prompt_lengths = exp.attention_mask[:, : -samples.num_actions].sum(dim=1)
    longest = int(prompt_lengths.argmax())
    short = [i for i in range(len(prompt_lengths)) if i != longest and prompt_lengths[i] < prompt_lengths.max()]
    assert short, "the test needs prompts of different lengths"
    mb = exp.select(torch.tensor(short))
    trimmed = mb.trim_padding()
    cut = mb.sequences.shape[1] - trimmed.sequences.shape[1]
    assert cut == int(prompt_lengths.max() - prompt_lengths[short].max()) > 0
    assert torch.equal(trimmed.sequences, mb.sequences[:, cut:]) and not mb.attention_mask[:, :cut].any()
    assert torch.equal(trimmed.action_mask, mb.action_mask) and torch.equal(trimmed.advantages, mb.advantages)

    class Rows:  # the fields compute_logprobs and compute_values read
        def __init__(self, e):
            self.sequences, self.attention_mask, self.num_actions = e.sequences, e.attention_mask, samples.num_actions

    for model in (trainer.actor, trainer.rollout.reference):
        full, short_ = compute_logprobs(model, Rows(mb), 1.0), compute_logprobs(model, Rows(trimmed), 1.0)
        torch.testing.assert_close(short_, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(compute_values(trainer.critic, Rows(trimmed)), compute_values(trainer.critic, Rows(mb)))
