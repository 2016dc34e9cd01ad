"""The distill command in-process: a bad config fails with its field named and exit status 2
before Ray starts (``ensure_ray`` is replaced by a tripwire), whether the schema rejects it at
parse time or the driver's checks (training/checks.py) do in ``run_distill``."""

from __future__ import annotations

import pytest

from linearard_ray.commands.distill import main
from linearard_ray.config import ConfigError, build_config
from linearard_ray.training import driver
from linearard_ray.training.checks import check_config


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    """Fail the test if the driver gets as far as starting Ray; run in an empty directory."""

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started for a config that should have been refused")

    monkeypatch.setattr(driver, "ensure_ray", tripwire)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse and the config parser exit directly
        return e.code


@pytest.mark.parametrize(
    "args,field",
    [
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "train.lrr=0.1"], "train.lrr: unknown field"),
        (["--set", "rope.factor=0.5"], "rope.factor"),
        (["--set", "objective.name=distill"], "objective.name"),
        (["--set", "train.max_steps=null"], "train"),  # no budget at all
        (["--set", "train.fail_at_step=0"], "train.fail_at_step"),
        (["--set", "train.run_name=a/b"], "train.run_name 'a/b'"),
        (["--set", "train.eval_long_len=1"], "train.eval_long_len"),
        (
            ["--set", "data.sources=[builtin:sotu/train, /no/such/dir/teacher_samples.jsonl]"],
            "data.sources[1]: '/no/such/dir/teacher_samples.jsonl' does not exist",
        ),
        (
            ["--set", "objective.next_token.weight=0.1", "--set", "data.lm_sources=[builtin:sotu/nope]"],
            "data.lm_sources[0]",
        ),
        (
            ["--set", "train.eval_every=2", "--set", "train.eval_sources.mine=[/no/such/eval.txt]"],
            "train.eval_sources.mine",
        ),
        (["--set", "data.lm_every=2"], "data.lm_every=2"),
    ],
)
def test_bad_config_is_refused_naming_the_field_before_ray_starts(no_ray, capsys, args, field):
    assert _exit_status(args) == 2
    assert field in capsys.readouterr().err
    assert list(no_ray.iterdir()) == []  # nothing written: no data, no outputs


def test_missing_config_file_is_named(no_ray, capsys):
    assert _exit_status(["--config", str(no_ray / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_help_lists_the_config_fields(capsys):
    assert _exit_status(["--help"]) == 0
    out = capsys.readouterr().out
    for s in ("--config", "--set", "train.budget_tokens", "objective.name", "rope.factor", "LinearARD"):
        assert s in out


def test_a_good_config_passes_the_checks_and_reaches_ray(no_ray):
    """The tripwire fires for a config the checks accept: the refusals above are the checks' doing."""
    cfg = build_config({"model": {"teacher": "tiny:llama"}, "data": {"ctx_len": 64}, "train": {"max_steps": 2}})
    check_config(cfg)
    with pytest.raises(AssertionError, match="Ray was started"):
        driver.run_distill(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train.fail_at_step": 0}, "train.fail_at_step must be a step number >= 1"),
        ({"train.run_name": " "}, "train.run_name ' ' must be a non-empty name"),
        ({"train.eval_long_len": 1}, "train.eval_long_len must be at least 2 tokens"),
    ],
)
def test_check_config_refuses_what_the_schema_lets_through(overrides, message):
    cfg = build_config({"model": {"teacher": "tiny:llama"}, "train": {"max_steps": 2}}, overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
