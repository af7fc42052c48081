"""rlhf: Hydra-configured PPO for language models from human-feedback rewards.

Run with ``python train.py`` (see README.md); ``rlhf.app.run.train(cfg)`` is the task function.
"""
