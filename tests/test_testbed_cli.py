"""The learned-reward testbed met as a careless user or a crash meets it: a proxy cache entry cut short,
damaged or unwritable, a prompt length refused before minutes of proxy building, and ``rlhf.generate``
on a testbed run. One testbed run (``testbed_run``) builds the tiny actor and the proxy for the session;
damage is done to copies."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config.errors import ConfigError
from rlhf.tasks import reviews
from tests.helpers import REPO, TESTBED, compose


@pytest.fixture(scope="module")
def built(testbed_run, tiny_cache) -> dict:
    """The session's testbed run and what it built: its run dir, config, actor paths, training prompts
    and proxy folder."""
    from rlhf.app.tasks import resolve_actor_paths
    from rlhf.data.prompts import load_prompts

    run_dir, result = testbed_run
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = compose([*TESTBED, f"model.cache_dir={tiny_cache}"])
    actor, tokenizer = resolve_actor_paths(cfg)
    (proxy,) = tiny_cache.glob("proxy-*")
    return {
        "run_dir": run_dir,
        "actor": actor,
        "tokenizer": tokenizer,
        "train_prompts": load_prompts(cfg.data)[0],
        "proxy": proxy,
    }


def ensure_in(built: dict, cache: Path) -> tuple[str, dict]:
    """``ensure_proxy`` of the testbed's config with ``cache`` as the model cache (the actor stays where
    the session built it)."""
    from rlhf.app.proxy import ensure_proxy

    cfg = compose([*TESTBED, f"model.cache_dir={cache}"])
    return ensure_proxy(
        cfg, actor_path=built["actor"], tokenizer_path=built["tokenizer"], train_prompts=built["train_prompts"]
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate_weights(entry: Path) -> None:
    weights = entry / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


DAMAGE = {
    "model deleted": lambda entry: shutil.rmtree(entry / "model"),
    "weights cut short": truncate_weights,
    "figures garbled": lambda entry: (entry / "proxy.json").write_text("{"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_proxy_entry_is_built_again_not_loaded(built, tmp_path, damage):
    entry = tmp_path / built["proxy"].name
    shutil.copytree(built["proxy"], entry)
    DAMAGE[damage](entry)
    path, figures = ensure_in(built, tmp_path)
    assert path == str(entry / "model") and figures["proxy/num_pairs"] == 100
    assert files_of(entry) == files_of(built["proxy"])  # the build is deterministic: the same entry again
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # the damaged one and the staging are gone


def test_a_build_cut_short_leaves_nothing_behind(built, tmp_path, monkeypatch):
    import rlhf.app.proxy

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGTERM/SIGINT raise during the build (rlhf.runtime.signals.stop_at_once)

    monkeypatch.setattr(rlhf.app.proxy, "train_reward_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_in(built, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_is_named_before_any_pair_is_sampled(built, tmp_path, monkeypatch):
    import rlhf.app.proxy

    def refuse(*args, **kwargs):
        raise AssertionError("pairs were sampled before the cache was found unwritable")

    monkeypatch.setattr(rlhf.app.proxy, "sample_pairs", refuse)
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")  # as unwritable as a read-only mount, even for root
    with pytest.raises(ConfigError, match=r"model.cache_dir='.*a-file' is not allowed: the proxy reward model is"):
        ensure_in(built, not_a_dir)


def test_a_prompt_length_too_small_fails_before_the_proxy_is_built(built, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copytree(Path(built["actor"]).parent, cache / Path(built["actor"]).parent.name)
    result = subprocess.run(
        [sys.executable, "train.py", *TESTBED, "reward.proxy.num_pairs=120", "data.max_prompt_length=5"]
        + [f"model.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "exceed data.max_prompt_length=5" in result.stderr.strip().splitlines()[-1]
    assert not list(cache.glob("*proxy-*")), "the proxy was built before the prompts were checked"


def test_generate_scores_a_testbed_run_with_its_proxy(built):
    """README's "Use the trained model" on a run trained against the proxy: its reward is rebuilt from the
    run's config, the proxy found in the run's model cache."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = subprocess.run(
        [sys.executable, "-m", "rlhf.generate", str(built["run_dir"]), "the food was good .", "--greedy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header, line = result.stdout.strip().splitlines()
    assert header == "prompt\tresponse\tscore"
    prompt, response, score = line.split("\t")
    # Read with the run's own word-level tokenizer, the tiny actor's greedy review is well-formed (not the
    # spaceless text of the tokenizer that AutoTokenizer makes of model/ beside a Qwen2 config.json).
    assert reviews.well_formed_rate([ast.literal_eval(prompt)], [ast.literal_eval(response)]) == [1.0], response
    model = AutoModelForSequenceClassification.from_pretrained(built["proxy"] / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(built["proxy"] / "model")
    encoded = tokenizer(ast.literal_eval(prompt), ast.literal_eval(response), return_tensors="pt")
    assert float(score) == pytest.approx(model(**encoded).logits[0, 0].item(), abs=1e-3)
