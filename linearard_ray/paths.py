"""Where relative output paths land: the output base.

A direct run (``python pipelines/distill.py`` in a checkout) writes relative output paths
(``train.output_dir``, ``train.storage_path``, ``data.output_dir``, ``eval.output_dir``,
``tune.storage_path``) and the default ``sqlite:///mlflow.db`` store relative to its working
directory, as any command-line tool does. A job started by ``ray job submit --working-dir`` runs
in Ray's unpacked copy of that directory, inside the session's temporary folder
(``<temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/``), which Ray
deletes; there, relative output paths go under ``$LINEARARD_HOME`` (default ``~/linearard_ray``)
instead. ``LINEARARD_HOME`` set explicitly is the base of every run, direct or submitted, so that
both put their students and MLflow runs side by side.

Inputs (data sources, configs, model directories) stay relative to the working directory: they
are what the job ships with it.
"""

from __future__ import annotations

import os
from pathlib import Path

from linearard_ray.storage import is_uri

HOME_ENV = "LINEARARD_HOME"
DEFAULT_HOME = "~/linearard_ray"
# Ray's runtime-env agent unpacks a job's working_dir into
# <session dir>/runtime_resources/working_dir_files/_ray_pkg_<hash> (ray/_private/runtime_env/
# working_dir.py) and starts the job's driver and every worker of the job there.
_RAY_RESOURCES_DIR = "runtime_resources"
_RAY_WORKING_DIR_FILES = "working_dir_files"


def ray_working_dir(cwd: str | Path | None = None) -> Path | None:
    """The copy of a job's working_dir that Ray unpacked, when ``cwd`` (default: the process's
    working directory) lies in one; None otherwise.

    The working directory is the signal because it is what decides where a relative path lands:
    the driver of a submitted job, its workers and its tasks all start there, while a driver whose
    entrypoint changed directory first (``cd /data && python ...``) writes where it is."""
    here = Path(os.getcwd() if cwd is None else cwd).absolute()
    for d in (here, *here.parents):
        if d.parent.name == _RAY_WORKING_DIR_FILES and d.parent.parent.name == _RAY_RESOURCES_DIR:
            return d
    return None


def output_base(cwd: str | Path | None = None) -> Path:
    """The directory relative output paths are resolved against: ``$LINEARARD_HOME`` when set,
    else ``~/linearard_ray`` inside a Ray working_dir copy, else the working directory."""
    explicit = os.environ.get(HOME_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser().absolute()
    if ray_working_dir(cwd) is not None:
        return Path(DEFAULT_HOME).expanduser().absolute()
    return Path(os.getcwd() if cwd is None else cwd).absolute()


def output_path(path: str | Path, cwd: str | Path | None = None) -> str:
    """An output path made absolute: a URI as given, ``~`` expanded, a relative path joined to
    ``output_base()``. Absolute paths go to every Ray worker unchanged, whatever their cwd."""
    s = str(path)
    if is_uri(s):
        return s
    p = Path(s).expanduser()
    if not p.is_absolute():
        p = output_base(cwd) / p
    return str(p.resolve())


def sqlite_uri(uri: str, cwd: str | Path | None = None) -> str:
    """A sqlite tracking URI with its database file made absolute like any output path
    (``sqlite:///mlflow.db`` → ``sqlite:////<base>/mlflow.db``); any other URI as given.

    With a relative file each process would open a database of its own in its own cwd."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    rest = uri[len(prefix) :]
    file, sep, query = rest.partition("?")
    if not file or file.startswith("/") or file.startswith(":memory:"):
        return uri
    return f"{prefix}{output_path(file, cwd)}{sep}{query}"
