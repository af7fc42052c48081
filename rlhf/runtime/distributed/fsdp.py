"""``hardware.distributed=fsdp``: the trained models sharded with torch's FSDP2 (``fully_shard``).

Each rank holds 1/N of the actor's and the critic's parameters, gradients and optimizer state; a
forward gathers each transformer block's parameters in turn, and the backward averages the
gradients over the ranks and leaves each rank its shard. Every forward is then a collective: the
ranks run the same number of them (generation with ``synced_gpus``), and checkpoints gather the full
weights and optimizer state on rank 0. The frozen reference and reward models stay whole on every
rank.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.runtime.distributed.base import Distributed, whole_optimizer_state


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the modules of the classes its models name in
    ``_no_split_modules`` (transformers' Qwen2, Llama, ...), else the items of each ``ModuleList``
    of one class (the layer stacks of models that name none, such as DeBERTa-v2)."""
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if blocks:
        return blocks
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len({type(x) for x in m}) == 1]
    return [block for stack in stacks for block in stack]


class FSDP(Distributed):
    """Sharded models; full state dicts gathered on rank 0 and scattered back on load."""

    kind = "fsdp"
    sharded = True

    def shard_parameters(self, model: nn.Module) -> None:
        """Shard ``model`` in place (before its optimizer is built on its parameters): each
        transformer block (``fsdp_blocks``) is one unit gathered at a time, and the remaining
        parameters (embeddings, final norm, heads) are the root's unit."""
        from torch.distributed.fsdp import fully_shard

        blocks = fsdp_blocks(model)
        if not blocks:
            raise ValueError(
                f"hardware.distributed=fsdp: found no transformer blocks to shard in {type(model).__name__}"
            )
        for block in blocks:
            fully_shard(block)
        fully_shard(model)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full weights on rank 0 (a collective; the other ranks get ``{}``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load full weights (every rank passes all of them and keeps its shard)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's state on rank 0, whole and keyed by parameter name (other ranks get ``{}``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)

    def load_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None
    ) -> None:
        """Load a state from ``optimizer_state_dict`` (every rank passes all of it and keeps its shard)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, whole_optimizer_state(state), options=options)
