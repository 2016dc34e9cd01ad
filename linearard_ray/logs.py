"""The package's log lines: one pair of handlers on the ``linearard_ray`` logger.

INFO and DEBUG lines go to stdout as the bare message, so ``[distill] ...`` lines read as they
always have; warnings and errors go to stderr. The command line picks the level (``--quiet``:
warnings and errors only, ``--verbose``: debug lines too) with ``setup_logging``. The level
reaches every Ray worker through ``LINEARARD_LOG_LEVEL`` (``ray_env.worker_env`` forwards it), and
a worker function calls ``setup_worker_logging`` first, which also quiets what Ray Train and the
libraries print per report or per worker. A module logs with ``log = get_logger(__name__)``; the
handlers are installed on first use, so the package used as a library prints as the CLI does.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER_NAME = "linearard_ray"
LEVEL_ENV = "LINEARARD_LOG_LEVEL"

QUIET, NORMAL, VERBOSE = -1, 0, 1
_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}

# Other libraries' loggers that --quiet also limits to warnings: Ray's start-up and Ray Data's
# progress lines, MLflow's database and system-metrics notes.
_QUIETED_BY_QUIET = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow")
# In workers below --verbose: MLflow's system-metrics monitor announces its start and stop on rank 0.
_QUIETED_IN_WORKERS = ("mlflow.system_metrics",)

# Deprecations raised inside libraries we call, once per worker, that the user cannot act on:
# (message regex, category). Matched exactly so that any other warning still shows.
KNOWN_LIBRARY_WARNINGS = (
    # peft reads model.is_gradient_checkpointing, deprecated in transformers 5
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)

_saved_levels: dict[str, int] = {}


class _ConsoleHandler(logging.Handler):
    """Writes each line to ``sys.stdout`` or ``sys.stderr`` as they are when the line is emitted
    (pytest's capture and Ray's worker redirection replace them), flushing at once. Writing to the
    stream directly, not through ``print``, keeps a Ray Train worker's line from appearing twice."""

    def __init__(self, stream_name: str, below: int | None = None):
        super().__init__()
        self.stream_name = stream_name
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        if self.below is not None and record.levelno >= self.below:
            return False
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def level_for(verbosity: int) -> int:
    """The logging level of a verbosity: QUIET, NORMAL or VERBOSE."""
    return _LEVELS[max(QUIET, min(VERBOSE, verbosity))]


def env_level() -> int:
    """The level the driver chose (``LINEARARD_LOG_LEVEL``), INFO when unset or unreadable."""
    level = logging.getLevelName(os.environ.get(LEVEL_ENV, "INFO").upper())
    return level if isinstance(level, int) else logging.INFO


def _install() -> logging.Logger:
    """The package logger with its two handlers (installed once, at the level of the environment)."""
    pkg = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _ConsoleHandler) for h in pkg.handlers):
        fmt = logging.Formatter("%(message)s")
        for handler in (_ConsoleHandler("stdout", below=logging.WARNING), _ConsoleHandler("stderr")):
            handler.setFormatter(fmt)
            if handler.stream_name == "stderr":
                handler.setLevel(logging.WARNING)
            pkg.addHandler(handler)
        pkg.setLevel(env_level())
        pkg.propagate = False  # a root handler (Ray's, a library's basicConfig) would print each line twice
    return pkg


def get_logger(name: str) -> logging.Logger:
    """The logger of a module of the package: ``log = get_logger(__name__)``."""
    _install()
    return logging.getLogger(name)


def show_result(line: str) -> None:
    """A command's result (where the student, the report or the MLflow run is): on stdout whatever
    the level, so that ``--quiet`` leaves exactly the answer."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _limit(names: tuple[str, ...], level: int) -> None:
    """Raise these loggers to at least ``level``; ``_restore`` undoes it."""
    for name in names:
        lg = logging.getLogger(name)
        _saved_levels.setdefault(name, lg.level)
        lg.setLevel(max(level, lg.getEffectiveLevel()))


def _restore(names: tuple[str, ...]) -> None:
    for name in names:
        if name in _saved_levels:
            logging.getLogger(name).setLevel(_saved_levels.pop(name))


def quiet_known_warnings() -> None:
    """Ignore the library deprecations in ``KNOWN_LIBRARY_WARNINGS``, and nothing else."""
    for message, category in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def setup_logging(verbosity: int = NORMAL) -> int:
    """The command line's set-up: the package's level (QUIET, NORMAL, VERBOSE), recorded in the
    environment for the Ray workers; under --quiet Ray's and MLflow's own INFO lines go too.
    Returns the level."""
    level = level_for(verbosity)
    os.environ[LEVEL_ENV] = logging.getLevelName(level)
    _install().setLevel(level)
    quiet_known_warnings()
    _restore(_QUIETED_BY_QUIET)
    if level > logging.INFO:
        _limit(_QUIETED_BY_QUIET, level)
    return level


def _ray_train_report_logger() -> logging.Logger | None:
    """The logger behind Ray Train's 'Reporting training result ...' line, which lists every metric
    at INFO on each report. Ray names it after its module's file path, so it is looked up there."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return None
    lg = getattr(context, "logger", None)
    return lg if isinstance(lg, logging.Logger) else None


def setup_worker_logging() -> int:
    """In a Ray worker function, first: the driver's level, and below --verbose Ray Train's
    per-report metrics line and MLflow's monitor notes left out; the known library deprecations
    ignored. Returns the level."""
    level = env_level()
    _install().setLevel(level)
    quiet_known_warnings()
    if level > logging.DEBUG:
        report = _ray_train_report_logger()
        if report is not None:
            report.setLevel(logging.WARNING)
        _limit(_QUIETED_IN_WORKERS, logging.WARNING)
    if level > logging.INFO:
        _limit(_QUIETED_BY_QUIET, level)
    return level
