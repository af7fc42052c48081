"""Reward-model training (``python -m rlhf.reward_model``): a tiny DeBERTa classifier learns which response
of a generated pair holds a marker word, its saved folder scores through the PPO run's reward interface
exactly as through ``transformers``, and bad pair files stop the run with one ``error:`` line (exit 2)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf.config.errors import InputError
from rlhf.data.pairs import hh_pair, load_rows, split_pairs, to_pairs
from tests.stand_ins import save_tiny_deberta_reward_model

REPO = Path(__file__).resolve().parents[1]
MARKER = "good"  # in every chosen response, in no rejected one: a tiny model learns it in seconds
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "it", "is", "and", "red", "sun"]


def write_pairs(path: Path, n: int = 160, seed: int = 0) -> Path:
    """``n`` rows {prompt, chosen, rejected}: the same random filler words, the chosen one with MARKER."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=4)) + "?"
        filler = rng.choices(WORDS, k=5)
        chosen = filler[:]
        chosen.insert(rng.randrange(6), MARKER)
        rows.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(filler)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-rm")
    return save_tiny_deberta_reward_model(root / "rm", root / "spm-work")


def run_rm(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rlhf.reward_model", f"hydra.run.dir={run_dir}", "logging.progress_bar=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([*command, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_rm) -> tuple[Path, subprocess.CompletedProcess, Path]:
    """(run dir, result, pair file) of one command-line training run on the generated pairs."""
    root = tmp_path_factory.mktemp("rm-run")
    pairs = write_pairs(root / "pairs.jsonl")
    result = run_rm(
        root / "run",
        f"model.path={tiny_rm}",
        f"data.path={pairs}",
        f"data.cache_dir={root / 'hf'}",
        "epochs=4",
        "batch_size=16",
        "lr=3e-3",
        "eval_every=10",
        "data.eval_fraction=0.2",
        "max_length=64",
        "center=true",
        "logging.wandb.mode=offline",
    )
    return root / "run", result, pairs


def test_training_learns_the_marker_and_saves_a_folder(trained):
    run_dir, result, _ = trained
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Step 0: the untrained model's held-out figures; then 4 epochs x 8 steps of 16 of the 128 training pairs.
    assert [row["step"] for row in rows] == list(range(33))
    assert all({"loss/bt", "train/accuracy", "train/margin", "train/score_std"} <= set(row) for row in rows[1:])
    evals = [row for row in rows if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [0, 10, 20, 30, 32]
    assert all({"eval/loss", "eval/margin", "eval/score_std"} <= set(row) for row in evals)
    assert max(row["eval/accuracy"] for row in evals) >= 0.8  # chance is 0.5
    assert rows[-1]["loss/bt"] < rows[1]["loss/bt"] and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model" / "tokenizer_config.json").is_file()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert list((run_dir / "wandb").glob("offline-run-*"))


def classifier_reward(folder: Path, *, batch_size: int, input_format: str) -> DictConfig:
    """The reward config of a PPO run that scores with the saved folder (``reward=classifier``)."""
    return OmegaConf.create(
        {
            "kind": "model",
            "path": str(folder),
            "max_length": 64,
            "batch_size": batch_size,
            "dtype": "float32",
            "input_format": input_format,
        }
    )


def test_the_saved_folder_scores_through_build_reward_as_through_transformers(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.rewards.scorers import build_reward

    run_dir, result, pairs_path = trained
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir / "model"
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()][:12]
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    reward_cfg = classifier_reward(folder, batch_size=24, input_format="pair")
    via_ppo = build_reward(reward_cfg, torch.device("cpu"))(prompts, responses)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        batch = tokenizer(prompts, responses, padding=True, truncation=True, max_length=64, return_tensors="pt")
        direct = model(**batch).logits[:, 0]
    torch.testing.assert_close(via_ppo, direct, rtol=0, atol=1e-6)
    assert (via_ppo[:12] > via_ppo[12:]).float().mean() >= 0.8  # the model it scores is the trained one


def test_center_makes_the_mean_score_on_the_training_pairs_zero(trained):
    from rlhf.rewards.scorers import ClassifierReward

    run_dir, result, pairs_path = trained
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    train, _ = split_pairs(to_pairs(rows, str(pairs_path)), eval_fraction=0.2, seed=0)  # the run's split
    reward = ClassifierReward(str(run_dir / "model"), max_length=64, batch_size=64, device=torch.device("cpu"))
    scores = reward([p for p, _, _ in train] * 2, [c for _, c, _ in train] + [r for _, _, r in train])
    # The shift was measured, and after it the mean is 0 up to float32 rounding (scores spread by ~2).
    assert abs(status["center/shift"]) > 1e-3
    assert abs(scores.mean().item()) < 1e-4 < scores.std().item()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "p", "chosen": "a"}], "row 0: missing column(s) ['rejected']"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "x", "rejected": "x"}], "row 1"),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "p", "chosen": "", "rejected": "b"}],
            "row 2",
        ),
        (None, "the file is empty"),
    ],
    ids=["missing-column", "identical-pair", "empty-response", "empty-file"],
)
def test_bad_pair_files_exit_2_naming_file_and_row(tmp_path, tiny_rm, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("" if rows is None else "".join(json.dumps(row) + "\n" for row in rows))
    result = run_rm(tmp_path / "run", f"model.path={tiny_rm}", f"data.path={path}", f"data.cache_dir={tmp_path}/hf")
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(path) in error and message in error, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_qwen_rm(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, tokenizer folder): a tiny Qwen2 classifier (a score head without bias) and the
    tiny actor's tokenizer, which has a chat template."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from rlhf.models.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("tiny-qwen-rm")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(root / "model")
    return root / "model", root / "tokenizer"


@pytest.fixture(scope="module")
def tiny_chat_rm(tmp_path_factory, tiny_rm) -> Path:
    """The tiny DeBERTa classifier with a chat template in its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-chat-rm") / "rm"
    shutil.copytree(tiny_rm, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_format_trains_and_scores_through_build_reward_as_through_transformers(tmp_path, tiny_chat_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.rewards.scorers import build_reward

    pairs_path = write_pairs(tmp_path / "pairs.jsonl", n=48)
    result = run_rm(
        tmp_path / "run",
        f"model.path={tiny_chat_rm}",
        f"data.path={pairs_path}",
        f"data.cache_dir={tmp_path / 'hf'}",
        "input_format=chat",
        "max_length=64",
        "batch_size=8",
        "lr=3e-3",
        "logging.wandb.mode=disabled",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "run" / "model"
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()][:6]
    prompts, responses = [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    reward_cfg = classifier_reward(folder, batch_size=5, input_format="chat")
    via_ppo = build_reward(reward_cfg, torch.device("cpu"))(prompts, responses)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(prompts, responses, strict=True)
    ]
    assert texts[0].startswith("[CLS]user: ")  # the template is what the classifier reads
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        direct = model(**batch).logits[:, 0]
    torch.testing.assert_close(via_ppo, direct, rtol=0, atol=1e-6)
    pair_cfg = OmegaConf.merge(reward_cfg, {"input_format": "pair"})
    assert not torch.equal(via_ppo, build_reward(pair_cfg, torch.device("cpu"))(prompts, responses))  # other inputs


def test_a_tokenizer_that_does_not_reload_from_the_folder_is_refused_before_training(tmp_path, tiny_qwen_rm):
    # The tiny actor's tokenizer saved next to a Qwen2 config.json comes back as Qwen2Tokenizer, which
    # drops the spaces: reward.path=<folder> would score other ids than those trained on.
    model_path, tokenizer_path = tiny_qwen_rm
    result = run_rm(
        tmp_path / "run",
        f"model.path={model_path}",
        f"model.tokenizer_path={tokenizer_path}",
        f"data.path={write_pairs(tmp_path / 'pairs.jsonl', n=16)}",
        f"data.cache_dir={tmp_path / 'hf'}",
        "input_format=chat",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "comes back from the saved folder as Qwen2Tokenizer" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_center_needs_a_score_head_with_a_bias(tiny_qwen_rm):
    from transformers import AutoModelForSequenceClassification

    from rlhf.app.reward_model_loop import biased_score_head

    with pytest.raises(InputError, match="Qwen2ForSequenceClassification has no bias; use center=false"):
        biased_score_head(AutoModelForSequenceClassification.from_pretrained(tiny_qwen_rm[0]))


def test_a_hub_name_that_cannot_be_loaded_exits_2_naming_it(tmp_path):
    result = run_rm(tmp_path / "run", "model.path=unused", "data.path=no-such-org/no-such-pairs")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1].startswith(
        "error: data.path='no-such-org/no-such-pairs' could not be loaded"
    )


def test_csv_and_parquet_files_read_as_jsonl(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["p1", "p2"], "chosen": ["good a", "good b"], "rejected": ["a", "b"]})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    frame.to_parquet(tmp_path / "pairs.parquet")
    expected = [("p1", "good a", "a"), ("p2", "good b", "b")]
    for name in ("pairs.csv", "pairs.parquet"):
        rows = load_rows(str(tmp_path / name), cache_dir=str(tmp_path / "hf"))
        assert to_pairs(rows, name) == expected


def test_anthropic_hh_rows_split_into_prompt_and_final_responses():
    head = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke"
    chosen, rejected = head + "\n\nAssistant: Why did the cat sit?", head + "\n\nAssistant:  No."
    assert hh_pair(chosen, rejected) == (head + "\n\nAssistant:", "Why did the cat sit?", "No.")
    assert to_pairs([{"chosen": chosen, "rejected": rejected}], "hh.jsonl") == [
        (head + "\n\nAssistant:", "Why did the cat sit?", "No.")
    ]
    # Different histories before the last assistant turn are no pair.
    with pytest.raises(InputError, match="'hh.jsonl' row 0: not an Anthropic-HH"):
        to_pairs([{"chosen": chosen, "rejected": "\n\nHuman: Other\n\nAssistant: No."}], "hh.jsonl")
    # Same final response after the split: identical.
    with pytest.raises(InputError, match="row 0: chosen and rejected are identical"):
        to_pairs([{"chosen": chosen, "rejected": chosen + " "}], "hh.jsonl")


def test_the_held_out_split_is_seeded_and_disjoint():
    pairs = [(f"p{i}", f"c{i}", f"r{i}") for i in range(20)]
    train, held = split_pairs(pairs, eval_fraction=0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == sorted(pairs)
    assert split_pairs(pairs, eval_fraction=0.25, seed=3) == (train, held)
    assert split_pairs(pairs, eval_fraction=0.25, seed=4) != (train, held)
