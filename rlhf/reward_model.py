"""Train a reward model on preference pairs: ``python -m rlhf.reward_model model.path=DIR data.path=FILE``.

Examples:
    python -m rlhf.reward_model model.path=microsoft/deberta-v3-base data.path=pairs.jsonl
    python -m rlhf.reward_model model.path=DIR data.path=Anthropic/hh-rlhf epochs=1 center=true
    python train.py reward=classifier reward.path=<run dir>/model      # then use it in a PPO run

Command-line overrides that could run code are refused before Hydra builds anything, as for train.py
(rlhf.config.overrides); the config is ``conf/reward_model.yaml`` over ``rlhf.config.reward_model_schema``.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf.app.reward_model import run_reward_model_job
from rlhf.config.overrides import checked_argv
from rlhf.config.reward_model_schema import register_reward_model_configs

register_reward_model_configs()

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reward_model")
def main(cfg: DictConfig) -> float:
    # The best held-out pair accuracy (a sweep objective).
    return run_reward_model_job(cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *checked_argv(sys.argv[1:], train_keys=False)]
    main()
