"""Train a language model with PPO from a reward: ``python train.py [overrides]``.

Examples:
    python train.py                                  # the built-in tiny task, offline, on CPU
    python train.py kl.beta=0.05 gae.lam=0.9         # override any key
    python train.py -m kl.beta=0.01,0.1 gae.lam=0.9,0.95   # a Hydra multirun sweep
    torchrun --standalone --nproc_per_node 2 train.py hardware=ddp_cpu hydra.run.dir=outputs/ddp
    python train.py --allow-target my_rewards reward.fn._target_=my_rewards.score   # trust a module

Command-line overrides that could run code (a `_target_` outside rlhf.tasks and torch.optim, a
resolver such as ${oc.decode:...}, hydra.job.env_set.LD_PRELOAD, ...) are refused before Hydra
builds anything: see rlhf/overrides.py.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf.app.job import launch_overrides, run_job
from rlhf.config.overrides import checked_argv
from rlhf.config.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # The sweep objective (final held-out reward - trainer.objective_kl_weight * final KL).
    return run_job(cfg)


if __name__ == "__main__":
    # Before Hydra reads sys.argv: it builds hydra.callbacks and sets hydra.job.env_set before main() runs.
    sys.argv = [sys.argv[0], *checked_argv(sys.argv[1:], conf_dir=Path(__file__).parent / "conf")]
    sys.argv += launch_overrides(sys.argv[1:], os.environ)  # under torchrun / accelerate launch
    main()
