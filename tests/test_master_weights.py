"""Float32 master weights (optimizer.master_weights) for a bfloat16 model: the masters follow float32
AdamW step for step, an LR schedule reaches them, the state round-trips, and a bf16 run through
``python train.py`` resumes exactly from its checkpoint with the first mini-batch's ratio at 1."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rlhf.models.master_weights import MasterWeights
from tests.helpers import metrics_by_step, resume_cli

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01, foreach=True)


def tiny_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(float32 module whose weights are bfloat16 values, the same module in bfloat16)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16))  # exactly representable: both start from the same weights
    return model, copy.deepcopy(model).to(torch.bfloat16)


def bf16_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(x.to(torch.bfloat16)).float().pow(2).mean().backward()
    optimizer.step()


def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=8)


def test_masters_follow_float32_adamw_given_the_same_gradients():
    reference, model = tiny_pair()
    expected, optimizer = ADAMW(reference.parameters()), MasterWeights(model.parameters(), ADAMW)
    schedulers = [schedule(expected), schedule(optimizer)]  # the decaying rate must reach the inner AdamW
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        bf16_step(model, optimizer, x)
        for ref_param, param in zip(reference.parameters(), model.parameters(), strict=True):
            ref_param.grad = param.grad.float()  # the bf16 backward's gradients, given to float32 AdamW too
        expected.step()
        for scheduler in schedulers:
            scheduler.step()
        masters = optimizer.masters[0]
        assert max((a - b).abs().max().item() for a, b in zip(reference.parameters(), masters, strict=True)) < 1e-6
        # the model's weights are the masters rounded to bfloat16
        assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(model.parameters(), masters, strict=True))
        # the float32 gradients exist only during the step: none sits through the next backward
        assert all(m.grad is None for m in masters)
    assert optimizer.param_groups[0]["lr"] == expected.param_groups[0]["lr"] < 1e-3


def test_updates_below_bfloat16_resolution_are_kept():
    # Weights in [0.5, 1) are 2^-8 apart in bfloat16; lr 1e-5 moves each by ~1e-5, less than half of that:
    # AdamW on the bf16 weights loses every update, the masters add them up.
    plain_model, model = (tiny_pair()[1] for _ in range(2))
    for module in (plain_model, model):
        with torch.no_grad():
            for param in module.parameters():
                param.uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(2))
    start = [p.clone() for p in model.parameters()]
    small = functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0)
    plain, masters = small(plain_model.parameters()), MasterWeights(model.parameters(), small)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        bf16_step(plain_model, plain, x)
        bf16_step(model, masters, x)
    assert all(torch.equal(a, b) for a, b in zip(start, plain_model.parameters(), strict=True))
    assert all(not torch.equal(a.float(), m) for a, m in zip(start, masters.masters[0], strict=True))


def test_state_dict_round_trip_continues_exactly():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    _, model = tiny_pair()
    optimizer = MasterWeights(model.parameters(), ADAMW)
    scheduler = schedule(optimizer)
    for _ in range(3):
        bf16_step(model, optimizer, x)
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    weights = copy.deepcopy(model.state_dict())
    # A fresh model from the bf16 weights alone, then the saved state: what a resume does.
    _, resumed = tiny_pair(seed=1)
    resumed.load_state_dict(weights)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed_optimizer = MasterWeights(resumed.parameters(), ADAMW)
    resumed_scheduler = schedule(resumed_optimizer)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    assert resumed_optimizer.masters[0][0].dtype == torch.float32
    for _ in range(3):
        for m, o, s in ((model, optimizer, scheduler), (resumed, resumed_optimizer, resumed_scheduler)):
            bf16_step(m, o, x)
            s.step()
    assert all(torch.equal(a, b) for a, b in zip(optimizer.masters[0], resumed_optimizer.masters[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True))
    assert optimizer.param_groups[0]["lr"] == resumed_optimizer.param_groups[0]["lr"]


def test_a_state_without_masters_is_refused():
    _, model = tiny_pair()
    optimizer = MasterWeights(model.parameters(), ADAMW)
    with pytest.raises(ValueError, match="optimizer.master_weights=false"):
        optimizer.load_state_dict(ADAMW(model.parameters()).state_dict())


BF16 = ("model.dtype=bfloat16", "ppo.epochs=1")


@pytest.mark.slow
def test_a_bf16_run_resumes_exactly_with_its_float32_masters(tmp_path, tiny_cache):
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = resume_cli(straight, *BF16, "trainer.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    first = resume_cli(split, *BF16, "trainer.steps=1")
    assert first.returncode == 0, first.stderr[-2000:]
    second = resume_cli(split, *BF16, "trainer.steps=2", "trainer.resume=true")
    assert second.returncode == 0, second.stderr[-2000:]
    rows, resumed_rows = metrics_by_step(straight), metrics_by_step(split)
    assert sorted(resumed_rows) == sorted(rows) and resumed_rows[2] == rows[2]  # step 1 of split also evaluates
    for name in ("actor", "critic"):
        final = f"checkpoints/step-00000002/{name}.safetensors"
        weights, resumed = load_file(straight / final), load_file(split / final)
        assert all(torch.equal(weights[key], resumed[key]) for key in weights), name
    # The experience's and the update's forwards are the same bf16 computation: the first mini-batch's ratio is 1.
    assert all(abs(rows[step]["policy/ratio_dev_first"]) < 1e-3 for step in (1, 2))
    # The checkpoint holds bf16 weights and their float32 masters, which keep more bits than the weights.
    checkpoint = straight / "checkpoints" / "step-00000002"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    masters = state["trainer"]["actor_optimizer"]["masters"]
    assert {m.dtype for m in masters} == {torch.float32}
    weights = load_file(checkpoint / "actor.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)  # masters keep more bits
