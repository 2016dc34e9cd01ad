"""Finished evaluation jobs kept on disk, so an interrupted evaluation picks up where it stopped.

A long-context evaluation is hours of (model, length) jobs on a CPU box and tens of minutes on a
GPU; losing all of it to a pre-empted node or a closed lease is the common failure. Each finished
job's result is appended to ``<eval.output_dir>/jobs.jsonl`` as soon as it exists, under a key
that names everything its numbers depend on:

- the job (``('nll', domain, L)``, ``('relkl', domain, L)``, ``('passkey', L)``);
- the model: name, path, RoPE override, and for a local checkpoint the size and mtime of its
  files (not the student record that evaluations rewrite), so a student retrained into the same
  directory is evaluated again;
- for relation KL, the teacher the same way, and the YaRN logit correction;
- the model settings that change numbers (``model.*``), the device and batch size;
- a digest of the job's inputs: the token windows, or the passkey prompts.

A rerun with ``eval.resume`` (the default) reuses every result whose key matches and runs only
the rest; anything else in the file (another configuration, a crash mid-line) is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# Files of a checkpoint directory whose change means new numbers.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".model")


def model_fingerprint(path: str) -> Any:
    """The checkpoint's identity: for a local file or directory, (name, size, mtime) of what it
    holds; otherwise the path itself (a hub id or a built-in name, fixed by the cache)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [[p.name, st.st_size, st.st_mtime_ns]]
    if p.is_dir():
        # The student record is rewritten by every evaluation that logs its figures to the
        # training run; counting it would make the next evaluation redo all of that model's jobs.
        from linearard_ray.models.loading import STUDENT_RECORD

        files = sorted(
            f for f in p.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES) and f.name != STUDENT_RECORD
        )
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return path


def inputs_digest(obj: Any) -> str:
    """sha256 of a job's inputs: a token-window array, or a list of passkey prompts."""
    h = hashlib.sha256()
    if isinstance(obj, np.ndarray):
        h.update(str((obj.dtype.str, obj.shape)).encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        rows = [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in obj]
        h.update(json.dumps(rows, sort_keys=True, default=str).encode())
    return h.hexdigest()


def job_key(job: tuple, model: dict, inputs: str, settings: dict, teacher: dict | None = None) -> str:
    """One string per (job, model, inputs, settings); `model`/`teacher` carry their fingerprint."""
    body = {"job": list(job), "model": model, "inputs": inputs, "settings": settings}
    if teacher is not None:
        body["teacher"] = teacher
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class JobLog:
    """Append-only JSONL of finished jobs: one ``{"key", "result"}`` object per line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _read(self) -> tuple[list[tuple[str, dict]], list[str], int]:
        """((key, result) of every complete line in file order, those lines, how many lines were
        torn); the file is not touched."""
        recs: list[tuple[str, dict]] = []
        good, torn = [], 0
        if not self.path.exists():
            return recs, good, torn
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                recs.append((rec["key"], rec["result"]))
                good.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                torn += 1
        return recs, good, torn

    def results(self) -> list[dict]:
        """The result of every complete line, in file order, read only (for a log kept as a record)."""
        return [r for _, r in self._read()[0]]

    def load(self) -> dict[str, dict]:
        """key -> result of every complete line. A torn line (a crash mid-write) is dropped from
        the file too, so the next append starts on a line of its own."""
        recs, good, torn = self._read()
        if torn:
            self.path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        return dict(recs)

    def append(self, key: str, result: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "result": result}, default=_plain) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _plain(x: Any) -> Any:
    """numpy scalars and arrays in results, as JSON."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
