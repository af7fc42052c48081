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


@pytest.mark.slow  # torch.compile of two small kernels, per dtype: ~10 s
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_equal_the_eager_chunks_and_the_float64_reference(dtype):
    # fused=True runs the element-wise work over each chunk as torch.compile'd kernels (large vocabularies)
    for lp_weight, ent_weight in [(1.0, None), (None, 1.0), (0.5, -2.0)]:
        h, weight, b, targets = make_inputs(11, vocab=300, bias=True, dtype=dtype)
        outputs = {}
        for fused in (False, True):
            lp, ent = chunked_logprobs_entropy(
                h, weight, targets, temperature=0.8, chunk_tokens=4, bias=b, fused=fused
            )
            loss = loss_of(lp.double(), ent.double(), lp_weight=lp_weight, ent_weight=ent_weight)
            outputs[fused] = [lp, ent, *grads(loss, [h, weight, b])]
        for eager, fused in zip(outputs[False], outputs[True], strict=True):
            assert eager.dtype == fused.dtype
            torch.testing.assert_close(
                fused.double(), eager.double(), rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2
            )
        if dtype == torch.float32:
            h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, weight, b))
            ref = plain(h64, w64, b64, targets, 0.8)
            want = [*ref, *grads(loss_of(*ref, lp_weight=lp_weight, ent_weight=ent_weight), [h64, w64, b64])]
            for got, expected in zip(outputs[True], want, strict=True):
                torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


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


# --- through a causal LM: rlhf.models.actions.action_logprobs, chunked vs plain ---


def tiny_lm(vocab: int = 50, *, tie: bool = True, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    # float64 weights: the plain path's float32 logits are then the only rounding (~1e-7) between the two
    return Qwen2ForCausalLM(config).double()


def batch(vocab: int = 50, *, num_actions: int = 5):
    gen = torch.Generator().manual_seed(3)
    sequences = torch.randint(1, vocab, (3, 9), generator=gen)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :2] = 0  # left padding
    return sequences, attention_mask, num_actions


def logprobs_and_grads(model, chunk, *, wrapped=None):
    from rlhf.models.actions import action_logprobs

    model.zero_grad()
    lp, ent = action_logprobs(wrapped or model, *batch(), temperature=0.7, logits_chunk_tokens=chunk, entropy=True)
    ((lp * 1.3).sum() - (0.5 * ent).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), grads


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", ["3", "1000"])
def test_action_logprobs_chunked_equal_plain_through_the_model(tie, chunk):
    model = tiny_lm(tie=tie)
    lp, ent, grads = logprobs_and_grads(model, None)
    c_lp, c_ent, c_grads = logprobs_and_grads(model, chunk)
    torch.testing.assert_close(c_lp, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(c_ent, ent, rtol=0, atol=1e-5)
    assert c_grads.keys() == grads.keys()
    # the tied embedding gets both its input-side gradient and the LM head's through W
    assert "model.embed_tokens.weight" in grads and (tie or "lm_head.weight" in grads)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the LM head is back after the call


def test_action_logprobs_chunked_through_lora_and_its_adapter_free_reference():
    from peft import LoraConfig, get_peft_model

    from rlhf.models.actions import action_logprobs, chunk_tokens_for
    from rlhf.models.loading import AdapterDisabledReference

    lora = get_peft_model(tiny_lm(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for module in lora.modules():  # non-zero adapters so that the reference differs from the actor
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    lp, _, grads = logprobs_and_grads(lora, None)
    c_lp, _, c_grads = logprobs_and_grads(lora, "2")
    torch.testing.assert_close(c_lp, lp, rtol=0, atol=1e-5)
    assert grads and all("lora_" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
    reference = AdapterDisabledReference(lora)
    assert chunk_tokens_for(lora, "2") == chunk_tokens_for(reference, "2") == 2  # both on the chunked path
    with torch.no_grad():
        ref, _ = action_logprobs(reference, *batch(), temperature=0.7, logits_chunk_tokens=None)
        c_ref, _ = action_logprobs(reference, *batch(), temperature=0.7, logits_chunk_tokens="2")
    torch.testing.assert_close(c_ref, ref, rtol=0, atol=1e-5)
    assert (ref - lp).abs().max() > 1e-3


def test_action_logprobs_chunked_through_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = tiny_lm(tie=False)
        ddp = DistributedDataParallel(model)
        reduced = []  # the buckets DDP all-reduces: none if the forward bypassed DDP's wrapper

        def count(state, bucket):
            reduced.append(bucket.buffer().numel())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, count)
        lp, _, grads = logprobs_and_grads(model, None, wrapped=ddp)
        plain_reduced, reduced[:] = sum(reduced), []
        for _ in range(2):  # a second forward raises if the first backward left a reduction unfinished
            c_lp, _, c_grads = logprobs_and_grads(model, "4", wrapped=ddp)
        assert sum(reduced) == 2 * plain_reduced == 2 * sum(p.numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(c_lp, lp, rtol=0, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_chunks_large_vocabularies_only_and_unknown_heads_fall_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.models.actions import AUTO_CHUNK_TOKENS, AUTO_MIN_VOCAB, chunk_tokens_for

    small, large = tiny_lm(vocab=50), tiny_lm(vocab=AUTO_MIN_VOCAB)
    assert chunk_tokens_for(small, "auto") == 0  # the tiny models: the plain path, bitwise as before
    assert chunk_tokens_for(large, "auto") == AUTO_CHUNK_TOKENS
    assert chunk_tokens_for(small, "3") == 3
    assert chunk_tokens_for(large, None) == chunk_tokens_for(large, "0") == 0
    # a class whose logits may be more than a linear head (not in PLAIN_HEAD_CLASSES): plain path
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2))
    assert chunk_tokens_for(gpt2, "3") == 0


# --- end to end: python train.py with chunks forced on the tiny model ---


def metrics_of(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two 2-step runs: ~25 s on a loaded machine
def test_train_with_chunks_matches_the_plain_run(tmp_path, tiny_cache):
    from tests.helpers import short_run

    runs = {}
    for name, chunk in [("plain", "0"), ("chunked", "3")]:
        result, _, run_dir = short_run(
            tmp_path / name, tiny_cache, "trainer.steps=2", f"hardware.logits_chunk_tokens={chunk}"
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = metrics_of(run_dir)
    plain, chunked = runs["plain"], runs["chunked"]
    assert len(plain) == len(chunked) >= 2
    for want, got in zip(plain, chunked, strict=True):
        if "policy/ratio_dev_first" in got:
            assert got["policy/ratio_dev_first"] < 1e-6  # experience and update on the same path
        for key in ("objective/kl", "objective/entropy", "policy/entropy", "policy/approx_kl", "loss/policy"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert any("policy/entropy" in row for row in chunked)


@pytest.mark.parametrize("value", ["abc", "-3", "1.5"])
def test_bad_chunk_setting_names_the_key(tmp_path, tiny_cache, value):
    from tests.helpers import short_run

    result, _, _ = short_run(tmp_path, tiny_cache, f"hardware.logits_chunk_tokens={value}")
    assert result.returncode != 0
    assert "hardware.logits_chunk_tokens" in result.stderr and "auto" in result.stderr


@pytest.mark.parametrize(
    "hardware, expected", [("cpu", "auto"), ("ddp_cpu", "auto"), ("fsdp_cpu", None), ("deepspeed_zero2", None)]
)
def test_sharded_backends_keep_the_plain_path(hardware, expected):
    # FSDP shards the LM head and DeepSpeed wraps the model: experience and update both take the plain path
    from rlhf.app.build import ppo_settings
    from tests.helpers import compose

    assert ppo_settings(compose([f"hardware={hardware}"])).logits_chunk_tokens == expected
