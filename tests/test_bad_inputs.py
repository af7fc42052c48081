"""Bad overrides and inputs fail fast, before any model is loaded, with a message naming the key,
file or sample and what is allowed. Every bad override of the suite is one row of ``CASES``, run the
way a user meets it: through ``python train.py`` where Hydra or the command line refuses it, else
through compose and ``build_trainer``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

import rlhf.app.build
import rlhf.rewards.scorers
from rlhf.app.build import build_trainer, resolve_actor_paths
from rlhf.config.redact import loggable_config
from rlhf.config.validate import validate
from rlhf.runtime.checkpoint import find_resume_checkpoint, save_checkpoint
from tests.helpers import REPO, compose, short_run
from tests.stand_ins import save_tiny_qwen


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")

    def jsonl(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / name

    ok = [{"prompt": f"{a}+{a}="} for a in range(10)]
    (root / "broken.parquet").write_bytes(b"not parquet at all")
    return {
        "good": jsonl("good.jsonl", ok),
        "long": jsonl("long.jsonl", [*ok[:3], {"prompt": "1" * 200 + "+1="}, *ok[3:]]),
        "broken": root / "broken.parquet",
        "no_pad": save_tiny_qwen(root / "qwen-no-pad", pad_token=None),
        "cache": root / "datasets-cache",
    }


def dataset(files, name, *extra):
    return ["data=dataset", f"data.path={files[name]}", "data.num_eval=2", f"data.cache_dir={files['cache']}", *extra]


# How a case is met. CLI: ``python train.py <overrides>``, for what Hydra composes or the command line
# refuses before Hydra (wrong types, unknown keys) and for issue 14's refusals (accepted on a6a65ff, or
# refused only after the models loaded); ~0.3 s each, torch is never imported. BUILD: compose, then
# ``build_trainer`` in this process with every model load refused: validation and the file and model
# checks, which must all come before a model is loaded.
CLI, BUILD = "cli", "build"
SCHEMA = "the schema is rlhf.config.schema.TrainConfig"  # named by every unknown-key refusal

# (overrides, what the error must say, how it is run). A bad override is tested here and nowhere else;
# bad prompt files that need their own set-up are in tests/test_input_errors.py (an empty prompt refused
# before torch is imported, the one-line error of a file found too long by the tokenizer). `@name`
# entries are files made by the `files` fixture.
CASES = [
    # wrong types: refused while Hydra composes the config
    (["kl.beta=abc"], "kl.beta", CLI),
    (["gae.lam=high"], "gae.lam", CLI),
    (["ppo.epochs=1.5"], "ppo.epochs", CLI),
    (["rollout.batch_size=many"], "rollout.batch_size", CLI),
    # unknown keys, with or without the + or ++ that Hydra's own error hint suggests, and misspelt options:
    # refused before Hydra with a did-you-mean (Hydra itself answers `kl.betta=1` with "use +kl.betta=1")
    (["kl.betta=1"], "kl.betta=1 is not allowed: unknown key (" + SCHEMA + "); did you mean kl.beta?", CLI),
    (["+kl.betta=0.5"], "kl.betta=0.5 is not allowed: unknown key (" + SCHEMA + "); did you mean kl.beta?", CLI),
    (["++kl.betta=0.5"], "kl.betta=0.5 is not allowed: unknown key (" + SCHEMA + "); did you mean kl.beta?", CLI),
    (["+ppo.clip=0.1"], "ppo.clip=0.1 is not allowed: unknown key (" + SCHEMA + "); did you mean ppo.clip_eps?", CLI),
    (["+kl.clip_eps=0.1"], "(" + SCHEMA + "); did you mean ppo.clip_eps?", CLI),  # a key of another group
    (["+model.tiny.layers=4"], "model.tiny.layers=4 is not allowed: unknown key", CLI),
    (["+sead=1"], "sead=1 is not allowed: unknown key (" + SCHEMA + "); did you mean seed?", CLI),
    (
        ["kl=adaptve"],
        "kl='adaptve' is not allowed: no such option of the config group kl: did you mean kl=adaptive?",
        CLI,
    ),
    (
        ["-m", "kl=fixed,adaptve"],  # a misspelt option in a sweep's list
        "kl='adaptve' is not allowed: no such option of the config group kl: did you mean kl=adaptive?",
        CLI,
    ),
    # non-finite floats, anywhere in the config
    (["kl.beta=inf"], "kl.beta=inf is not allowed: must be a finite number", CLI),
    (["ppo.clip_eps=inf"], "ppo.clip_eps=inf is not allowed: must be a finite number", CLI),
    (["ppo.vf_coef=inf"], "ppo.vf_coef=inf is not allowed: must be a finite number", CLI),
    (["reward.gain=nan"], "reward.gain=nan is not allowed: must be a finite number", CLI),
    (["gae.lam=nan"], "gae.lam=nan is not allowed: must be a finite number", BUILD),
    # optimizer and scheduler arguments, by name, before torch builds them
    (["optimizer.actor.lr=nan"], "optimizer.actor.lr=nan is not allowed: must be a finite number", CLI),
    (["optimizer.actor.lr=-1"], "optimizer.actor.lr=-1 is not allowed: must be > 0", CLI),
    (["optimizer.critic.lr=0"], "optimizer.critic.lr=0 is not allowed: must be > 0", BUILD),
    (["optimizer.critic.eps=0"], "optimizer.critic.eps=0 is not allowed: must be > 0", BUILD),
    (["optimizer.actor.weight_decay=-0.1"], "optimizer.actor.weight_decay=-0.1 is not allowed: must be >= 0", BUILD),
    (["+optimizer.critic.betas=[0.9,1.0]"], "optimizer.critic.betas[1]=1.0 is not allowed: must be in [0, 1)", BUILD),
    (["optimizer.actor.lr=fast"], "optimizer.actor.lr='fast' is not allowed: must be a number", BUILD),
    (["optimizer.scheduler.end_factor=2"], "optimizer.scheduler.end_factor=2 is not allowed: must be in [0, 1]", CLI),
    (
        ["optimizer.scheduler.start_factor=0"],
        "optimizer.scheduler.start_factor=0 is not allowed: must be in (0, 1]",
        BUILD,
    ),
    (
        ["optimizer.scheduler.total_iters=-1"],
        "optimizer.scheduler.total_iters=-1 is not allowed: must be a whole",
        BUILD,
    ),
    # sizes far above real use (a memory or time bomb), and the seed range
    (["data.max_operand=100000"], "data.max_operand=100000 is not allowed: must be <= 999", CLI),
    (["rollout.batch_size=100000"], "rollout.batch_size=100000 is not allowed: must be <= 65536", BUILD),
    (["rollout.max_new_tokens=1000000"], "rollout.max_new_tokens=1000000 is not allowed: must be <= 131072", BUILD),
    (["model.tiny.hidden_size=65536"], "model.tiny.hidden_size=65536 is not allowed: must be <= 4096", BUILD),
    (["model.tiny.num_hidden_layers=1000"], "model.tiny.num_hidden_layers=1000 is not allowed: must be <= 64", BUILD),
    (
        ["model.tiny.intermediate_size=1000000"],
        "model.tiny.intermediate_size=1000000 is not allowed: must be <= 16384",
        BUILD,
    ),
    (
        ["data=dataset", "data.path=some/hub-dataset", "data.num_eval=1000000"],
        "data.num_eval=1000000 is not allowed",
        BUILD,
    ),
    (["seed=-1"], "seed=-1 is not allowed: must be in [0, 2**32 - 1]", CLI),
    (["seed=4294967296"], "seed=4294967296 is not allowed: must be in [0, 2**32 - 1]", BUILD),
    # out-of-range values and relations: rlhf.config.validate
    (["gae.lam=1.5"], "gae.lam=1.5 is not allowed: must be in [0, 1]", CLI),
    (["gae.gamma=-0.1"], "gae.gamma=-0.1 is not allowed: must be in [0, 1]", BUILD),
    (["ppo.clip_eps=0"], "ppo.clip_eps=0.0 is not allowed: must be > 0", BUILD),
    (["kl.beta=-1"], "kl.beta=-1.0 is not allowed: must be >= 0", BUILD),
    (["ppo.epochs=0"], "ppo.epochs=0 is not allowed: must be > 0", BUILD),
    (["ppo.minibatch_size=5"], "ppo.minibatch_size=5 is not allowed: must divide rollout.batch_size=8", BUILD),
    (["kl.estimator=k4"], "kl.estimator='k4' is not allowed: one of k1, k2, k3", BUILD),
    (["kl.controller=pid"], "kl.controller='pid' is not allowed: one of fixed, adaptive", BUILD),
    (["kl=adaptive", "kl.target=null"], "kl.target=None is not allowed", BUILD),
    (["rollout.temperature=0"], "rollout.temperature=0.0 is not allowed", BUILD),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens=0 is not allowed", BUILD),
    (["ppo.vf_coef=-1"], "ppo.vf_coef=-1.0 is not allowed", BUILD),
    (["ppo.value_clip_eps=0"], "ppo.value_clip_eps=0.0 is not allowed", BUILD),
    (["gae.advantage_clip=0"], "gae.advantage_clip=0.0 is not allowed", BUILD),
    # advantage estimators (issue 19): group methods need several samples per prompt, and no critic to share
    (["advantage=grpo", "rollout.n=1"], "rollout.n=1 is not allowed: advantage.estimator=grpo compares", CLI),
    (["advantage=rloo"], "rollout.n=1 is not allowed: advantage.estimator=rloo compares samples", BUILD),
    (
        ["advantage.estimator=ppo2"],
        "advantage.estimator='ppo2' is not allowed: one of gae, grpo, rloo, reinforce_pp, remax",
        BUILD,
    ),
    (["advantage=remax", "model.shared_critic=true"], "model.shared_critic=True is not allowed", BUILD),
    (["gae.lam_critic=2"], "gae.lam_critic=2.0 is not allowed: must be in [0, 1]", BUILD),
    (["gae.lam_adaptive_alpha=0"], "gae.lam_adaptive_alpha=0.0 is not allowed: must be > 0", BUILD),
    (["rollout.n=0"], "rollout.n=0 is not allowed: must be > 0", BUILD),
    (["rollout.n=100000"], "rollout.n=100000 is not allowed: must be <= 4096", BUILD),
    (
        ["rollout.n=3", "ppo.minibatch_size=16"],
        "ppo.minibatch_size=16 is not allowed: must divide rollout.batch_size * rollout.n=24",
        BUILD,
    ),
    (["model.dtype=int8"], "model.dtype='int8' is not allowed: one of float32, bfloat16, float16", BUILD),
    (
        ["model.attn_implementation=flash3"],
        "model.attn_implementation='flash3' is not allowed: one of eager, sdpa, flex_attention, flash_attention_2",
        BUILD,
    ),
    (["hardware.device=tpu"], "hardware.device='tpu' is not allowed: one of cpu, cuda", BUILD),
    # a wrong type: Hydra's own composition error, naming the override (exit 1, no run dir)
    (["hardware.keep_freed_memory=maybe"], "Error merging override hardware.keep_freed_memory=maybe", CLI),
    (
        ["hardware.distributed=zero9"],
        "hardware.distributed='zero9' is not allowed: one of none, ddp, fsdp, deepspeed",
        BUILD,
    ),
    (
        ["hardware=deepspeed_zero2", "hardware.zero_stage=1"],
        "hardware.zero_stage=1 is not allowed: one of 2, 3",
        BUILD,
    ),
    (
        ["hardware.parallel_models=true", "model.shared_critic=true"],
        "hardware.parallel_models=True is not allowed: a critic sharing the actor's trunk (model.shared_critic=true)",
        BUILD,
    ),
    (
        ["hardware=fsdp_cpu", "hardware.parallel_models=true"],
        "hardware.distributed='fsdp' is not allowed: runs one",
        BUILD,
    ),
    (
        ["hardware=ddp_cpu", "model.shared_critic=true"],
        "hardware.distributed='ddp' is not allowed: needs a critic",
        BUILD,
    ),
    (["logging.wandb.mode=cloud"], "logging.wandb.mode='cloud' is not allowed", BUILD),
    (["trainer.steps=-1"], "trainer.steps=-1 is not allowed", BUILD),
    (["data.num_eval=0"], "data.num_eval=0 is not allowed", BUILD),
    (["data.overlong=cut"], "data.overlong='cut' is not allowed: one of error, filter, truncate", BUILD),
    (["reward.kind=oracle"], "reward.kind='oracle' is not allowed: one of function, model, http", BUILD),
    (["reward.clip=-1"], "reward.clip=-1.0 is not allowed", BUILD),
    (
        ["advantage=rloo", "rollout.n=2", "ppo.critic_warmup_steps=3"],
        "ppo.critic_warmup_steps=3 is not allowed: trains the critic alone, and advantage=rloo has none",
        BUILD,
    ),
    (["reward=proxy"], "reward.kind='proxy' is not allowed: reward.kind=proxy is the reviews task's learned", BUILD),
    (
        ["experiment=overoptimization", "model.path=/models/actor"],
        "model.path='/models/actor' is not allowed: reward.kind=proxy learns from the tiny actor's samples",
        BUILD,
    ),
    (
        ["experiment=overoptimization", "reward.proxy.hidden_size=40"],
        "reward.proxy.hidden_size=40 is not allowed: must be a positive multiple of 16",
        BUILD,
    ),
    (["experiment=overoptimization", "reward.proxy.num_pairs=5"], "reward.proxy.num_pairs=5 is not allowed", CLI),
    (["experiment=overoptimization", "reward.proxy.label_noise=-1"], "reward.proxy.label_noise=-1.0 is not", BUILD),
    (["data=reviews", "data.num_eval=5000"], "data.num_eval=5000 is not allowed: must be in [1, 600]", BUILD),
    # the testbed's gold scores reviews: on arithmetic prompts every score would be a silent -1
    (["reward=gold"], "reward.fn._target_='rlhf.tasks.reviews.gold_reward' is not allowed: reward=gold is", BUILD),
    # shorter than the shortest sentence: every response that writes anything is cut (data=reviews alone
    # keeps the arithmetic task's 4 new tokens)
    (["data=reviews", "reward=gold"], "rollout.max_new_tokens=4 is not allowed: must be >= 6 on the reviews", BUILD),
    # sizes of the proxy reward model three zeros too large: memory exhausted, or hours of building
    (["experiment=overoptimization", "reward.proxy.hidden_size=100000"], "reward.proxy.hidden_size=100000", BUILD),
    (["experiment=overoptimization", "reward.proxy.num_layers=1000"], "must be <= 64 (built on the CPU", BUILD),
    (["experiment=overoptimization", "reward.proxy.epochs=1000000"], "reward.proxy.epochs=1000000 is not", BUILD),
    (
        ["reward=classifier", "reward.path=x", "reward.input_format=text"],
        "reward.input_format='text' is not allowed: one of pair, chat",
        BUILD,
    ),
    (["model.lora.enabled=true"], "model.shared_critic=False is not allowed: model.lora.enabled=true", BUILD),
    (["model.critic_init=path"], "model.critic_path=None is not allowed: model.critic_init=path needs a path", BUILD),
    (
        ["model.critic_init=encoder"],
        "model.critic_init='encoder' is not allowed: one of actor, reward_model, path",
        BUILD,
    ),
    (
        ["model.critic_init=reward_model"],
        "model.critic_init='reward_model' is not allowed: critic_init=reward_model needs reward.kind=model",
        BUILD,
    ),
    (
        ["model.shared_critic=true", "reward=classifier", "reward.path=x", "model.critic_init=reward_model"],
        "model.critic_init='reward_model' is not allowed: a shared critic (model.shared_critic=true) uses the actor's",
        BUILD,
    ),
    (["model.value_head_std=-1"], "model.value_head_std=-1.0 is not allowed: must be >= 0", BUILD),
    (["reward=http"], "reward.url", BUILD),
    (["reward.on_nonfinite=ignore"], "reward.on_nonfinite='ignore' is not allowed: one of error, mask", BUILD),
    (["ppo.max_consecutive_skips=0"], "ppo.max_consecutive_skips=0 is not allowed: must be > 0", BUILD),
    # issue 19's PPO knobs
    (["ppo.dual_clip_c=0.5"], "ppo.dual_clip_c=0.5 is not allowed: must be null (off) or > 1", BUILD),
    (["kl.mode=penalty"], "kl.mode='penalty' is not allowed: one of reward, loss", CLI),
    (
        ["ppo.loss_agg=mean"],
        "ppo.loss_agg='mean' is not allowed: one of token_mean, seq_mean_token_mean, seq_mean_token_sum",
        BUILD,
    ),
    (["ppo.clip_eps_high=-1"], "ppo.clip_eps_high=-1.0 is not allowed: must be > 0", BUILD),
    (["ppo.clip_eps_low=0"], "ppo.clip_eps_low=0.0 is not allowed: must be > 0", BUILD),
    (["ppo.critic_warmup_steps=-1"], "ppo.critic_warmup_steps=-1 is not allowed: must be >= 0", BUILD),
    (
        ["ppo.critic_warmup_steps=2", "model.shared_critic=true"],
        "ppo.critic_warmup_steps=2 is not allowed: trains the critic alone, which needs its own trunk",
        CLI,
    ),
    (["trainer.resume=maybe"], "trainer.resume='maybe' is not allowed: one of auto, true, false", BUILD),
    (["trainer.save_every=-1"], "trainer.save_every=-1 is not allowed: must be >= 0", BUILD),
    (["trainer.keep_last=0"], "trainer.keep_last=0 is not allowed: must be > 0", BUILD),
    (
        ["data=dataset", "data.path=/no/such/prompts.jsonl"],
        "data.path='/no/such/prompts.jsonl' is not allowed: no such file",
        BUILD,
    ),
    # files, models and samples: checked after validation, before any model is loaded
    (["@broken"], "could not be read", BUILD),
    (["@good", "data.prompt_key=question"], "data.prompt_key='question' is not a column", BUILD),
    (["@long", "data.max_prompt_length=32"], "1 training prompt(s) exceed data.max_prompt_length=32", BUILD),
    (["data.max_prompt_length=100", "rollout.max_new_tokens=64"], "= 164 tokens exceeds the context", BUILD),
    (["model.path=/no/such/model"], "model.path='/no/such/model' could not be loaded", BUILD),
    (["@no_pad_model", "model.add_pad_token=false"], "has no pad token", BUILD),
    (["reward=classifier", "reward.path=/no/such/rm"], "reward.path='/no/such/rm' could not be loaded", BUILD),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(rlhf.app.build, "load_actor", refuse)
    monkeypatch.setattr(rlhf.rewards.scorers.AutoModelForSequenceClassification, "from_pretrained", refuse)


def expand(overrides, files):
    out = []
    for o in overrides:
        if o == "@no_pad_model":
            out.append(f"model.path={files['no_pad']}")
        elif o.startswith("@"):
            out += dataset(files, o[1:])
        else:
            out.append(o)
    return out


def cases(via: str) -> list:
    """The table's cases met ``via`` one way, as pytest params named by their overrides."""
    return [
        pytest.param(overrides, message, id=" ".join(overrides)) for overrides, message, how in CASES if how == via
    ]


@pytest.mark.parametrize(("overrides", "message"), cases(BUILD))
def test_bad_input_fails_before_any_model_loads_naming_it(make_cfg, files, no_model_loads, overrides, message):
    resolve_actor_paths(make_cfg())  # the built-in tiny actor is cached, as on any second run
    started = time.perf_counter()
    with pytest.raises((ValueError, ConfigCompositionException, OmegaConfBaseException)) as info:
        cfg = make_cfg(*expand(overrides, files))
        validate(cfg)  # as train() does before it builds the run
        build_trainer(cfg)
    elapsed = time.perf_counter() - started
    text = str(info.value) + str(info.value.__cause__ or "")
    assert message in text, text
    assert elapsed < 5.0, elapsed


@pytest.mark.parametrize(("overrides", "message"), cases(CLI))
def test_bad_override_is_refused_by_train_py_naming_it(tmp_path, tiny_cache, overrides, message):
    result, seconds, run_dir = short_run(tmp_path, tiny_cache, *overrides)
    # Timed for the record (-s shows it); speed is the business of where validation runs, not asserted.
    print(f"{' '.join(overrides)}: exit {result.returncode} after {seconds:.1f} s")
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "wandb").exists()
    if result.returncode == 1:  # Hydra's own composition error (a wrong type), before any run dir is made
        assert not run_dir.exists()
        return
    # The project's refusal: exit code 2, one line, and status.json failed if Hydra had made the run dir.
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: "), line
    if "unknown key" in line or "no such option" in line:  # the did-you-mean check in train.py, before Hydra
        assert not run_dir.exists(), "refused only after Hydra made the run dir"
    if run_dir.exists():
        status = json.loads((run_dir / "status.json").read_text())
        assert status == {"status": "failed", "error": "ConfigError: " + line.removeprefix("error: ")}


def test_command_line_target_outside_the_allow_list_is_refused(tmp_path):
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "train.py", "reward.fn._target_=os.system", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "reward.fn._target_='os.system' is not allowed" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    assert time.perf_counter() - started < 60
    assert Path(tmp_path).exists()


# A short run, as the task's commands give it (S).
QUIET = ["logging.wandb.mode=disabled", "logging.progress_bar=false"]


def train_py(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", *overrides, *QUIET]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


# (overrides of the run that saved the checkpoint, of the run resuming from it, the change refused or None)
SCHEDULE_LENGTH_CHANGES = [
    # total_iters follows trainer.steps (its default ${trainer.steps}): re-planned over the new total
    (["trainer.steps=2"], ["trainer.steps=3"], None),
    # set explicitly to another length on resume: the LR would reach 0 at step 1 of a 3-step run
    (["trainer.steps=2"], ["trainer.steps=3", "optimizer.scheduler.total_iters=1"], "total_iters: 2 -> 1"),
    # set explicitly in the checkpoint's run: its scheduler state holds that length, not the new one
    (["trainer.steps=4", "optimizer.scheduler.total_iters=2"], ["trainer.steps=4"], "total_iters: 2 -> 4"),
]


@pytest.mark.parametrize(("saved", "resumed", "refused"), SCHEDULE_LENGTH_CHANGES)
def test_resume_allows_a_new_schedule_length_only_while_it_follows_trainer_steps(tmp_path, saved, resumed, refused):
    config_yaml = yaml.safe_dump(loggable_config(compose(saved)), sort_keys=False)
    save_checkpoint(tmp_path / "checkpoints", 2, weights={}, state={}, config_yaml=config_yaml, keep_last=2)
    cfg = compose([*resumed, "trainer.resume=true"])
    if refused is None:
        assert find_resume_checkpoint(cfg, tmp_path) is not None
    else:
        with pytest.raises(ValueError, match=rf"changed config: optimizer\.scheduler\.{re.escape(refused)}"):
            find_resume_checkpoint(cfg, tmp_path)


@pytest.mark.slow
def test_an_explicit_schedule_length_changed_on_resume_is_refused_from_the_command_line(tmp_path, tiny_cache):
    common = ["rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=1", f"model.cache_dir={tiny_cache}"]
    first = train_py("trainer.steps=2", *common, f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = train_py("trainer.steps=3", "optimizer.scheduler.total_iters=1", *common, f"hydra.run.dir={tmp_path}")
    assert resumed.returncode != 0
    assert "changed config: optimizer.scheduler.total_iters: 2 -> 1" in resumed.stderr, resumed.stderr[-2000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # steps 0-2: nothing trained after
