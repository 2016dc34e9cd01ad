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
