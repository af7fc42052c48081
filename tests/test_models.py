"""Forwards over response tokens: log-prob gathering, left-padding invariance, EOS cut, score placement."""

from __future__ import annotations

import pytest
import torch

from rlhf.config.schema import TinyModelConfig
from rlhf.core.kl import shape_rewards
from rlhf.core.losses import logprobs_from_logits
from rlhf.models.actions import action_logits
from rlhf.models.critic import action_values, build_critic
from rlhf.models.generation import action_mask_after_eos, encode_prompts, generate
from rlhf.models.loading import load_tokenizer
from rlhf.models.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def actor(tokenizer):
    torch.manual_seed(0)
    model = build_model(TinyModelConfig(hidden_size=32, intermediate_size=64), len(tokenizer), tokenizer)
    return model.eval()


def test_logprobs_match_naive_per_position_log_softmax(actor, tokenizer):
    # One unpadded sequence: prompt of P tokens then A response tokens.
    sequence = torch.tensor(
        [tokenizer("<bos><|user|>12+7=<|assistant|>19<eos>", add_special_tokens=False)["input_ids"]]
    )
    num_actions = 3
    with torch.no_grad():
        fast = logprobs_from_logits(
            action_logits(actor, sequence, torch.ones_like(sequence), num_actions, temperature=0.7),
            sequence[:, -num_actions:],
        )[0]
        logits = actor(input_ids=sequence).logits[0]  # (T, V)
    total = sequence.shape[1]
    naive = []
    for t in range(total - num_actions, total):
        # Token t is predicted by the logits at position t - 1.
        naive.append(torch.log_softmax(logits[t - 1].double() / 0.7, dim=-1)[sequence[0, t]].item())
    assert fast.tolist() == pytest.approx(naive, abs=1e-5)


def test_left_padding_does_not_change_logprobs_or_values(actor, tokenizer):
    critic = build_critic(actor, tokenizer).eval()
    ids = tokenizer("<bos><|user|>3+4=<|assistant|>7<eos>", add_special_tokens=False)["input_ids"]
    plain = torch.tensor([ids])
    padded = torch.tensor([[tokenizer.pad_token_id] * 5 + ids])
    plain_mask = torch.ones_like(plain)
    padded_mask = torch.tensor([[0] * 5 + [1] * len(ids)])
    with torch.no_grad():
        lp_plain = logprobs_from_logits(action_logits(actor, plain, plain_mask, 2, 1.0), plain[:, -2:])
        lp_padded = logprobs_from_logits(action_logits(actor, padded, padded_mask, 2, 1.0), padded[:, -2:])
        v_plain = action_values(critic, plain, plain_mask, 2)
        v_padded = action_values(critic, padded, padded_mask, 2)
    torch.testing.assert_close(lp_padded, lp_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_padded, v_plain, atol=1e-5, rtol=0)


def test_action_mask_includes_first_eos_only():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [2, 9, 9, 9], [5, 6, 7, 8]])
    mask = action_mask_after_eos(responses, eos)
    assert mask.tolist() == [
        [True, True, False, False],  # EOS at 1 is an action; what follows is not
        [True, False, False, False],  # a one-token response that is just EOS
        [True, True, True, True],  # no EOS: truncated, every position is an action
    ]
    del pad


def test_generate_cuts_after_eos_and_places_the_score_on_it(actor, tokenizer):
    torch.manual_seed(0)
    prompts = ["1+2=", "10+11=", "3+3=", "19+19="] * 4
    samples = generate(actor, tokenizer, prompts, max_new_tokens=6, temperature=1.0, max_prompt_length=32)
    responses = samples.sequences[:, -samples.num_actions :]
    assert samples.sequences.shape[1] == samples.attention_mask.shape[1]
    for row in range(len(prompts)):
        n = int(samples.action_mask[row].sum())
        assert samples.action_mask[row, :n].all() and not samples.action_mask[row, n:].any()
        assert (responses[row, n:] == tokenizer.pad_token_id).all()
        is_eos = responses[row, :n] == tokenizer.eos_token_id
        # Either the last action is the only EOS, or there is none and the response was truncated.
        if samples.truncated[row]:
            assert not is_eos.any() and n == samples.num_actions
        else:
            assert is_eos.nonzero().flatten().tolist() == [n - 1]
    # Attention covers real prompt tokens and actions only.
    prompt_width = samples.sequences.shape[1] - samples.num_actions
    assert torch.equal(samples.attention_mask[:, prompt_width:].bool(), samples.action_mask)
    # The score lands on the last action: the EOS, or the last token when truncated.
    scores = torch.arange(1, len(prompts) + 1, dtype=torch.float32)
    rewards = shape_rewards(scores, torch.zeros(samples.action_mask.shape), 0.1, samples.action_mask)
    last = samples.action_mask.sum(dim=1) - 1
    for row in range(len(prompts)):
        assert rewards[row, last[row]] == scores[row]
        assert rewards[row].sum() == scores[row]


def test_prompt_errors_name_the_prompt(tokenizer):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        encode_prompts(tokenizer, ["1+1=", "  "], max_prompt_length=32)
    with pytest.raises(ValueError, match=r"1 prompt\(s\) exceed data.max_prompt_length=8 .* prompt 0"):
        encode_prompts(tokenizer, ["123456789+1=", "1+1="], max_prompt_length=8)


def test_tokenizer_without_pad_token_gets_its_own_or_is_rejected(tmp_path):
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no pad token"):
        load_tokenizer(str(tmp_path), add_pad_token=False)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|pad|>" and loaded.pad_token_id not in (loaded.eos_token_id, loaded.bos_token_id)


def test_eos_stays_an_action_when_pad_equals_eos(actor, tokenizer, tmp_path):
    # A tokenizer that pads with its EOS: masks built from pad ids would drop the EOS; ours must not.
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    same = load_tokenizer(str(tmp_path))
    assert same.pad_token_id == same.eos_token_id
    torch.manual_seed(1)
    # EOS has probability ~0.01 per step under this untrained actor: 64 x 12 steps make a few end.
    samples = generate(actor, same, ["1+2=", "3+4="] * 32, max_new_tokens=12, temperature=1.0, max_prompt_length=32)
    responses = samples.sequences[:, -samples.num_actions :]
    ended = ~samples.truncated
    assert ended.any()
    last = samples.action_mask.sum(dim=1) - 1
    assert (responses[ended, last[ended]] == same.eos_token_id).all()


def test_checkpoint_generation_defaults_do_not_leak_into_sampling(actor, tokenizer, tmp_path):
    # A checkpoint whose generation_config would distort sampling (as Qwen2.5's top_k/top_p/
    # repetition_penalty do): load_actor keeps it (the saved model ships it), sampling ignores it.
    from transformers import GenerationConfig

    from rlhf.models.loading import load_actor

    actor.generation_config = GenerationConfig(do_sample=True, top_k=1, top_p=0.5, repetition_penalty=3.0)
    actor.save_pretrained(tmp_path)
    loaded = load_actor(str(tmp_path), dtype="float32")
    assert loaded.generation_config.top_k == 1
    torch.manual_seed(0)
    samples = generate(loaded, tokenizer, ["1+2="] * 16, max_new_tokens=6, temperature=1.0, max_prompt_length=32)
    # top_k=1 would give the same response to every copy of the prompt.
    assert len(set(samples.responses)) > 1
    assert loaded.generation_config.top_k == 1 and loaded.generation_config.repetition_penalty == 3.0


def test_attn_implementation_reaches_the_actor_and_a_loaded_critic_and_keeps_the_logprobs(actor, tokenizer, tmp_path):
    # model.attn_implementation picks transformers' attention kernel; eager and sdpa compute the same
    # log-probs (to rounding), left padding included.
    from rlhf.models.loading import load_actor

    actor.save_pretrained(tmp_path)
    eager = load_actor(str(tmp_path), dtype="float32", attn_implementation="eager").eval()
    default = load_actor(str(tmp_path), dtype="float32").eval()
    assert eager.config._attn_implementation == "eager" and default.config._attn_implementation == "sdpa"
    critic = build_critic(eager, tokenizer, init="path", path=str(tmp_path))
    assert critic.backbone.config._attn_implementation == "eager"
    samples = generate(default, tokenizer, ["1+2=", "10+20="], max_new_tokens=4, temperature=1.0, max_prompt_length=32)
    args = (samples.sequences, samples.attention_mask, samples.action_mask.shape[1], 1.0)
    with torch.no_grad():
        torch.testing.assert_close(action_logits(eager, *args), action_logits(default, *args), rtol=1e-5, atol=1e-5)


def test_inverse_cdf_sampler_draws_each_token_with_its_softmax_probability():
    # Tokens of probability 0 (-inf scores, first and last) are never drawn; the others come at the rate of
    # softmax(scores / T): each frequency within 5 standard errors over 40,000 independent rows.
    from rlhf.models.generation import InverseCdfSampler

    scores = torch.tensor([float("-inf"), 0.0, 1.0, -2.0, float("-inf"), 0.5, -30.0, float("-inf")])
    n, temperature = 40_000, 0.7
    torch.manual_seed(0)
    out = InverseCdfSampler(temperature)(None, scores.expand(n, -1).clone())
    assert ((out == 0).sum(dim=1) == 1).all() and (torch.isinf(out).sum(dim=1) == scores.numel() - 1).all()
    counts = torch.bincount(out.argmax(dim=1), minlength=scores.numel()).double()
    p = torch.softmax(scores.double() / temperature, dim=-1)
    standard_error = (p * (1 - p) / n).sqrt()
    assert counts[torch.isinf(scores)].sum() == 0
    assert ((counts / n - p).abs() <= 5 * standard_error + 1e-12).all(), (counts / n, p)


def test_generate_samples_the_first_token_from_the_actors_softmax(actor, tokenizer):
    # End to end through generate(): the first response token of 4,000 copies of one prompt, against the
    # actor's own softmax at temperature 0.2 (each token's frequency within 5 standard errors).
    n, temperature = 4_000, 0.2
    torch.manual_seed(3)
    samples = generate(actor, tokenizer, ["1+2="] * n, max_new_tokens=1, temperature=temperature, max_prompt_length=32)
    first = samples.sequences[:, -1]
    with torch.no_grad():
        logits = actor(input_ids=samples.sequences[:1, :-1]).logits[0, -1]  # (V,): the prompt is unpadded
    p = torch.softmax(logits.double() / temperature, dim=-1)
    freq = torch.bincount(first, minlength=p.numel()).double() / n
    standard_error = (p * (1 - p) / n).sqrt()
    assert len(first.unique()) > 10  # it samples: greedy would give one token
    assert ((freq - p).abs() <= 5 * standard_error + 2 / n).all(), ((freq - p).abs().max(), p.max())


def test_inverse_cdf_sampler_refuses_non_finite_logits_naming_the_response():
    from rlhf.models.generation import InverseCdfSampler

    scores = torch.zeros(3, 5)
    scores[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not finite .* responses \[1\]"):
        InverseCdfSampler(1.0)(None, scores)
