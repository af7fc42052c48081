"""Command-line overrides that would run code are refused before Hydra builds anything (rlhf/overrides.py).

Each refusal goes through ``python train.py`` as a user would type it, with a harmless payload that
leaves a marker file if it ran; the accepted cases are checked on ``check_overrides`` directly, plus
one accepted end-to-end run.
"""

from __future__ import annotations

import base64
import pickle
import sys
from pathlib import Path

import pytest

from tests.helpers import short_run


class _TouchOnLoad:
    """Unpickling this opens ``path`` for writing: the file appears if the pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_refused(tmp_path: Path, tiny_cache: Path, *args: str, names: str) -> None:
    marker = tmp_path / "marker"
    result, elapsed, run_dir = short_run(tmp_path, tiny_cache, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Command-line override refused (nothing was run)" in result.stderr
    assert names in result.stderr, result.stderr
    assert not marker.exists()
    assert not run_dir.exists()  # Hydra never started: no run dir, no model loaded
    assert elapsed < 10, elapsed  # torch is not even imported (~0.5 s measured)


@pytest.fixture
def source(tmp_path) -> str:
    path = tmp_path / "source.txt"
    path.write_text("copied")
    return str(path)


def test_a_pickle_loaded_by_nested_targets_in_a_dict_value_is_refused(tmp_path, tiny_cache):
    payload = base64.b64encode(pickle.dumps(_TouchOnLoad(tmp_path / "marker"))).decode()
    fn = (
        "{_target_:torch.load,_partial_:false,weights_only:false,"
        f"f:{{_target_:io.BytesIO,initial_bytes:{{_target_:base64.b64decode,s:'{payload}'}}}}}}"
    )
    assert_refused(tmp_path, tiny_cache, f"++reward.fn={fn}", names="reward.fn.f.initial_bytes._target_='base64")


def test_a_hydra_callback_is_refused_before_hydra_builds_it(tmp_path, tiny_cache, source):
    override = f"+hydra.callbacks.x={{_target_:shutil.copyfile,src:'{source}',dst:'{tmp_path / 'marker'}'}}"
    assert_refused(tmp_path, tiny_cache, override, names="hydra.callbacks.x._target_='shutil.copyfile' is not allowed")


def test_a_stdlib_function_reached_through_a_project_module_is_refused(tmp_path, tiny_cache, source):
    assert_refused(
        tmp_path,
        tiny_cache,
        "reward.fn._target_=rlhf.runtime.checkpoint.shutil.copyfile",
        "reward.fn._partial_=false",
        f"+reward.fn.src={source}", f"+reward.fn.dst={tmp_path / 'marker'}",
        names="reward.fn._target_='rlhf.runtime.checkpoint.shutil.copyfile' is not allowed",
    )  # fmt: skip


@pytest.mark.parametrize(
    "override", ["+hydra.job.env_set.LD_PRELOAD=/no/such.so", "+hydra.job={env_set:{LD_PRELOAD:x}}"]
)
def test_ld_preload_for_the_job_is_refused(tmp_path, tiny_cache, override):
    assert_refused(tmp_path, tiny_cache, override, names="hydra.job.env_set.LD_PRELOAD is not allowed")


def test_a_config_decoded_from_an_interpolation_is_refused(tmp_path, tiny_cache, source):
    decoded = f"{{_target_: shutil.copyfile, _partial_: false, src: {source}, dst: {tmp_path / 'marker'}}}"
    assert_refused(tmp_path, tiny_cache, f"reward.fn='${{oc.decode:\"{decoded}\"}}'", names="not ${oc.decode:...}")


def test_one_bad_choice_of_a_sweep_refuses_the_whole_sweep(tmp_path, tiny_cache, source):
    good = "{_target_:rlhf.tasks.arithmetic.exact_match_reward,_partial_:true}"
    bad = f"{{_target_:shutil.copyfile,_partial_:false,src:'{source}',dst:'{tmp_path / 'marker'}'}}"
    assert_refused(
        tmp_path, tiny_cache, "-m", f"++reward.fn={good},{bad}", names="reward.fn._target_='shutil.copyfile'"
    )


def test_a_target_inside_a_list_value_is_refused(tmp_path, tiny_cache, source):
    override = f"+reward.fn.extra=[1,{{_target_:shutil.copyfile,src:'{source}',dst:'{tmp_path / 'marker'}'}}]"
    assert_refused(tmp_path, tiny_cache, override, names="reward.fn.extra.1._target_='shutil.copyfile'")


def test_a_logging_handler_factory_is_refused(tmp_path, tiny_cache, source):
    override = rf"+hydra.job_logging.handlers.x={{\(\):shutil.copyfile,src:'{source}',dst:'{tmp_path / 'marker'}'}}"
    assert_refused(tmp_path, tiny_cache, override, names="hydra.job_logging.handlers.x.()='shutil.copyfile'")


def test_a_test_module_needs_the_allow_target_flag(tmp_path, tiny_cache):
    assert_refused(
        tmp_path, tiny_cache, "reward.fn._target_=tests.stand_ins.nan_reward",
        names="reward.fn._target_='tests.stand_ins.nan_reward' is not allowed",
    )  # fmt: skip


@pytest.mark.slow  # two CLI runs; not slow: test_accepted_overrides
def test_allowed_overrides_and_the_flag_run_end_to_end(tmp_path, tiny_cache):
    # --allow-target is taken out of argv before Hydra (which would reject the unknown flag).
    result, _, run_dir = short_run(
        tmp_path, tiny_cache, "--allow-target", "tests.stand_ins", "optimizer.actor._target_=torch.optim.Adam",
        "reward.fn._target_=rlhf.tasks.arithmetic.exact_match_reward", "+hydra.job.env_set.RLHF_UNUSED=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").exists()


def test_accepted_overrides():
    from rlhf.config.overrides import check_overrides

    check_overrides(
        [
            "optimizer.actor._target_=torch.optim.SGD",
            "optimizer.critic={_target_:torch.optim.AdamW,_partial_:true,lr:0.001}",
            "optimizer.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
            "reward.fn._target_=rlhf.tasks.arithmetic.exact_match_reward",
            "hydra.run.dir=outputs/${now:%Y-%m-%d}/${hydra:job.name}",
            "+reward.headers.Authorization='Bearer ${oc.env:REWARD_API_TOKEN}'",
            "optimizer.scheduler.total_iters=${trainer.steps}",
            "kl.beta=0.01,0.1",
            "gae.lam=range(0.9,1.0,0.05)",
            "reward=classifier",
            "hydra/launcher=joblib",
            "+hydra.job.env_set.OMP_NUM_THREADS=${oc.env:THREADS,1}",
            "hydra.job.chdir=${trainer.save_model}",
            "hydra.hydra_logging.loggers.alembic.level=WARNING",
            "~reward.fn._target_",
            "+hydra.sweeper.params={kl.beta:'0.01,0.1'}",
        ]
    )


def test_allow_target_trusts_exactly_that_module():
    from rlhf.config.overrides import OverrideRefused, check_overrides, split_allow_targets

    assert split_allow_targets(["--allow-target", "a.b", "x=1", "--allow-target=c"]) == (["x=1"], ["a.b", "c"])
    with pytest.raises(OverrideRefused, match="give a module name"):
        split_allow_targets(["--allow-target", "tests.stand_ins."])
    check_overrides(["reward.fn._target_=tests.stand_ins.nan_reward"], allowed_modules=["tests.stand_ins"])
    with pytest.raises(OverrideRefused, match="is not allowed"):  # a name boundary, not a string prefix
        check_overrides(["reward.fn._target_=tests.stand_ins.nan_reward"], allowed_modules=["tests.stand"])
    with pytest.raises(OverrideRefused, match="it is math.isnan"):  # imported into the module, defined elsewhere
        check_overrides(["reward.fn._target_=tests.stand_ins.math.isnan"], allowed_modules=["tests.stand_ins"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.fn._target_=rlhf.tasks.arithmetic.random.Random", "it is random.Random"),
        ("optimizer.actor._target_=torch.optim.swa_utils.AveragedModel", "it is torch.optim.swa_utils.AveragedModel"),
        ("reward.fn._target_=rlhf.tasks.no_such_module.f", "could not be imported"),
        (
            "reward.fn._target_=rlhf.rewards.scorers.build_reward",
            "reward.fn._target_='rlhf.rewards.scorers.build_reward' is not",
        ),
        ("reward.fn._target_=${oc.env:TARGET}", "must be one literal dotted path"),
        ("reward.fn._target_=choice(rlhf.tasks.arithmetic.solve,os.system)", "reward.fn._target_='os.system'"),
        ("+hydra.sweeper.params={reward.fn._target_:'os.system'}", "reward.fn._target_='os.system'"),
        ("hydra.sweeper.custom_search_space=os.system", "hydra.sweeper.custom_search_space='os.system'"),
        ("reward.fn='${oc.create:{_target_: os.system}}'", "not ${oc.create:...}"),
        ("+x='${oc.env:A,${oc.decode:B}}'", "not ${oc.decode:...}"),
        ("+hydra={job:{env_set:{PYTHONPATH:/tmp}}}", "hydra.job.env_set.PYTHONPATH is not allowed"),
        ("+hydra.job.env_set.BASH_ENV=/tmp/x", "hydra.job.env_set.BASH_ENV is not allowed"),
        ("hydra.job.env_set=${foo}", "may not reference other keys"),
        ("+hydra.job={env_set:'${hydra:runtime.cwd}'}", "may not reference other keys"),
        ("+hydra.job_logging.handlers.x=${foo}", "may not reference other keys"),
        ("+hydra.hydra_logging.handlers.h.stream=ext://sys.stdout", "logging factories"),
    ],
)
def test_refused_overrides(override, message):
    from rlhf.config.overrides import OverrideRefused, check_overrides

    with pytest.raises(OverrideRefused) as info:
        check_overrides([override])
    assert message in str(info.value), str(info.value)


def test_a_target_outside_the_allowed_packages_is_not_imported():
    # Importing a module runs it: `this` prints the Zen of Python when first imported.
    from rlhf.config.overrides import OverrideRefused, check_overrides

    sys.modules.pop("this", None)
    with pytest.raises(OverrideRefused):
        check_overrides(["reward.fn._target_=this.s"])
    assert "this" not in sys.modules
