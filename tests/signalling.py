"""An optimizer that signals its own process at chosen steps: a stop signal that lands inside a PPO
epoch at a known point, instead of at whatever moment a timer would hit."""

from __future__ import annotations

import os
import signal

import torch

# "10:SIGTERM,11:SIGTERM": send SIGTERM to this process just before optimizer steps 10 and 11 (counted
# from 1 in this process). Unset: a plain AdamW. An environment variable, not a config key, so that
# the interrupted run and the uninterrupted one have the same config.
ENV = "RLHF_TEST_SIGNALS"
# With several processes: only the process of this rank signals itself (unset: every process).
RANK_ENV = "RLHF_TEST_SIGNALS_RANK"


class SignallingAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.plan = {}
        only = os.environ.get(RANK_ENV)
        plan = os.environ.get(ENV, "") if only in (None, os.environ.get("RANK", "0")) else ""
        for item in filter(None, plan.split(",")):
            at, name = item.split(":")
            self.plan.setdefault(int(at), []).append(getattr(signal, name))

    def step(self, closure=None):
        self.calls += 1
        for signum in self.plan.get(self.calls, []):
            os.kill(os.getpid(), signum)
        return super().step(closure)
