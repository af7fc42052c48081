"""The learned-reward testbed: the reviews task's grammar and gold reward (against hand-computed values),
its noisy preferences, the tiny DeBERTa-v2 proxy and its build, and a real command-line run that logs
the gold reward beside the proxy's."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from rlhf.config.validators import REVIEW_PROMPTS, REVIEW_SENTENCE_TOKENS
from rlhf.ppo.metrics import gold_metrics
from rlhf.tasks import reviews
from tests.helpers import REPO, TESTBED, compose, metrics_by_step

SENTIMENT_OF_ONE = 2 * math.tanh(1 / 3)  # one positive word: scale * tanh(1 / saturation)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the food was good .", SENTIMENT_OF_ONE),
        ("i hated the film .", -SENTIMENT_OF_ONE),
        ("the food was very good .", 2 * math.tanh(1.5 / 3)),  # an intensifier counts 1.5
        ("the food was good . the film was good .", 2 * math.tanh(1.5 / 3)),  # the second "good" counts 1/2
        ("the food was good . the film was great .", 2 * math.tanh(2 / 3)),
        ("the food was good . the food was good .", 2 * math.tanh(1.5 / 3) - 0.75),  # a repeated sentence
        ("the food was good . nice nice .", SENTIMENT_OF_ONE - 1),  # an ill-formed sentence counts nothing
        ("the food was good . the film", SENTIMENT_OF_ONE - 1),  # an unfinished tail
        ("it was a old film . " * 1 + "the room was old . the book was old . i saw the plot . i saw the food .", -0.5),
        ("", 0.0),
    ],
)
def test_gold_score_by_hand(text, expected):
    assert reviews.gold_score(text) == pytest.approx(expected, abs=1e-12)


def test_gold_reward_scores_the_prompt_and_response_as_one_review():
    prompts, responses = ["the food was good ."], [" i hated the film . "]
    assert reviews.gold_reward(prompts, responses) == [reviews.gold_score("the food was good . i hated the film .")]
    with pytest.raises(ValueError):
        reviews.gold_reward(prompts, [])


def test_the_corpus_is_well_formed_and_the_prompts_are_split_apart():
    corpus = reviews.make_corpus(num_reviews=2000, seed=0)
    assert reviews.well_formed_rate([p for p, _ in corpus], [c for _, c in corpus]) == [1.0] * 2000
    assert {len(reviews.sentences_of(p)[0]) for p, _ in corpus} == {1}  # the prompt is the first sentence
    words = {w for p, c in corpus for w in f"{p} {c}".split()}
    assert words <= set(reviews.VOCABULARY)
    train, held_out = reviews.split_prompts(num_eval=64, seed=0)
    assert len(held_out) == 64 and not set(train) & set(held_out)
    assert len(set(train)) == len(train) and len(train) + len(held_out) >= REVIEW_PROMPTS  # the validator's bound
    assert reviews.split_prompts(num_eval=64, seed=0) == (train, held_out)
    assert REVIEW_SENTENCE_TOKENS == min(map(len, reviews.TEMPLATES)) + 1  # the validator's shortest sentence and EOS


def test_noisy_preferences_follow_bradley_terry():
    rng = random.Random(0)
    draws = [reviews.prefers_first(1.0, 0.5, noise=0.5, rng=rng) for _ in range(20000)]
    assert sum(draws) / len(draws) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)  # sigmoid(0.5 / 0.5)
    assert all(reviews.prefers_first(0.2, 0.1, noise=0, rng=rng) for _ in range(100))
    assert not any(reviews.prefers_first(-5.0, 5.0, noise=1e-3, rng=rng) for _ in range(100))


def test_gold_metrics_against_numpy_style_pearson():
    gold = torch.tensor([0.0, 1.0, 2.0, 4.0])
    raw = torch.tensor([1.0, 3.0, 2.0, float("nan")])  # the non-finite score is left out of the correlation
    metrics = gold_metrics(gold_scores=gold, raw_scores=raw)
    g, r = [0.0, 1.0, 2.0], [1.0, 3.0, 2.0]
    mg, mr = sum(g) / 3, sum(r) / 3
    cov = sum((a - mg) * (b - mr) for a, b in zip(g, r, strict=True))
    pearson = cov / math.sqrt(sum((a - mg) ** 2 for a in g) * sum((b - mr) ** 2 for b in r))
    assert metrics["objective/proxy_gold_corr"] == pytest.approx(pearson)
    assert metrics["objective/gold_scores"] == pytest.approx(7 / 4)
    constant = gold_metrics(gold_scores=torch.ones(3), raw_scores=torch.tensor([1.0, 2.0, 3.0]))
    assert math.isnan(constant["objective/proxy_gold_corr"])


def test_the_tiny_classifier_has_its_own_tokenizer_without_unknown_pieces(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.models.tiny_classifier import save_tiny_classifier

    texts = [f"{p} {c}" for p, c in reviews.make_corpus(num_reviews=500, seed=0)]
    save_tiny_classifier(tmp_path / "rm", texts=texts, hidden_size=32, num_layers=1, vocab_size=120, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert type(tokenizer).__name__ == "DebertaV2Tokenizer"
    ids = tokenizer(texts[:50])["input_ids"]
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == texts[0]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert model.config.model_type == "deberta-v2" and model.config.num_labels == 1


def test_rescale_multiplies_the_classifier_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.app.proxy import rescale
    from rlhf.models.tiny_classifier import save_tiny_classifier

    texts = [f"{p} {c}" for p, c in reviews.make_corpus(num_reviews=200, seed=0)]
    folder = save_tiny_classifier(tmp_path / "rm", texts=texts, hidden_size=32, num_layers=1, vocab_size=120, seed=0)

    def scores() -> torch.Tensor:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        encoded = AutoTokenizer.from_pretrained(folder)(texts[:6], padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**encoded).logits[:, 0]

    before = scores()
    rescale(folder, 0.25)
    torch.testing.assert_close(scores(), 0.25 * before)


def test_arithmetic_runs_log_no_gold(cli_run):
    run_dir, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(
        key.startswith(("objective/gold", "eval/gold", "proxy/"))
        for row in metrics_by_step(run_dir).values()
        for key in row
    )
    assert "gold" not in result.stdout


def test_a_testbed_run_logs_the_gold_beside_the_proxy(testbed_run, tiny_cache):
    run_dir, result = testbed_run
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "status.json").read_text())["summary"]
    assert f"held-out gold score: {summary['initial/eval_gold_score']:.3f} -> " in result.stdout
    assert "held-out gold" in result.stdout + result.stderr  # the evaluation's log line
    rows = metrics_by_step(run_dir)
    assert rows[0]["proxy/num_pairs"] == 100
    assert 0 <= rows[0]["proxy/eval_accuracy"] <= 1 and 0 <= rows[0]["proxy/gold_accuracy"] <= 1
    assert {"eval/gold_score", "eval/score"} <= rows[0].keys() and "eval/gold_score" in rows[2]
    for step in (1, 2):
        assert {"objective/gold_scores", "objective/proxy_gold_corr"} <= rows[step].keys()
    # Every sample of step 1 is logged (logging.num_samples = rollout.batch_size = 8): the logged gold is
    # the gold reward of those responses, and the logged correlation is theirs with the proxy's scores.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    step_one = [s for s in samples if s["step"] == 1]
    assert len(step_one) == 8
    gold = reviews.gold_reward([s["prompt"] for s in step_one], [s["response"] for s in step_one])
    assert rows[1]["objective/gold_scores"] == pytest.approx(sum(gold) / 8, abs=1e-6)
    proxy = torch.tensor([s["score"] for s in step_one], dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([torch.tensor(gold, dtype=torch.float64), proxy]))[0, 1].item()
    assert rows[1]["objective/proxy_gold_corr"] == pytest.approx(expected, abs=1e-5)


def test_the_proxy_scores_as_transformers_does_and_learned_from_training_prompts_only(testbed_run, tiny_cache):
    """The proxy's folder, loaded by transformers directly, gives the scores the run logged; its pairs
    come from training prompts, never the held-out ones."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, result = testbed_run
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = tiny_cache.glob("proxy-*")
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 100 and all(p["chosen"] != p["rejected"] for p in pairs)
    _, held_out = reviews.split_prompts(num_eval=compose(TESTBED).data.num_eval, seed=0)
    assert not {p["prompt"] for p in pairs} & set(held_out)
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()][:4]
    with torch.no_grad():
        for sample in samples:
            encoded = tokenizer(sample["prompt"], sample["response"], return_tensors="pt")
            assert model(**encoded).logits[0, 0].item() == pytest.approx(sample["score"], abs=1e-5)


def test_the_proxy_is_built_once(testbed_run, tiny_cache):
    from rlhf.app.proxy import ensure_proxy
    from rlhf.app.tasks import resolve_actor_paths
    from rlhf.data.prompts import load_prompts

    assert testbed_run[1].returncode == 0
    (folder,) = tiny_cache.glob("proxy-*")
    built = (folder / "done").stat().st_mtime_ns
    cfg = compose([*TESTBED, f"model.cache_dir={tiny_cache}"])
    actor, tokenizer = resolve_actor_paths(cfg)
    train, _ = load_prompts(cfg.data)
    path, figures = ensure_proxy(cfg, actor_path=actor, tokenizer_path=tokenizer, train_prompts=train)
    assert path == str(folder / "model") and figures["proxy/num_pairs"] == 100
    assert (folder / "done").stat().st_mtime_ns == built and list(tiny_cache.glob("proxy-*")) == [folder]


def test_reward_gold_trains_on_the_gold_itself(tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *TESTBED,
            "reward=gold",
            f"model.cache_dir={tiny_cache}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_by_step(run_dir)
    assert not any(key.startswith("proxy/") for key in rows[0])
    for step in (1, 2):
        assert rows[step]["objective/gold_scores"] == pytest.approx(rows[step]["objective/scores"], abs=1e-6)
    assert rows[2]["eval/gold_score"] == pytest.approx(rows[2]["eval/score"], abs=1e-6)


def test_the_progress_bar_shows_the_gold_where_the_task_has_one():
    from rlhf.app.run import show_progress

    class Bar:
        def set_postfix(self, **figures):
            self.figures = figures

    bar, metrics = Bar(), {"objective/scores": 0.5, "objective/kl": 1.25}
    show_progress(bar, metrics, step=1, steps=2, quiet=False)
    assert bar.figures == {"reward": "0.500", "kl": "1.250"}
    show_progress(bar, {**metrics, "objective/gold_scores": -0.75}, step=1, steps=2, quiet=False)
    assert bar.figures == {"reward": "0.500", "kl": "1.250", "gold": "-0.750"}
