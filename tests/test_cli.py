"""The `linearard-ray` console script: it lists its commands and runs each with the pipelines' own
argument handling, so a bad configuration fails the same way under both names."""

from __future__ import annotations

import pytest

from linearard_ray.cli import main
from linearard_ray.commands import COMMANDS


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_is_refused_with_the_choices(capsys):
    assert main(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and "distill" in err


def _exit_status(argv: list[str]) -> int:
    """A command's exit status, whether it returns it or exits with it (argparse-style)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("command", ["distill", "preprocess", "evaluate", "tune"])
def test_bad_field_fails_under_the_console_script_name(command, capsys):
    assert _exit_status([command, "--set", "rope.factr=8"]) == 2
    err = capsys.readouterr().err
    assert f"linearard-ray {command}: invalid configuration" in err and "rope.factr: unknown field" in err


@pytest.mark.parametrize(
    "command,extra",
    [
        ("distill", []),
        ("preprocess", []),
        ("evaluate", []),
        ("tune", []),
        ("sample-teacher", ["--out", "x.jsonl", "--samples", "1"]),
    ],
)
def test_yaml_syntax_error_fails_the_same_way_under_every_command(command, extra, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [a.txt\n  ctx_len: 64\n")
    assert _exit_status([command, "--config", str(bad), *extra]) == 2
    err = capsys.readouterr().err
    assert f"linearard-ray {command}: invalid configuration: {bad}:3:10:" in err and "Traceback" not in err


def test_preprocess_data_error_exits_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    """The same convention as distill: the user's data is exit 2, and it is found before Ray."""
    from linearard_ray.data import preprocess

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started for data that should have been refused")

    monkeypatch.setattr(preprocess, "ensure_ray", tripwire)
    missing = tmp_path / "missing.txt"
    argv = ["preprocess", "--set", "model.teacher=tiny:llama", "--set", f"data.sources=[{missing}]"]
    assert _exit_status(argv) == 2
    assert f"data.sources[0]: '{missing}' does not exist" in capsys.readouterr().err
