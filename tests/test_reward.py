"""Rewards: the built-in task's scorer, non-finite scores, and the missing-EOS penalty."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.app.build import build_trainer
from rlhf.rewards.normalize import RewardNormalizer, check_finite, checked_scores
from rlhf.rewards.scorers import FunctionReward, HTTPReward
from rlhf.tasks.arithmetic import exact_match_reward, solve, split_prompts


def test_exact_match_reward():
    assert solve("12+7=") == "19"
    assert exact_match_reward(["12+7=", "3+4=", "0+0="], ["19", " 7 ", "00"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not an addition prompt"):
        solve("hello")


def test_split_is_disjoint_and_covers_every_prompt():
    train, held_out = split_prompts(max_operand=9, num_eval=20, seed=3)
    assert len(held_out) == 20 and len(train) == 80
    assert not set(train) & set(held_out)


def test_non_finite_scores_stop_the_step_naming_the_samples():
    check_finite(torch.tensor([0.0, 1.0]), "step 1")
    with pytest.raises(ValueError, match=r"step 7: the reward is not finite for sample\(s\) \[1, 3\]"):
        check_finite(torch.tensor([0.0, math.nan, 1.0, math.inf]), "step 7")


def test_truncated_responses_get_the_missing_eos_penalty_and_masked_nans_stay():
    # Only .truncated is read: a response cut at max_new_tokens (row 1) gets the penalty, its NaN too.
    samples = SimpleNamespace(truncated=torch.tensor([False, True, False, False]))
    scores = torch.tensor([1.0, math.nan, 2.0, math.inf])
    kept = checked_scores(scores, samples, on_nonfinite="mask", missing_eos_penalty=-1.0, where="x")
    assert torch.equal(kept, torch.tensor([1.0, -1.0, 2.0, math.inf]))
    unchanged = checked_scores(scores, samples, on_nonfinite="mask", missing_eos_penalty=None, where="x")
    assert unchanged is scores
    with pytest.raises(ValueError, match=r"step 3: the reward is not finite for sample\(s\) \[1, 3\]"):
        checked_scores(scores, samples, on_nonfinite="error", missing_eos_penalty=-1.0, where="step 3")


def nan_for_second(prompts, responses):
    return [math.nan if i == 1 else 1.0 for i in range(len(prompts))]


def test_nan_reward_fails_before_any_update(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg())
    trainer.rollout.reward = FunctionReward(nan_for_second)
    before = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        trainer.step(train_prompts[:8])
    assert all(torch.equal(before[n], p) for n, p in trainer.actor.named_parameters())


def test_missing_eos_penalty_replaces_truncated_scores(make_cfg):
    # One new token: every response is cut before it can end, except a lone EOS.
    trainer, train_prompts, _ = build_trainer(make_cfg("rollout.max_new_tokens=1", "reward.missing_eos_penalty=-1"))
    samples = trainer.rollout.generate(train_prompts[:8])
    scores = trainer.rollout.score(samples, where="step 1")
    assert samples.truncated.any()
    assert (scores[samples.truncated] == -1).all()
    assert (scores[~samples.truncated] != -1).all()


def test_http_reward_batches_and_retries(server_factory):
    server = server_factory(failures=2)
    reward = HTTPReward(server.url, timeout=5, retries=2, batch_size=2)
    scores = reward(["p1", "p2", "p3"], ["a", "bbb", "cc"])
    assert scores.tolist() == [1.0, 3.0, 2.0]
    # Two failed attempts, then the two batches: ["a", "bbb"] and ["cc"].
    assert [r["responses"] for r in server.requests] == [["a", "bbb"]] * 3 + [["cc"]]
    assert server.requests[-1]["prompts"] == ["p3"]


def test_http_reward_errors_name_the_url(server_factory):
    failing = server_factory(failures=10)
    with pytest.raises(RuntimeError, match=rf"reward.url='{failing.url}' failed 2 time"):
        HTTPReward(failing.url, timeout=5, retries=1, batch_size=8)(["p"], ["a"])
    miscounting = server_factory(wrong_count=True)
    with pytest.raises(RuntimeError, match="returned 2 scores for 1 responses"):
        HTTPReward(miscounting.url, timeout=5, retries=0, batch_size=8)(["p"], ["a"])


def test_training_with_an_http_reward(make_cfg, server_factory):
    server = server_factory()
    trainer, train_prompts, _ = build_trainer(make_cfg("reward=http", f"reward.url={server.url}"))
    result = trainer.step(train_prompts[:8])
    metrics = result.metrics
    assert metrics["objective/scores"] == pytest.approx(sum(len(r) for r in result.samples.responses) / 8)
    assert server.requests[0]["prompts"] == result.samples.prompts


def test_running_normalizer_matches_numpy_over_all_batches():
    import numpy as np

    normalizer = RewardNormalizer("running")
    gen = torch.Generator().manual_seed(0)
    seen = []
    for size in (5, 1, 9):
        batch = 3 + 2 * torch.randn(size, generator=gen)
        seen.append(batch)
        out = normalizer(batch)
        everything = torch.cat(seen).double().numpy()
        expected = (batch.double().numpy() - everything.mean()) / everything.std(ddof=1)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_fixed_normalizer_and_clip():
    out = RewardNormalizer("fixed", gain=2.0, bias=-1.0, clip=2.5)(torch.tensor([0.0, 1.0, 3.0, -4.0]))
    # 2 * [0, 1, 3, -4] - 1 = [-1, 1, 5, -9] -> clipped to [-2.5, 2.5]
    assert out.tolist() == [-1.0, 1.0, 2.5, -2.5]
    assert RewardNormalizer("none")(torch.tensor([7.0])).tolist() == [7.0]


def test_normalized_training_rewards_keep_raw_scores_in_metrics(make_cfg):
    trainer, train_prompts, _ = build_trainer(make_cfg("reward.normalize=fixed", "reward.gain=10", "reward.bias=1"))
    metrics = trainer.step(train_prompts[:8]).metrics
    raw = metrics["objective/scores"]
    assert 0.0 <= raw <= 1.0
    assert metrics["objective/scores_normalized"] == pytest.approx(10 * raw + 1)


def save_qwen_reward_model(path, tokenizer, pad_token_id=None):
    """A tiny Qwen2ForSequenceClassification beside ``tokenizer``, with the given config pad_token_id."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tokenizer.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, num_labels=1, pad_token_id=pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    return path


def test_reward_model_without_a_pad_token_id_scores_padded_batches(tmp_path):
    # A Qwen2 classifier whose config has no pad_token_id (as many converted checkpoints): it scores the
    # last non-pad token, so it needs the tokenizer's pad id to find it in a right-padded batch.
    from rlhf.models.tiny import build_tokenizer
    from rlhf.rewards.scorers import ClassifierReward

    path = save_qwen_reward_model(tmp_path / "rm", build_tokenizer(), pad_token_id=None)
    reward = ClassifierReward(str(path), max_length=64, batch_size=4, device=torch.device("cpu"))
    prompts, responses = ["1+1=", "12+13=", "3+4="], ["2", "25 25 25", "7"]
    batched = reward(prompts, responses)
    alone = torch.cat([reward([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_chat_input_format_renders_the_reward_tokenizers_template(tmp_path):
    from transformers import AutoTokenizer

    from rlhf.rewards.scorers import ClassifierReward
    from tests.stand_ins import save_tiny_qwen

    chat_tokenizer = AutoTokenizer.from_pretrained(save_tiny_qwen(tmp_path / "qwen"))
    path = save_qwen_reward_model(tmp_path / "rm", chat_tokenizer, chat_tokenizer.pad_token_id)
    reward = ClassifierReward(str(path), max_length=64, batch_size=8, device=torch.device("cpu"), input_format="chat")
    seen = []
    reward.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    prompts, responses = ["What is 2+3?", "Say hi."], ["5", "Hi there!"]
    scores = reward(prompts, responses)
    assert torch.isfinite(scores).all()
    for ids, mask, prompt, response in zip(seen[0], reward.encode(prompts, responses)["attention_mask"], prompts,
                                           responses, strict=True):  # fmt: skip
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
        assert ids[mask.bool()].tolist() == chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    # The pair format (the default) reads the same texts as a text pair instead.
    pair = ClassifierReward(str(path), max_length=64, batch_size=8, device=torch.device("cpu"))
    assert pair.encode(prompts, responses)["input_ids"][0].tolist() != seen[0][0].tolist()


def test_chat_input_format_needs_a_chat_template(make_cfg, tmp_path):
    # The seed's DeBERTa reward model has no chat template: the error names the key, before the model loads.
    from tests.stand_ins import save_tiny_deberta_reward_model

    rm = save_tiny_deberta_reward_model(tmp_path / "rm", tmp_path / "work")
    (rm / "model.safetensors").unlink()  # never read: the tokenizer decides first
    cfg = make_cfg("reward=deberta-v3-large-v2", f"reward.path={rm}", "reward.input_format=chat")
    with pytest.raises(ValueError, match=r"^reward.input_format=chat needs a reward-model tokenizer with a chat"):
        build_trainer(cfg)


def test_http_reward_that_is_not_a_number_names_the_url_and_index():
    import http.server
    import json
    import threading

    answers = [[1.0, 2.0], [3.0, None]]  # the second request's second score: response 3 of the call

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            payload = json.dumps({"scores": answers.pop(0)}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    try:
        with pytest.raises(RuntimeError, match=rf"^reward.url='{url}' answered a score that is not a number for "
                           r"response 3: None"):  # fmt: skip
            HTTPReward(url, timeout=5, retries=0, batch_size=2)(["p"] * 4, ["a"] * 4)
    finally:
        server.shutdown()
        server.server_close()


def test_reward_tokenizer_without_a_pad_token_pads_with_its_eos(tmp_path):
    from rlhf.models.tiny import build_tokenizer
    from rlhf.rewards.scorers import ClassifierReward

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    path = save_qwen_reward_model(tmp_path / "rm", tokenizer, pad_token_id=None)
    reward = ClassifierReward(str(path), max_length=64, batch_size=4, device=torch.device("cpu"))
    assert reward.tokenizer.pad_token == tokenizer.eos_token
    prompts, responses = ["1+1=", "12+13="], ["2", "25 25 25"]
    alone = torch.cat([reward([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(reward(prompts, responses), alone, atol=1e-5, rtol=0)
