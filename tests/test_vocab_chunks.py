"""The chunked LM head + log-softmax (rlhf/core/vocab_chunks.py) equals the plain computation (full logits,
then ``logprobs_from_logits`` and ``entropy_from_logits``) in values and in gradients wrt h, W and b, and
keeps O(N·H + V·H) bytes for the backward pass instead of the plain path's O(N·V)."""

from __future__ import annotations

import pytest
import torch

from rlhf.core.losses import entropy_from_logits, logprobs_from_logits
from rlhf.core.vocab_chunks import chunked_logprobs_entropy


def make_inputs(n: int, *, hidden: int = 8, vocab: int = 13, bias: bool = False, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(vocab, (n,), generator=gen)
    return h, weight, b, targets


def plain(h, weight, b, targets, temperature):
    """The reference: the whole (N, V) logits, then the repo's log-softmax helpers."""
    logits = h @ weight.T + (0 if b is None else b)
    logits = logits / temperature
    return logprobs_from_logits(logits, targets), entropy_from_logits(logits)


def loss_of(logprobs, entropy, *, lp_weight, ent_weight):
    """A scalar with per-row weights on the outputs; a weight of None leaves that output unused (its
    gradient is None in the backward pass)."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(logprobs.shape[0], generator=gen, dtype=logprobs.dtype)
    loss = 0
    if lp_weight is not None:
        loss = loss + (lp_weight * rows * logprobs).sum()
    if ent_weight is not None:
        loss = loss + (ent_weight * rows.flip(0) * entropy).sum()
    return loss


def grads(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("n, chunk", [(10, 3), (10, 1), (10, 10), (10, 64), (1, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lp_weight, ent_weight", [(1.0, None), (None, 1.0), (0.5, -2.0)])
def test_equal_to_plain_in_values_and_gradients(n, chunk, temperature, bias, lp_weight, ent_weight):
    h, weight, b, targets = make_inputs(n, bias=bias)
    lp, ent = chunked_logprobs_entropy(h, weight, targets, temperature=temperature, chunk_tokens=chunk, bias=b)
    ref_lp, ref_ent = plain(h, weight, b, targets, temperature)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-12)
    weights = {"lp_weight": lp_weight, "ent_weight": ent_weight}
    got = grads(loss_of(lp, ent, **weights), [h, weight, b])
    want = grads(loss_of(ref_lp, ref_ent, **weights), [h, weight, b])
    for name, g, w in zip(["h", "W", "b"], got, want, strict=False):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11, msg=f"gradient wrt {name}")


def test_gradcheck_float64():
    h, weight, b, targets = make_inputs(5, hidden=3, vocab=7, bias=True)

    def both(h, weight, b):
        return chunked_logprobs_entropy(h, weight, targets, temperature=0.8, chunk_tokens=2, bias=b)

    assert torch.autograd.gradcheck(both, (h, weight, b))
    assert torch.autograd.gradcheck(lambda h, weight, b: both(h, weight, b)[0], (h, weight, b))
    assert torch.autograd.gradcheck(lambda h, weight, b: both(h, weight, b)[1], (h, weight, b))


def test_float32_inputs_give_float32_outputs_close_to_a_float64_reference():
    h, weight, b, targets = make_inputs(9, bias=True, dtype=torch.float32)
    lp, ent = chunked_logprobs_entropy(h, weight, targets, temperature=0.9, chunk_tokens=4, bias=b)
    assert lp.dtype == ent.dtype == torch.float32
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, weight, b))
    ref_lp, ref_ent = plain(h64, w64, b64, targets, 0.9)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)
    got = grads(loss_of(lp, ent, lp_weight=1.0, ent_weight=0.3), [h, weight, b])
    want = grads(loss_of(ref_lp, ref_ent, lp_weight=1.0, ent_weight=0.3), [h64, w64, b64])
    for g, w, t in zip(got, want, (h, weight, b), strict=True):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-4)


def test_autocast_does_not_lower_the_softmax_precision():
    # under bf16 autocast a float32 head would otherwise run its products in bf16 (~1e-2 off)
    h, weight, _, targets = make_inputs(6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = chunked_logprobs_entropy(h, weight, targets, chunk_tokens=4)
        (lp.sum() + ent.sum()).backward()
    ref_lp, ref_ent = plain(h.detach().double(), weight.detach().double(), None, targets, 1.0)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)
    assert h.grad.dtype == weight.grad.dtype == torch.float32


def test_bfloat16_weights_keep_their_dtype_in_the_gradients():
    h, weight, _, targets = make_inputs(6, dtype=torch.bfloat16)
    lp, ent = chunked_logprobs_entropy(h, weight, targets, chunk_tokens=4)
    assert lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert h.grad.dtype == weight.grad.dtype == torch.bfloat16
    logits = (h.detach() @ weight.detach().T).float()  # the model's bf16 LM head, then float32
    torch.testing.assert_close(lp, logprobs_from_logits(logits, targets), rtol=0, atol=1e-5)


def test_chunk_tokens_must_be_positive():
    h, weight, _, targets = make_inputs(3)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_logprobs_entropy(h, weight, targets, chunk_tokens=0)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages the autograd graph of ``fn()`` saves for its backward pass."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lp, ent = fn()
        loss = lp.sum() + ent.sum()
    loss.backward()
    return sum(storages.values())


def test_saves_hidden_states_and_weight_not_the_logits():
    n, hidden, vocab = 256, 16, 4096
    h, weight, _, targets = make_inputs(n, hidden=hidden, vocab=vocab, dtype=torch.float32)
    chunked = saved_bytes(lambda: chunked_logprobs_entropy(h, weight, targets, chunk_tokens=32))
    full = saved_bytes(lambda: plain(h, weight, None, targets, 1.0))
    inputs = 4 * (n * hidden + vocab * hidden) + 8 * n  # h and W in float32, int64 targets
    assert chunked <= inputs + 4 * n  # + one float32 log-sum-exp per row
    assert full >= 4 * n * vocab  # the plain path keeps (N, V) float32 tensors: 16x more here
