"""The PPO algorithm: experience, the trainer's step and update, and its metrics."""
