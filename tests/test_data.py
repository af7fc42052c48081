"""Prompt data from files through `datasets`: formats, columns, splits, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.app.build import build_trainer
from rlhf.data.prompts import fit_prompt_lengths, load_prompts, read_prompt_column
from rlhf.models.loading import load_tokenizer
from rlhf.models.tiny import build_tokenizer
from tests.helpers import compose

PROMPTS = [f"{a}+{b}=" for a in range(6) for b in range(6)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def tokenizer(tmp_path):
    build_tokenizer().save_pretrained(tmp_path / "tok")
    return load_tokenizer(str(tmp_path / "tok"))


def test_jsonl_parquet_and_csv_give_the_same_prompts(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"question": PROMPTS, "id": range(len(PROMPTS))})
    jsonl = write_jsonl(tmp_path / "p.jsonl", frame.to_dict("records"))
    frame.to_parquet(tmp_path / "p.parquet")
    frame.to_csv(tmp_path / "p.csv", index=False)
    cache = str(tmp_path / "cache")
    for path in (jsonl, tmp_path / "p.parquet", tmp_path / "p.csv"):
        assert read_prompt_column(str(path), prompt_key="question", split="train", cache_dir=cache) == PROMPTS


def test_hold_out_or_eval_file(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p} for p in PROMPTS])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    base = ["data=dataset", f"data.path={train_file}", f"data.cache_dir={tmp_path / 'cache'}"]
    train, held_out = load_prompts(compose([*base, "data.num_eval=6"]).data)
    assert len(held_out) == 6 and len(train) == 30 and sorted(train + held_out) == sorted(PROMPTS)
    train, held_out = load_prompts(compose([*base, f"data.eval_path={eval_file}", "data.eval_split=train"]).data)
    assert train == PROMPTS and held_out == ["1+1=", "2+2="]


def test_wrong_column_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "hi"}])
    with pytest.raises(ValueError, match=r"data.prompt_key='prompt' is not a column of .*\['text'\]"):
        read_prompt_column(str(path), prompt_key="prompt", split="train", cache_dir=str(tmp_path / "cache"))


def test_empty_prompt_names_its_index_and_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}, {"prompt": "1+2="}, {"prompt": "   "}])
    with pytest.raises(ValueError, match=r"prompt 2 of .*p.jsonl.* is empty"):
        read_prompt_column(str(path), prompt_key="prompt", split="train", cache_dir=str(tmp_path / "cache"))


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match=r"data.path=.*broken.parquet.* could not be read"):
        read_prompt_column(str(path), prompt_key="prompt", split="train", cache_dir=str(tmp_path / "cache"))


def test_overlong_prompts_error_filter_or_truncate(tokenizer):
    # Template adds <bos><|user|> ... <|assistant|>: 3 tokens; one character is one token.
    prompts = ["1+1=", "123456789+987654321=", "2+2=", "99999+1="]
    with pytest.raises(ValueError, match=r"2 training prompt\(s\) exceed data.max_prompt_length=10 .* prompt 1 \(23"):
        fit_prompt_lengths(tokenizer, prompts, max_length=10, policy="error", name="training")
    assert fit_prompt_lengths(tokenizer, prompts, max_length=10, policy="filter", name="training") == ["1+1=", "2+2="]
    truncated = fit_prompt_lengths(tokenizer, prompts, max_length=10, policy="truncate", name="training")
    assert truncated == ["1+1=", "654321=", "2+2=", "9999+1="]  # the last 10 - 3 = 7 tokens of each are kept


def test_training_on_prompts_from_a_file(make_cfg, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"question": p} for p in PROMPTS])
    cfg = make_cfg(
        "data=dataset", f"data.path={path}", "data.prompt_key=question", "data.num_eval=4",
        "data.max_prompt_length=32", f"data.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    trainer, train_prompts, eval_prompts = build_trainer(cfg)
    assert set(train_prompts) | set(eval_prompts) == set(PROMPTS)
    result = trainer.step(train_prompts[:8])
    metrics = result.metrics
    assert set(result.samples.prompts) <= set(PROMPTS)
    assert 0.0 <= metrics["objective/scores"] <= 1.0


def test_truncate_cuts_non_ascii_prompts_within_the_limit(tmp_path):
    # Byte-level BPE (Qwen2's): "é" is two tokens; a cut between them decodes to U+FFFD, three bytes that
    # re-encode longer than the cut, so the kept end must be measured again after decoding.
    from tests.stand_ins import save_tiny_qwen

    tokenizer = load_tokenizer(str(save_tiny_qwen(tmp_path / "qwen")))
    prompts = ["Quelle est la différence entre l'été et l'hiver ? Réponds en français, s'il te plaît.",
               "日本の首都はどこですか？東京ですか、それとも京都ですか？", "Short?"]  # fmt: skip
    for limit in range(30, 60):
        fitted = fit_prompt_lengths(tokenizer, prompts, max_length=limit, policy="truncate", name="training")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in fitted]  # fmt: skip
        lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        assert max(lengths) <= limit, (limit, fitted)
        for prompt, kept in zip(prompts, fitted, strict=True):
            assert "\ufffd" not in kept and prompt.endswith(kept) and kept.strip()


def test_max_prompt_length_below_the_template_says_so(tokenizer):
    # The tiny template takes 3 tokens (<bos><|user|> ... <|assistant|>): 3 leaves no room for the prompt.
    for policy in ("error", "filter", "truncate"):
        with pytest.raises(ValueError, match=r"^data.max_prompt_length=3 leaves no room for a prompt: the chat "
                           r"template alone takes 3 tokens"):  # fmt: skip
            fit_prompt_lengths(tokenizer, ["1+1=", "2+2="], max_length=3, policy=policy, name="training")


def test_unreadable_eval_folder_names_eval_path_and_eval_split(tmp_path):
    # A folder of one file is one split, "train"; data.eval_split defaults to "test".
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": p} for p in PROMPTS])
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval" / "prompts.jsonl", [{"prompt": "1+1="}])
    overrides = ["data=dataset", f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'eval'}",
                 f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    with pytest.raises(ValueError, match=r"^data.eval_path='.*eval' \(split 'test'\) could not be read: .*eval_split"):
        load_prompts(compose(overrides).data)
    _, held_out = load_prompts(compose([*overrides, "data.eval_split=train"]).data)
    assert held_out == ["1+1="]
