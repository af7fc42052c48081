"""A PPO update in which rank 1 alone has a non-finite policy loss, run under ``torchrun``: every
rank must skip every actor step (the weights stay as they were) and take every critic step. Each
rank saves its update statistics, and rank 0 the actor's and critic's full weights before and
after, to ``OUT/rank<r>.pt``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/skip_worker.py OUT CACHE hardware=ddp_cpu
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.app.build import build_trainer  # noqa: E402
from rlhf.app.state import trained_models  # noqa: E402
from rlhf.data.prompts import PromptSampler  # noqa: E402
from tests.helpers import compose, set_test_environment  # noqa: E402

set_test_environment()  # offline, one thread, as in the pytest process (pytest and its conftest.py are not here)


def main() -> None:
    out, cache, *overrides = sys.argv[1:]
    out = Path(out)
    cfg = compose([
        "rollout.batch_size=4", "ppo.minibatch_size=2", "ppo.epochs=2", "trainer.steps=10",
        "logging.wandb.mode=disabled", "logging.progress_bar=false", f"model.cache_dir={cache}",
        f"trainer.output_dir={out / 'run'}", *overrides,
    ])  # fmt: skip
    trainer, train_prompts, _ = build_trainer(cfg)
    dist = trainer.dist
    # One step for an experience (of a 10-step schedule: the learning rate stays above 0)
    result = trainer.step(PromptSampler(train_prompts, batch_size=4 * dist.world_size, seed=cfg.seed).next_batch())
    exp = result.experience
    if dist.rank == 1:  # the policy loss of each of rank 1's mini-batches is NaN
        exp.advantages = torch.full_like(exp.advantages, math.nan)
    models = trained_models(trainer)
    before = {name: {k: v.clone() for k, v in dist.state_dict(model).items()} for name, model in models.items()}
    stats = trainer.ppo_update(exp)
    after = {name: dist.state_dict(model) for name, model in models.items()}
    torch.save({"stats": stats, "before": before, "after": after, "world_size": dist.world_size},
               out / f"rank{dist.rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main()
    # Leave the process group before the interpreter exits: its threads torn down at exit instead
    # have aborted a rank now and then ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
