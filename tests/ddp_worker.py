"""One PPO iteration on fixed samples, run under ``torchrun`` (N ranks) or plain ``python`` (one
process); each rank saves its actor and critic weights to ``OUT/rank<r>.pt``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py \
        OUT CACHE 4 2 hardware=ddp_cpu
    python tests/ddp_worker.py OUT CACHE 8 4 hardware=cpu

Arguments: output dir, tiny-actor cache, rollout.batch_size and ppo.minibatch_size (both per rank),
then overrides: the hardware (ddp_cpu, fsdp_cpu or a deepspeed preset with several ranks) and any
more. The saved weights are the full ones: gathered on rank 0 with sharded parameters, whose other
ranks save none. Every rank (and the single process) samples the same global rollout under one
fixed seed before training, and each trains on its share of it: the runs differ only in how the
work is split.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.app.build import build_trainer  # noqa: E402
from rlhf.data.prompts import PromptSampler  # noqa: E402
from rlhf.ppo.update import parameters_of  # noqa: E402
from tests.helpers import compose, set_test_environment  # noqa: E402

set_test_environment()  # offline, one thread, as in the pytest process (pytest and its conftest.py are not here)


def rows(samples, start: int, end: int):
    """Rows start..end of a rollout (tensors and text) as this rank would have sampled them: prompts
    left-padded to their own longest, responses as long as their own longest, so that the ranks'
    shapes differ and gathering must pad them again."""
    # Optional fields a rollout leaves None (group ids without rollout.n, remax's baseline scores) stay None.
    fields = [
        f.name for f in dataclasses.fields(samples) if f.name != "num_actions" and getattr(samples, f.name) is not None
    ]
    part = dataclasses.replace(samples, **{name: getattr(samples, name)[start:end] for name in fields})
    prompt_mask = part.attention_mask[:, : -part.num_actions]
    first = int(prompt_mask.any(dim=0).int().argmax())  # the first prompt column with a real token
    actions = int(part.action_mask.sum(dim=1).max())  # the longest response of these rows
    last = part.sequences.shape[1] - part.num_actions + actions
    return dataclasses.replace(
        part, sequences=part.sequences[:, first:last], attention_mask=part.attention_mask[:, first:last],
        action_mask=part.action_mask[:, :actions], num_actions=actions,
    )  # fmt: skip


def padded(samples, left: int, right: int, pad_id: int):
    """The same rollout with ``left`` more prompt padding columns and ``right`` more response columns
    that are padding (as a longer response elsewhere in the batch would have left them)."""
    rows_ = samples.sequences.shape[0]
    sequences = torch.cat([
        torch.full((rows_, left), pad_id), samples.sequences, torch.full((rows_, right), pad_id)
    ], dim=1)  # fmt: skip
    mask = samples.attention_mask
    attention_mask = torch.cat([mask.new_zeros(rows_, left), mask, mask.new_zeros(rows_, right)], dim=1)
    action_mask = torch.cat([samples.action_mask, samples.action_mask.new_zeros(rows_, right)], dim=1)
    return dataclasses.replace(
        samples, sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
        num_actions=samples.num_actions + right,
    )  # fmt: skip


def local_numel(param: torch.Tensor) -> int:
    """The elements of ``param`` this rank holds: a DTensor's local shard, ZeRO-3's partition (``ds_tensor``)."""
    if isinstance(param, DTensor):
        return param.to_local().numel()
    return getattr(param, "ds_tensor", param).numel()


def main() -> None:
    out, cache, batch, minibatch, *overrides = sys.argv[1:]
    out, batch, minibatch = Path(out), int(batch), int(minibatch)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = compose([
        f"rollout.batch_size={batch}", f"ppo.minibatch_size={minibatch}", "ppo.epochs=2",
        "trainer.steps=1", "logging.wandb.mode=disabled", "logging.progress_bar=false", f"model.cache_dir={cache}",
        f"trainer.output_dir={out / 'run'}", "kl.beta=0.1", *overrides,
    ])  # fmt: skip
    trainer, train_prompts, _ = build_trainer(cfg)
    dist = trainer.dist
    assert dist.world_size == world, (dist.world_size, world)
    prompts = PromptSampler(train_prompts, batch_size=batch * world, seed=cfg.seed).next_batch()
    torch.manual_seed(1234)  # the same global rollout on every rank, and in the single process
    fixed = trainer.rollout.generate(prompts)
    share = len(prompts) // world
    mine = rows(fixed, dist.rank * share, (dist.rank + 1) * share)
    if world > 1:  # make sure the ranks' shapes differ: rank 0 longer responses, rank 1 longer prompts
        mine = padded(mine, left=dist.rank, right=1 - dist.rank, pad_id=trainer.tokenizer.pad_token_id)
    trainer.rollout.generate = lambda _prompts, do_sample=True: mine
    shapes = dist.gather_objects([(tuple(mine.sequences.shape), mine.num_actions)])
    initial = {name: weight.clone() for name, weight in dist.state_dict(trainer.actor).items()}
    metrics = trainer.step(prompts).metrics
    # the parameters this rank steps: all of them, or its shard (a DTensor's local part; DeepSpeed's
    # flat partitions, which replace the optimizer's own)
    local = sum(map(local_numel, parameters_of(trainer.actor_optimizer)))
    # the actor's weights this rank holds between forwards
    held = sum(map(local_numel, trainer.actor.parameters()))
    torch.save(
        {"actor": dist.state_dict(trainer.actor), "critic": dist.state_dict(trainer.critic), "metrics": metrics,
         "world_size": dist.world_size, "initial": initial, "shapes": shapes, "local_actor_params": local,
         "held_actor_params": held},
        out / f"rank{dist.rank}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    main()
    # Leave the process group before the interpreter exits: its threads torn down at exit instead
    # have aborted a rank now and then ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
