"""The package's log lines: INFO as bare lines on stdout, warnings on stderr, --quiet and --verbose
through the command line, the level handed to workers in the environment, and the known library
deprecation left out while any other warning still shows."""

from __future__ import annotations

import logging
import warnings

import pytest

from linearard_ray import logs
from linearard_ray.ray_env import worker_env


@pytest.fixture(autouse=True)
def restore_level(monkeypatch):
    """Each test leaves the package at the normal level (as a fresh command would)."""
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    yield
    logs.setup_logging(logs.NORMAL)
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)


def _say_all(log: logging.Logger) -> None:
    log.debug("[distill] debug line")
    log.info("[distill] info line")
    log.warning("[distill] warning line")


def test_info_goes_to_stdout_as_the_bare_line_and_warnings_to_stderr(capsys):
    logs.setup_logging(logs.NORMAL)
    _say_all(logs.get_logger("linearard_ray.training.driver"))
    out, err = capsys.readouterr()
    assert out == "[distill] info line\n"
    assert err == "[distill] warning line\n"


def test_quiet_keeps_only_warnings_and_verbose_adds_debug(capsys):
    log = logs.get_logger("linearard_ray.training.driver")
    logs.setup_logging(logs.QUIET)
    _say_all(log)
    out, err = capsys.readouterr()
    assert out == "" and "warning line" in err
    logs.setup_logging(logs.VERBOSE)
    _say_all(log)
    out, err = capsys.readouterr()
    assert "[distill] debug line" in out and "[distill] info line" in out and "warning line" in err


def test_the_chosen_level_reaches_the_workers_environment():
    logs.setup_logging(logs.QUIET)
    assert worker_env()[logs.LEVEL_ENV] == "WARNING"
    logs.setup_logging(logs.VERBOSE)
    assert worker_env()[logs.LEVEL_ENV] == "DEBUG"


def test_a_worker_takes_the_drivers_level_and_leaves_out_ray_trains_report_line(monkeypatch, capsys):
    monkeypatch.setenv(logs.LEVEL_ENV, "WARNING")
    assert logs.setup_worker_logging() == logging.WARNING
    logs.get_logger("linearard_ray.training.worker").info("[distill] step 1/3")
    assert capsys.readouterr().out == ""
    report = logs._ray_train_report_logger()
    assert report is not None and not report.isEnabledFor(logging.INFO)


def test_the_known_deprecation_is_ignored_and_other_warnings_still_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logs.quiet_known_warnings()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("some other change is coming", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["some other change is coming"]


def test_quiet_keeps_a_commands_result_on_stdout(capsys):
    from linearard_ray.logs import NORMAL, QUIET, get_logger, setup_logging, show_result

    try:
        setup_logging(QUIET)
        get_logger("linearard_ray.training.driver").info("[distill] step 1/2 ...")
        show_result("[distill] student: /somewhere/merged")
    finally:
        setup_logging(NORMAL)
    out = capsys.readouterr().out
    assert out == "[distill] student: /somewhere/merged\n"
