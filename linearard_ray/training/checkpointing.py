"""Training checkpoints: trainable weights, optimizer, scheduler, RNG of every rank, and the
counters that make a resumed run continue exactly where it stopped (step, tokens, data position).

Under DDP everything is written by rank 0 into one directory that Ray Train then persists.
Tensors go through ``torch.save`` and are read back with ``weights_only=True``; RNG states are
converted to plain lists first so that no pickled objects are needed.

Under FSDP the trainable weights and the optimizer state are sharded: every rank writes its share
with ``torch.distributed.checkpoint`` (DCP: ``__<rank>_0.distcp``, and ``.metadata`` from rank 0)
into its own directory, and Ray Train uploads every rank's directory into the same checkpoint
directory. Rank 0 adds the scheduler, RNG and counters and the manifest, which lists every rank's
files. DCP loads them back into any number of shards.

Each checkpoint proves itself: ``manifest.json``, written last, holds the size and sha256 of every
file, and loading checks them first. A resumed run whose latest checkpoint fails that check goes
back to the newest older checkpoint of the run that passes (``load_newest_intact``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from linearard_ray.data.streams import StreamPosition
from linearard_ray.storage import fs_and_path, read_text, write_text

if TYPE_CHECKING:
    from linearard_ray.config.job import TrainConfig

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
CHECKPOINT_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, STATE_FILE)
DCP_METADATA = ".metadata"  # written by DCP's coordinator; marks a sharded checkpoint
SHARDED_CHECKPOINT_FILES = (DCP_METADATA, SCHEDULER_FILE, RNG_FILE, STATE_FILE)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    total_steps: int = 0
    world_size: int = 1
    data: StreamPosition = field(default_factory=StreamPosition)
    lm_data: StreamPosition | None = None
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The batch shape the data positions were counted in (None: written before they were
    # recorded; such a checkpoint resumes only with the worker count that wrote it), and what the
    # streams' epoch lengths are a multiple of for the whole run (training/plan.py: epoch_unit).
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    epoch_unit: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        d["data"] = StreamPosition(**d.get("data", {}))
        if d.get("lm_data") is not None:
            d["lm_data"] = StreamPosition(**d["lm_data"])
        return cls(**d)


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device) as plain data."""
    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return out


def restore_rng(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of visible devices: restore what overlaps
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# --------------------------------------------------------------------------- save / load


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or read; the message names its path and the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"checkpoint {path}: {problem}")


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """One of the checkpoint's files is not there."""


def save_checkpoint(
    directory: str | Path,
    *,
    trainable: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    scheduler_state: dict,
    rng_states: list[dict[str, Any]],
    state: TrainState,
    sharded_files: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write one checkpoint into ``directory`` (created if needed), its manifest last.

    A sharded checkpoint passes no ``trainable``/``optimizer_state`` but ``sharded_files``: every
    rank's DCP files (``file_digests``), which the manifest lists beside this directory's files."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if sharded_files is None:
        torch.save({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, d / TRAINABLE_FILE)
        torch.save(_to_cpu(optimizer_state), d / OPTIMIZER_FILE)
    torch.save(scheduler_state, d / SCHEDULER_FILE)
    torch.save(rng_states, d / RNG_FILE)
    (d / STATE_FILE).write_text(state.to_json())
    write_manifest(d, sharded_files)
    return d


def file_digests(directory: str | Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the named files of ``directory`` (default: every file in it)."""
    d = Path(directory)
    names = sorted(f.name for f in d.iterdir() if f.is_file()) if names is None else names
    return {name: _size_and_sha256(d / name) for name in names}


def write_manifest(
    directory: str | Path, sharded_files: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every checkpoint file, in ``manifest.json``: written after all of them,
    so its presence marks a complete checkpoint and its contents let a reader prove it intact.
    ``sharded_files``: the DCP files of every rank, which other ranks upload beside these."""
    d = Path(directory)
    if sharded_files is None:
        files = file_digests(d, list(CHECKPOINT_FILES))
    else:
        files = {**sharded_files, **file_digests(d, [n for n in SHARDED_CHECKPOINT_FILES if n != DCP_METADATA])}
    tmp = d / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2, sort_keys=True))
    tmp.replace(d / MANIFEST_FILE)
    return files


def verify_checkpoint(directory: str | Path, shown_as: str | None = None) -> bool:
    """True when every file matches the manifest's size and sha256; False for a checkpoint written
    before manifests existed (it can only be trusted if it loads). Raises ``CheckpointError``
    naming the checkpoint (``shown_as``, else ``directory``) and the file that fails."""
    d = Path(directory)
    where = shown_as or str(d)
    if not (d / MANIFEST_FILE).exists():
        return False
    files = _read_manifest(d, where)
    for name in required_files(files):
        if name not in files:
            raise CheckpointError(where, f"{MANIFEST_FILE} does not list {name}")
    for name, want in files.items():
        if not (d / name).is_file():
            raise CheckpointFileMissing(where, f"{name} is missing")
        size, digest = _size_and_sha256(d / name).values()
        if size != want.get("size"):
            raise CheckpointError(where, f"{name} has {size} bytes, {MANIFEST_FILE} says {want.get('size')}")
        if digest != want.get("sha256"):
            raise CheckpointError(where, f"{name} does not match its sha256 in {MANIFEST_FILE}")
    return True


def required_files(names) -> tuple[str, ...]:
    """The files a checkpoint with these files must have: a sharded (DCP) one or a whole one."""
    return SHARDED_CHECKPOINT_FILES if DCP_METADATA in names else CHECKPOINT_FILES


def _read_manifest(d: Path, where: str) -> dict[str, dict[str, Any]]:
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError("'files' is not a mapping of file names to {size, sha256}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(where, f"{MANIFEST_FILE} is not readable ({_brief(e)})") from e
    for name in files:
        if Path(name).name != name:  # the manifest names files of this directory only
            raise CheckpointError(where, f"{MANIFEST_FILE} names a file outside the checkpoint: {name!r}")
    return files


def _size_and_sha256(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


@dataclass
class LoadedCheckpoint:
    trainable: dict[str, torch.Tensor] | None  # None in a sharded checkpoint: DCP reads them
    optimizer_state: dict | None
    scheduler_state: dict
    rng_states: list[dict[str, Any]]
    state: TrainState
    verified: bool = True  # False: written before manifests existed, trusted because it loaded
    dcp_dir: str | None = None  # a sharded checkpoint's local directory, for DCP to load from
    temporary_copy: str | None = None  # a download of it that ``release`` deletes

    def release(self) -> None:
        """Delete the local download of a sharded checkpoint once it has been loaded."""
        if self.temporary_copy is not None:
            shutil.rmtree(self.temporary_copy, ignore_errors=True)
            self.temporary_copy = None


def load_checkpoint(directory: str | Path, shown_as: str | None = None) -> LoadedCheckpoint:
    """The checkpoint in ``directory``, checked against its manifest first. Every failure is a
    ``CheckpointError`` naming the checkpoint (``shown_as``, else ``directory``) and the file."""
    d = Path(directory)
    where = shown_as or str(d)
    if (d / PLACEHOLDER_FILE).exists():
        raise CheckpointError(where, "was deleted; only a placeholder stands in for it")
    sharded = (d / DCP_METADATA).exists()
    missing = [f for f in (SHARDED_CHECKPOINT_FILES if sharded else CHECKPOINT_FILES) if not (d / f).exists()]
    if missing:
        raise CheckpointFileMissing(where, f"incomplete: missing {missing}")
    verified = verify_checkpoint(d, where)
    if sharded:
        return LoadedCheckpoint(
            trainable=None,
            optimizer_state=None,
            scheduler_state=_load_tensors(d, SCHEDULER_FILE, where),
            rng_states=_load_tensors(d, RNG_FILE, where),
            state=_read_state(d, where),
            verified=verified,
            dcp_dir=str(d),
        )
    return LoadedCheckpoint(
        trainable=_load_tensors(d, TRAINABLE_FILE, where),
        optimizer_state=_load_tensors(d, OPTIMIZER_FILE, where),
        scheduler_state=_load_tensors(d, SCHEDULER_FILE, where),
        rng_states=_load_tensors(d, RNG_FILE, where),
        state=_read_state(d, where),
        verified=verified,
    )


def read_state(directory: str | Path) -> TrainState:
    return _read_state(Path(directory), str(directory))


def _load_tensors(d: Path, name: str, where: str) -> Any:
    try:
        return torch.load(d / name, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a truncated zip without saying which file it was reading
        raise CheckpointError(where, f"{name} is not readable ({_brief(e)})") from e


def _read_state(d: Path, where: str) -> TrainState:
    try:
        return TrainState.from_json((d / STATE_FILE).read_text())
    except FileNotFoundError as e:
        raise CheckpointFileMissing(where, f"{STATE_FILE} is missing") from e
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(where, f"{STATE_FILE} is not readable ({_brief(e)})") from e


def _brief(e: BaseException) -> str:
    """The exception's first line, short enough for a log line."""
    first = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# --------------------------------------------------------------------------- directory names and recovery

DIR_PREFIX = "checkpoint_step"
_DIR_NAME = re.compile(re.escape(DIR_PREFIX) + r"(\d+)(?:_(\d+))?")
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
PLACEHOLDER_FILE = "DELETED_CHECKPOINT.txt"


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(step, rewrite) of a checkpoint directory's name, which orders a run's checkpoints; None
    for any other name."""
    m = _DIR_NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def new_checkpoint_dir_name(storage_dir: str, step: int) -> str:
    """``checkpoint_stepNNNNNNN``, or ``..._1``, ``..._2`` when the run's storage already has a
    directory of that name. A run that went back past a broken checkpoint writes that step again;
    Ray Train would then hold two checkpoints at one path, and when ``num_to_keep`` drops the old
    one it deletes the directory, new checkpoint and all."""
    fs, base = fs_and_path(storage_dir)
    return free_checkpoint_dir_name(fs, base, step)


def free_checkpoint_dir_name(filesystem, run_path: str, step: int) -> str:
    import pyarrow.fs as pafs

    name, rewrite = f"{DIR_PREFIX}{step:07d}", 0
    while filesystem.get_file_info(f"{run_path.rstrip('/')}/{name}").type != pafs.FileType.NotFound:
        rewrite += 1
        name = f"{DIR_PREFIX}{step:07d}_{rewrite}"
    return name


def run_checkpoints(filesystem, run_path: str) -> list[tuple[tuple[int, int], str]]:
    """The run's checkpoint directories as (order, path), newest first."""
    import pyarrow.fs as pafs

    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(run_path.rstrip("/"), allow_not_found=True)):
        key = checkpoint_order(info.base_name)
        if info.type == pafs.FileType.Directory and key is not None:
            found.append((key, info.path.rstrip("/")))
    return sorted(found, reverse=True)


def recovery_candidates(filesystem, latest_path: str) -> list[str]:
    """Ray Train's latest checkpoint, then the run's older checkpoint directories, newest first.
    Directories ordered after the latest one are left out: Ray never recorded them (a report cut
    short), so they may be incomplete."""
    latest_path = latest_path.rstrip("/")
    run_path, _, latest_name = latest_path.rpartition("/")
    latest_key = checkpoint_order(latest_name)
    older = [
        path
        for key, path in run_checkpoints(filesystem, run_path)
        if path != latest_path and (latest_key is None or key < latest_key)
    ]
    return [latest_path, *older]


def _newest_complete(storage_dir: str) -> tuple[int, str, dict[str, Any], str] | None:
    """(step, path, manifest files, state.json's text) of the run's newest checkpoint whose files
    have the sizes its manifest records, without hashing them (a quick look; a resume checks the
    sha256s)."""
    import pyarrow.fs as pafs

    fs, base = fs_and_path(storage_dir)
    for _, path in run_checkpoints(fs, base):
        try:
            files = json.loads(read_text(f"{path}/{MANIFEST_FILE}") or "")["files"]
            sizes = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(path))}
            if all(sizes.get(name) == want["size"] for name, want in files.items()):
                state = read_text(f"{path}/{STATE_FILE}") or ""
                return int(json.loads(state)["step"]), path, files, state
        except (ValueError, KeyError, TypeError):
            continue
    return None


def newest_complete_checkpoint(storage_dir: str) -> tuple[int, str] | None:
    """(step, path) of the run's newest complete checkpoint (sizes only, as --dry-run looks)."""
    found = _newest_complete(storage_dir)
    return None if found is None else found[:2]


def check_same_world(
    s: TrainState, world: int, micro_batch_size: int | None = None, grad_accum: int | None = None
) -> None:
    """A checkpoint (its ``TrainState``) resumes on ``world`` workers only with the global batch it
    was written with (workers × micro-batch × grad_accum; ``micro_batch_size``/``grad_accum`` not
    given: the checkpoint's). One written before it recorded its batch shape resumes only on as
    many workers."""
    if s.world_size == world:
        return
    mb = micro_batch_size if micro_batch_size is not None else s.micro_batch_size
    accum = grad_accum if grad_accum is not None else s.grad_accum
    if s.micro_batch_size is None or s.grad_accum is None or mb is None or accum is None:
        raise RuntimeError(
            f"checkpoint was written by {s.world_size} workers; resuming with {world} would change "
            "the data order. Keep train.num_workers or start a new train.run_name."
        )
    before, after = s.world_size * s.micro_batch_size * s.grad_accum, world * mb * accum
    if before == after:
        return
    keep = f"train.grad_accum={before // (world * mb)}" if before % (world * mb) == 0 else None
    hint = (
        f"Set {keep} to keep it"
        if keep
        else f"No train.grad_accum keeps it with train.micro_batch_size={mb}: choose micro_batch_size and "
        f"grad_accum with {world} × micro_batch_size × grad_accum = {before}"
    )
    raise RuntimeError(
        f"checkpoint was written by {s.world_size} workers; resuming with {world} (micro-batch {mb}, grad_accum "
        f"{accum}) would change the global batch from {before} to {after} blocks per step, and with it the data "
        f"order. {hint}, keep train.num_workers={s.world_size}, or start a new train.run_name."
    )


def check_same_parallelism(sharded: bool, parallelism: str) -> None:
    """A sharded (DCP) checkpoint resumes only under fsdp, a whole one only under ddp."""
    written = "fsdp" if sharded else "ddp"
    if written != parallelism:
        raise RuntimeError(
            f"checkpoint was written with train.parallelism={written}; resuming with {parallelism} is not "
            f"supported. Set train.parallelism={written} or start a new train.run_name."
        )


def check_resumes_under(s: TrainState, sharded: bool, train: TrainConfig, world: int) -> None:
    """A checkpoint (its ``TrainState``, whether it is sharded) resumes under the ``train`` config
    section on ``world`` workers: the same parallelism and the same global batch. RuntimeError
    naming the setting to change otherwise; checked by the driver before Ray starts and by the
    workers on the checkpoint Ray hands them."""
    check_same_parallelism(sharded, train.parallelism)
    check_same_world(s, world, train.micro_batch_size, train.grad_accum)


def newest_checkpoint_shape(storage_dir: str) -> tuple[TrainState, bool] | None:
    """The ``TrainState`` of the run's newest complete checkpoint and whether it is sharded (DCP),
    read without loading it: what the driver needs to refuse a resume before any worker starts."""
    found = _newest_complete(storage_dir)
    if found is None:
        return None
    _, _, files, state = found
    return TrainState.from_json(state), DCP_METADATA in files


def load_newest_intact(filesystem, latest_path: str, log: Callable[[str], None]) -> LoadedCheckpoint:
    """The checkpoint at ``latest_path`` (on the pyarrow ``filesystem``: local disk or a bucket),
    or, when it fails its check, the newest older checkpoint of the run that passes. ``log`` gets
    one line per checkpoint passed over and the step the run goes back to. Raises
    ``NoIntactCheckpoint`` when none passes: the run must not silently start from scratch."""
    failures: list[tuple[str, str]] = []
    for path in recovery_candidates(filesystem, latest_path):
        shown = display_path(filesystem, path)
        try:
            with _local_copy(filesystem, path) as d:
                loaded = load_checkpoint(d, shown)
                if loaded.dcp_dir is not None and d != path:  # DCP reads it later: keep a copy
                    loaded.dcp_dir = loaded.temporary_copy = tempfile.mkdtemp(prefix="linearard_dcp_")
                    shutil.copytree(d, loaded.dcp_dir, dirs_exist_ok=True)
        except CheckpointError as e:
            failures.append((shown, e.problem))
            continue
        except OSError as e:  # the download itself failed
            failures.append((shown, _brief(e)))
            continue
        _log_recovery(failures, loaded, shown, log)
        return loaded
    raise NoIntactCheckpoint(display_path(filesystem, latest_path.rstrip("/").rpartition("/")[0]), failures)


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of the run failed its check."""

    def __init__(self, run_dir: str, failures: list[tuple[str, str]]):
        self.failures = failures
        tried = "\n".join(f"  {path}: {why}" for path, why in failures)
        super().__init__(
            f"no intact checkpoint to resume the run in {run_dir} from; tried, newest first:\n{tried}\n"
            f"Start a new train.run_name, or delete {run_dir} to start this run over."
        )


def _log_recovery(failures: list[tuple[str, str]], loaded: LoadedCheckpoint, shown: str, log) -> None:
    for i, (path, why) in enumerate(failures):
        last = i == len(failures) - 1
        then = f"resuming from step {loaded.state.step} ({shown})" if last else "trying an older one"
        log(f"[distill] checkpoint {path} failed its check ({why}); {then}")
    if not loaded.verified:
        log(f"[distill] checkpoint {shown} has no {MANIFEST_FILE} (written before checksums); it loads, so it is used")


def display_path(filesystem, path: str) -> str:
    """``path`` as the user wrote the storage: a local path, or a URI for object storage."""
    scheme = filesystem.type_name
    if scheme == "local":
        return path
    return f"{_URI_SCHEMES.get(scheme, scheme)}://{path}"


_URI_SCHEMES = {"gcs": "gs"}  # pyarrow's filesystem names where the URI scheme differs


@contextlib.contextmanager
def _local_copy(filesystem, path: str) -> Iterator[str]:
    """The checkpoint as a local directory: itself on local disk, else a temporary download."""
    import pyarrow.fs as pafs

    if filesystem.type_name == "local":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="linearard_resume_") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
        yield tmp


def stand_in_for_deleted_checkpoints(storage_dir: str, log: Callable[[str], None]) -> list[str]:
    """Ray Train refuses a whole run whose record names a checkpoint directory that is gone, as
    after deleting a broken checkpoint by hand. Put an empty placeholder there: Ray accepts the
    run, the workers' check rejects the placeholder like any broken checkpoint and resume from the
    newest intact one, and Ray deletes the placeholder once newer checkpoints replace it.
    Returns the directories stood in for."""
    import pyarrow.fs as pafs

    names = _names_in_ray_snapshot(read_text(f"{storage_dir.rstrip('/')}/{RAY_SNAPSHOT_FILE}"))
    fs, base = fs_and_path(storage_dir)
    restored = []
    for name in names:
        path = f"{base.rstrip('/')}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            continue
        write_text(f"{storage_dir.rstrip('/')}/{name}/{PLACEHOLDER_FILE}", _PLACEHOLDER_NOTE)
        log(
            f"[distill] checkpoint {display_path(fs, path)} is named in Ray Train's record of the run but was "
            "deleted; an empty placeholder stands in for it, and the run resumes from the newest intact checkpoint"
        )
        restored.append(name)
    return restored


_PLACEHOLDER_NOTE = (
    "This checkpoint directory was deleted while Ray Train's record of the run still named it.\n"
    "This placeholder lets Ray accept the run; the workers skip it and resume from the newest\n"
    "intact checkpoint. Ray Train deletes it once newer checkpoints replace it.\n"
)


def _names_in_ray_snapshot(text: str | None) -> list[str]:
    """The checkpoint directory names in Ray Train's run record; none when it cannot be read
    (then Ray reports the problem itself)."""
    if not text:
        return []
    try:
        snap = json.loads(text)
        entries = [*snap.get("checkpoint_results", []), snap.get("latest_checkpoint_result") or {}]
        names = {e["checkpoint_dir_name"] for e in entries if e}
    except (ValueError, TypeError, KeyError, AttributeError):
        return []
    return sorted(n for n in names if isinstance(n, str) and "/" not in n and checkpoint_order(n) is not None)
