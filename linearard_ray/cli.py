"""The command line: ``linearard-ray <command>`` and what every pipeline shares (``--config
FILE.yaml``, ``--set a.b=value``, ``--print-config``, ``--dry-run``, ``--quiet``/``--verbose``,
``--help``).

The help text lists every config field with its type, the value a bare run uses and its
description, generated from the pydantic models so it never drifts from what is validated.
``parse_config`` sets up logging (linearard_ray.logs) and answers ``--print-config``; each command
answers ``--dry-run`` with its own ``dry_run`` lines through ``show_plan``.

Exit status, the same for every command: 0 done; 2 (``EXIT_USER``) the user's input cannot be used
(configuration, data, model: the message alone, no traceback); 1 (``EXIT_INTERNAL``) an internal
failure (an uncaught exception and its traceback, Python's own status for it).
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from linearard_ray.config import Config, ConfigError, build_config, dump_config, load_config, parse_overrides
from linearard_ray.logs import NORMAL, QUIET, VERBOSE, get_logger, setup_logging, show_result

EXIT_INTERNAL = 1
EXIT_USER = 2

log = get_logger(__name__)


def _type_name(ann: Any) -> str:
    """A type as the user would write it: ``int | None``, ``list[int]``, choices as ``a | b``."""
    if ann is type(None):
        return "None"
    origin = get_origin(ann)
    if origin is None:
        return getattr(ann, "__name__", str(ann))
    args = get_args(ann)
    if origin is Annotated:  # validators are not part of what the user types
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{inner}]"


def _shown(value: Any) -> str:
    return repr(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)


def describe_fields(model: type[BaseModel] = Config, prefix: str = "", bare: BaseModel | None = None) -> list[str]:
    """One line per leaf field: dotted name, type, default and description. With ``bare`` (the
    config a run without --config gets) the default shown is that run's value, and the schema's
    beside it where they differ (a section written in YAML starts from the schema's)."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        dotted = f"{prefix}{name}"
        sub = getattr(bare, name, None) if bare is not None else None
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not type(None):
            lines.append(f"[{dotted}]")
            lines.extend(describe_fields(ann, dotted + ".", sub if isinstance(sub, BaseModel) else None))
            continue
        schema = field.get_default(call_default_factory=True)
        shown = _shown(schema)
        if bare is not None and _shown(sub) != shown:
            shown = f"{_shown(sub)} (bare run; schema default {shown})"
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"  {dotted} ({_type_name(ann)}) = {shown}{desc}")
    return lines


def bare_config(defaults: dict[str, Any] | None = None) -> Config:
    """The config of a run without --config: the embedded default with a command's own defaults."""
    return build_config({}, dict(defaults or {}))


def build_parser(
    prog: str, description: str, sections: list[str] | None = None, defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """The options every command shares. ``defaults``: the dotted settings a run without --config
    adds to the embedded default (tune's small sweep), shown in --help and applied by ``parse_config``."""
    fields = describe_fields(bare=bare_config(defaults))
    if sections:
        keep, on = [], False
        for line in fields:
            if line.startswith("["):
                on = line.strip("[]").split(".")[0] in sections
            if on:
                keep.append(line)
        fields = keep
    epilog = "configuration fields (set in YAML or with --set):\n" + "\n".join(fields)
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.set_defaults(config_defaults=dict(defaults or {}))
    p.add_argument("--config", "-c", default=None, help="YAML config file (default: the embedded default)")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set data.ctx_len=2048 (repeatable; values parsed as YAML)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration as YAML and exit (starts nothing)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the configuration and show what would run (paths, data, plan) without starting Ray",
    )
    loud = p.add_mutually_exclusive_group()
    loud.add_argument(
        "--quiet", "-q", action="store_true", help="only warnings and errors (no progress lines or progress bars)"
    )
    loud.add_argument("--verbose", "-v", action="store_true", help="debug lines too")
    return p


def verbosity(args: argparse.Namespace) -> int:
    return QUIET if args.quiet else VERBOSE if args.verbose else NORMAL


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse argv, set up logging and validate the config; a bad config exits with the field named
    (status 2). ``--print-config`` prints the config and exits 0 here, before anything starts."""
    args = parser.parse_args(argv)
    setup_logging(verbosity(args))
    try:
        overrides = ({} if args.config else dict(args.config_defaults)) | parse_overrides(args.overrides)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        log.error(f"{parser.prog}: {e}")
        raise SystemExit(EXIT_USER) from None
    if args.print_config:
        show_result(dump_config(cfg).rstrip("\n"))
        raise SystemExit(0)
    return args, cfg


def show_plan(prog: str, lines: list[str]) -> int:
    """A --dry-run's report: what the command would do, one line each; exit status 0."""
    show_result("\n".join([f"{prog} --dry-run: checks passed; nothing was started", *(f"  {line}" for line in lines)]))
    return 0


def user_errors(*extra: type[Exception]) -> tuple[type[Exception], ...]:
    """The exceptions that mean the user's input is wrong (config, data, model, RoPE, teacher
    sampling), plus a command's own `extra` ones: a command reports them with `user_error`.
    Imported here, after the config is parsed, so `--help` and a bad config stay fast."""
    from linearard_ray.data.sampling import SamplingError
    from linearard_ray.data.sources import DataError
    from linearard_ray.models.loading import ModelError
    from linearard_ray.models.rope import RopeError

    return (ConfigError, DataError, ModelError, RopeError, SamplingError, *extra)


def user_error(prog: str, e: Exception) -> int:
    """Report an error in the user's input without a traceback; the exit status for it."""
    log.error(f"{prog}: {e}")
    return EXIT_USER


def _command_module(name: str):
    import importlib

    return importlib.import_module(f"linearard_ray.commands.{name.replace('-', '_')}")


def _usage() -> str:
    from linearard_ray.commands import COMMANDS

    lines = [
        "usage: linearard-ray <command> [--config FILE] [--set KEY=VALUE ...] [--print-config] [--dry-run]"
        " [--quiet | --verbose] [--help]",
        "       linearard-ray --version",
        "",
        "commands:",
    ]
    for name in COMMANDS:
        summary = " ".join((_command_module(name).__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"  {name:<15} {summary}")
    lines += ["", "`linearard-ray <command> --help` lists the command's options and every configuration field."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``linearard-ray <command> [args]``: the same programs as ``python pipelines/<command>.py``."""
    from linearard_ray.commands import COMMANDS

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv and argv[0] == "--version":
        from linearard_ray import __version__

        print(f"linearard-ray {__version__}")
        return 0
    if not argv:  # a command is required: the usage, as argparse answers a missing argument
        sys.stderr.write(_usage() + "\n")
        return EXIT_USER
    if argv[0] not in COMMANDS:
        log.error(f"linearard-ray: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)}")
        return EXIT_USER
    return _command_module(argv[0]).main(argv[1:], prog=f"linearard-ray {argv[0]}")
