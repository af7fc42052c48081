"""Float32 master weights for a model held in bfloat16 (or float16): the optimizer steps float32
copies of the trained parameters, as mixed-precision trainers do (Micikevicius et al. 2018, "Mixed
Precision Training"; Megatron's and DeepSpeed's bf16 optimizers).

A bfloat16 weight has 8 bits of mantissa: an AdamW update smaller than 2^-9 of the weight rounds
away when it is added to the weight itself, so a small learning rate stops learning. Here the
forwards and backwards run on the bfloat16 weights (the fast matmuls: AMX/AVX512-BF16 on CPU), and
``step`` copies their gradients into the float32 masters, runs the inner optimizer (and keeps its
state) in float32, and rounds the masters back into the model's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's settings (lr, betas, ``initial_lr`` of a scheduler...) without its parameters."""
    return {key: value for key, value in group.items() if key != "params"}


class MasterWeights(torch.optim.Optimizer):
    """``optimizer`` (e.g. a ``functools.partial`` of ``torch.optim.AdamW``) on float32 copies of ``params``.

    ``param_groups`` hold the model's own (low-precision) parameters, so gradient clipping, ``zero_grad``
    and the parameter identities the trainer relies on see the model; their settings (the learning rate
    that LR schedulers set) reach the inner optimizer at each ``step`` and ``state_dict``. ``state_dict``
    holds the inner optimizer's state and the masters, so that a resumed run continues from the same
    float32 weights, not from their rounding.
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], optimizer: OptimizerFactory):
        super().__init__(params, defaults={})
        self.masters = [[p.detach().to(torch.float32, copy=True) for p in g["params"]] for g in self.param_groups]
        groups = zip(self.param_groups, self.masters, strict=True)
        self.inner = optimizer([{**hyperparameters(group), "params": masters} for group, masters in groups])
        self._settings_from_inner()  # the inner optimizer's defaults (lr, eps...) for every group
        self.defaults = self.inner.defaults

    def _pairs(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(model parameter, its float32 master) for every parameter."""
        for group, masters in zip(self.param_groups, self.masters, strict=True):
            yield from zip(group["params"], masters, strict=True)

    def _settings_to_inner(self) -> None:
        for group, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update(hyperparameters(group))

    def _settings_from_inner(self) -> None:
        for group, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            group.update(hyperparameters(inner))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Copy the model's gradients to the masters (float32), step them, round them into the model."""
        if closure is not None:
            raise ValueError("MasterWeights.step takes no closure: run the forward and backward before it")
        with_grad = []
        for param, master in self._pairs():
            if param.grad is None:
                master.grad = None  # the inner optimizer skips it, as torch's skips a parameter without one
                continue
            # Only for the step: kept between steps, the float32 gradients would sit through every backward (the
            # peak). Reallocating is cheap when freed memory stays in the process (hardware.keep_freed_memory).
            master.grad = torch.empty_like(master)
            with_grad.append((param.grad, master.grad))
        if with_grad:
            torch._foreach_copy_([master for _, master in with_grad], [grad for grad, _ in with_grad])
        self._settings_to_inner()
        self.inner.step()
        for master in (m for masters in self.masters for m in masters):
            master.grad = None
        pairs = list(self._pairs())
        if pairs:
            # rounds to nearest even
            torch._foreach_copy_([param for param, _ in pairs], [master for _, master in pairs])

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state (with the groups' current settings) and the float32 masters,
        as references (like torch's own ``state_dict``)."""
        self._settings_to_inner()  # a scheduler may have changed the rate since the last step
        return {"optimizer": self.inner.state_dict(), "masters": [m for masters in self.masters for m in masters]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output: the inner state, the masters, and the model's
        weights rounded from them."""
        if set(state_dict) != {"optimizer", "masters"}:
            raise ValueError(
                "the optimizer state was saved without float32 master weights: resume with "
                "optimizer.master_weights=false (or model.dtype as saved)"
            )
        masters = [m for group in self.masters for m in group]
        saved = state_dict["masters"]
        if len(saved) != len(masters) or any(a.shape != b.shape for a, b in zip(saved, masters, strict=True)):
            raise ValueError("the saved float32 master weights do not match the trained parameters")
        self.inner.load_state_dict(state_dict["optimizer"])
        for master, value in zip(masters, saved, strict=True):
            master.copy_(value)
        for param, master in self._pairs():
            param.copy_(master)
        self._settings_from_inner()


def with_master_weights(optimizer: OptimizerFactory) -> Callable[[list[nn.Parameter]], MasterWeights]:
    """A factory like ``optimizer`` (parameters -> optimizer) whose optimizers step float32 masters."""

    def build(params: list[nn.Parameter]) -> MasterWeights:
        return MasterWeights(params, optimizer)

    return build
