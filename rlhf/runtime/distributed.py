"""The processes of a run: rank, world size, and the few collectives the loop needs.

One process (``hardware.distributed=none``) is the same object with nothing to communicate.
Several processes are launched by ``torchrun`` or ``accelerate launch``; accelerate's
``Accelerator`` joins the process group (gloo on CPU, NCCL on GPUs). Then the trained models are
either

- ``ddp``: replicated, and wrapped in DistributedDataParallel, which averages their gradients over
  the ranks in the backward pass;
- ``fsdp``: sharded with torch's FSDP2 (``fully_shard``): each rank holds 1/N of the actor's and
  the critic's parameters, gradients and optimizer state; a forward gathers each transformer block's
  parameters in turn, and the backward averages the gradients over the ranks and leaves each rank
  its shard; or
- ``deepspeed``: each in a DeepSpeed ZeRO engine, which shards the gradients and optimizer state
  (stage 2) and the parameters too (stage 3), and runs backward, clipping and the step; a step with
  a non-finite gradient is skipped by the engine on every rank.

With sharded parameters (FSDP, ZeRO-3) every forward is a collective: the ranks run the same number
of them (generation with ``synced_gpus``), and checkpoints gather the full weights on rank 0. The
frozen reference and reward models stay whole on every rank.

Data parallelism here: each rank samples its own share of the rollout with its own seed and runs its
own forwards; the rollouts are then gathered, so that every rank holds the global batch and computes
the same experience (reward normalisation, KL, GAE, whitening: exactly the one-process math on the
global batch). Each PPO mini-batch is the same global one on every rank, and each rank runs forward
and backward on its share of its rows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from rlhf.config.schema import DISTRIBUTED_KINDS

# What DeepSpeed logs (on its "DeepSpeed" logger, to stdout) when it is imported on a machine without GPUs.
DEEPSPEED_DETECTION = "Setting accelerator to"


class _NoAcceleratorDetection(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DEEPSPEED_DETECTION)


def quiet_deepspeed_detection() -> None:
    """Drop DeepSpeed's accelerator-detection line, for runs that do not use DeepSpeed.

    Installed DeepSpeed is imported by transformers' ``save_pretrained`` (through accelerate's
    ``extract_model_from_parallel``, which checks for DeepSpeed engines) and then logs "Setting
    accelerator to CPU..." although nothing uses it. Only that message of that logger is dropped; the
    filter set on the logger before DeepSpeed creates it stays on it."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoAcceleratorDetection) for f in logger.filters):
        logger.addFilter(_NoAcceleratorDetection())


ENGINE_TAG = "zero"  # the sub-folder of a DeepSpeed engine's checkpoint


def deepspeed_config(
    zero_stage: int, minibatch_size: int, max_grad_norm: float, dtype: str, persistence_threshold: int
) -> dict:
    """The DeepSpeed config of the actor's and the critic's engines: ZeRO ``zero_stage``, gradients
    clipped to ``max_grad_norm`` (ppo.max_grad_norm), bf16/fp16 mixed precision (float32 master
    weights and optimizer state) when the models are in that ``dtype``. ``minibatch_size`` is
    ppo.minibatch_size (DeepSpeed's micro-batch; the loop feeds the engines itself)."""
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": minibatch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # optimizer.actor / optimizer.critic: a torch optimizer
        "steps_per_print": 2**31 - 1,  # the loop logs its own metrics
    }


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


class Distributed:
    """Rank, world size and collectives; ``Distributed()`` is the single process."""

    def __init__(self, accelerator=None, kind: str = "none", deepspeed_config: dict | None = None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world_size = accelerator.num_processes if accelerator else 1
        # One process has nothing to distribute, whatever hardware.distributed says.
        self.kind = kind if self.world_size > 1 else "none"
        self.deepspeed_config = deepspeed_config
        zero_stage = (deepspeed_config or {}).get("zero_optimization", {}).get("stage")
        # The trained models' parameters are sharded over the ranks: each forward is a collective.
        self.sharded = self.kind == "fsdp" or (self.kind == "deepspeed" and zero_stage == 3)

    @classmethod
    def launch(cls, kind: str, device: str, deepspeed_config: dict | None = None) -> Distributed:
        """The run's processes for ``hardware.distributed``: launched by torchrun or accelerate launch
        unless ``none``; ``deepspeed_config`` (see ``deepspeed_config``) for ``deepspeed``."""
        if kind not in DISTRIBUTED_KINDS:
            raise ValueError(f"hardware.distributed={kind!r}: expected one of {', '.join(DISTRIBUTED_KINDS)}")
        if kind != "deepspeed":
            quiet_deepspeed_detection()
        if kind == "none":
            return cls()
        if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                "hardware.distributed=deepspeed needs DeepSpeed, which is not installed: pip install 'rlhf[deepspeed]'"
            )
        from accelerate import Accelerator

        # cpu=True is what makes accelerate use gloo on CPU processes; without it, launched CPU ranks
        # would each run alone (seen with accelerate 1.15). DeepSpeed joins the process group
        # accelerate made.
        return cls(Accelerator(cpu=device == "cpu"), kind, deepspeed_config)

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run dir: metrics, W&B, checkpoints and the saved model."""
        return self.rank == 0

    def shard_parameters(self, model: nn.Module) -> None:
        """With FSDP, shard ``model`` in place (before its optimizer is built on its parameters): each
        transformer block (``fsdp_blocks``) is one unit gathered at a time, and the remaining
        parameters (embeddings, final norm, heads) are the root's unit."""
        if self.kind != "fsdp":
            return
        from torch.distributed.fsdp import fully_shard

        blocks = fsdp_blocks(model)
        if not blocks:
            raise ValueError(
                f"hardware.distributed=fsdp: found no transformer blocks to shard in {type(model).__name__}"
            )
        for block in blocks:
            fully_shard(block)
        fully_shard(model)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """The module that training forwards go through: DistributedDataParallel with ``ddp``, a
        DeepSpeed engine (which then owns ``optimizer``) with ``deepspeed``, the (sharded) model
        itself otherwise."""
        if self.kind == "ddp":
            return self.accelerator.prepare_model(model)
        if self.kind == "deepspeed":
            import deepspeed

            # DeepSpeed 0.19 calls torch collectives that torch deprecates, at every step.
            for collective in ("all_gather_into_tensor", "reduce_scatter_tensor"):
                warnings.filterwarnings("ignore", f".*{collective}.* is deprecated", FutureWarning)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.deepspeed_config)
            return engine
        return model

    def backward_and_step(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: torch.Tensor,
        clip: dict[str, list[nn.Parameter]],
        max_norm: float,
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Backward of ``loss``, the gradient norm of each group in ``clip`` clipped to ``max_norm``,
        and the optimizer step unless the loss or a norm is not finite on some rank (then the step
        is skipped on every rank, the parameters and the optimizer state left as they were).
        Returns the norms before clipping and whether the step was taken. ``module`` is the one
        from ``wrap``: a DeepSpeed engine does all of this itself (``gradient_clipping`` in its
        config), over its one group."""
        if self.kind == "deepspeed":
            module.backward(loss)
            module.step()
            (group,) = clip
            return {group: torch.tensor(float(module.get_global_grad_norm()))}, module.was_step_applied()
        loss.backward()
        norms = {group: replicated(nn.utils.clip_grad_norm_(params, max_norm)) for group, params in clip.items()}
        finite = all(torch.isfinite(value) for value in (loss, *norms.values()))
        stepped = self.all(finite)  # one decision for every rank
        if stepped:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
        return norms, stepped

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full weights on rank 0 (a collective with sharded parameters, whose other
        ranks get ``{}``)."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.sharded:  # ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if self.is_main else {}
        return model.state_dict()

    def load_state_dict(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load full weights (every rank passes all of them; with FSDP each keeps its shard). A
        DeepSpeed engine loads its own checkpoint instead (``load_engine``)."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        elif self.kind == "deepspeed":
            raise RuntimeError("a DeepSpeed engine's weights are loaded by load_engine")
        else:
            model.load_state_dict(weights)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's state on rank 0, whole (with FSDP: keyed by parameter name; other ranks
        get ``{}``); None with DeepSpeed, whose engines save their shards themselves (``save_engine``)."""
        if self.kind == "deepspeed":
            return None
        if self.kind != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a state from ``optimizer_state_dict`` (every rank passes all of it)."""
        if self.kind == "deepspeed":
            return
        if state is None:
            raise ValueError(
                "the checkpoint's optimizer state is in its DeepSpeed engines' folder: resume with "
                "hardware.distributed=deepspeed"
            )
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, state, options=options)

    def save_engine(self, engine: nn.Module, folder: Path) -> None:
        """A DeepSpeed engine's checkpoint in ``folder``: weights, and each rank's shard of the
        optimizer state (with its float32 master weights), written by every rank (a collective)."""
        engine.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False)
        self.barrier()

    def load_engine(self, engine: nn.Module, folder: Path) -> None:
        """Load what ``save_engine`` wrote (every rank its own shard)."""
        engine.load_checkpoint(str(folder), tag=ENGINE_TAG, load_lr_scheduler_states=False)

    def shard(self, items):
        """This rank's contiguous share of a global list or tensor (even when the length does not
        divide): concatenated in rank order, the shares are the whole."""
        n, world = len(items), self.world_size
        return items[n * self.rank // world : n * (self.rank + 1) // world]

    def gather(
        self, tensor: torch.Tensor, dim: int = 1, pad_value: float = 0, pad_first: bool = False
    ) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order, padded along ``dim`` to the
        longest (on the left with ``pad_first``)."""
        if self.world_size == 1:
            return tensor
        if tensor.dtype == torch.bool:  # padding adds an int to it: gather bytes, so every rank sends one dtype
            return self.gather(tensor.to(torch.uint8), dim, int(pad_value), pad_first).bool()
        if tensor.dim() > dim:
            tensor = self.accelerator.pad_across_processes(tensor, dim=dim, pad_index=pad_value, pad_first=pad_first)
        return self.accelerator.gather(tensor.contiguous())

    def gather_objects(self, items: list) -> list:
        """Every rank's list concatenated in rank order."""
        if self.world_size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device, copy=True), reduction="sum").cpu()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (the same keys on every rank)."""
        if self.world_size == 1:
            return values
        keys = sorted(values)
        stacked = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, stacked.tolist(), strict=True)}

    def all(self, flag: bool) -> bool:
        """True on every rank when it is True on every rank: one decision for all."""
        return bool(self.sum(torch.tensor([int(not flag)])).item() == 0)

    def max(self, value: float) -> float:
        """The largest of the ranks' values, on every rank."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor.item()

    def main_first(self) -> contextlib.AbstractContextManager:
        """Rank 0 runs the block first, the other ranks after it (a cache that rank 0 fills)."""
        return self.accelerator.main_process_first() if self.world_size > 1 else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the value of a DTensor that is the same on every rank (e.g. the gradient norm
    of sharded parameters), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
