"""The machinery of a run: processes, threads, checkpoints, tracking, health, signals."""
