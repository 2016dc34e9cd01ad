"""The command line: ``linearard-ray <command>`` and what every pipeline shares (``--config
FILE.yaml``, ``--set a.b=value``, ``--help``).

The help text lists every config field with its default and description, generated from the
pydantic models so it never drifts from what is validated.

Exit status, the same for every command: 0 done; 2 (``EXIT_USER``) the user's input cannot be used
(configuration, data, model: the message alone, no traceback); 1 (``EXIT_INTERNAL``) an internal
failure (an uncaught exception and its traceback, Python's own status for it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel

from linearard_ray.config import Config, ConfigError, load_config

EXIT_INTERNAL = 1
EXIT_USER = 2


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is None:
        return getattr(ann, "__name__", str(ann))
    if origin is Annotated:  # validators are not part of what the user types
        return _type_name(get_args(ann)[0])
    args = ", ".join(_type_name(a) for a in get_args(ann))
    return f"{getattr(origin, '__name__', str(origin))}[{args}]"


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per leaf field: dotted name, type, default and description."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        dotted = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not type(None):
            lines.append(f"[{dotted}]")
            lines.extend(describe_fields(ann, dotted + "."))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"  {dotted} ({_type_name(ann)}) = {default!r}{desc}")
    return lines


def build_parser(prog: str, description: str, sections: list[str] | None = None) -> argparse.ArgumentParser:
    fields = describe_fields()
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
    return p


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse argv and validate the config; a bad config exits with the field named (status 2)."""
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER) from None
    return args, cfg


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
    print(f"{prog}: {e}", file=sys.stderr)
    return EXIT_USER


def _command_module(name: str):
    import importlib

    return importlib.import_module(f"linearard_ray.commands.{name.replace('-', '_')}")


def _usage() -> str:
    from linearard_ray.commands import COMMANDS

    lines = ["usage: linearard-ray <command> [--config FILE] [--set KEY=VALUE ...] [--help]", "", "commands:"]
    for name in COMMANDS:
        summary = " ".join((_command_module(name).__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"  {name:<15} {summary}")
    lines += ["", "`linearard-ray <command> --help` lists the command's options and every configuration field."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``linearard-ray <command> [args]``: the same programs as ``python pipelines/<command>.py``."""
    from linearard_ray.commands import COMMANDS

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"linearard-ray: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USER
    return _command_module(argv[0]).main(argv[1:], prog=f"linearard-ray {argv[0]}")
