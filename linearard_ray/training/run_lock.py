"""One job per run name: a lock file in the run's storage directory.

Two jobs started with the same ``train.run_name`` would train into one folder, delete each other's
checkpoints and log into one MLflow run. The driver therefore takes ``<storage dir>/linearard_run.lock``
before anything else, refreshes its heartbeat while the job runs, and removes it at the end. A
second job refuses at once and names the holder. A lock whose owner is gone (its process has
exited on this host, or its heartbeat is older than ``STALE_AFTER_S``) is taken over without
manual clean-up; ``train.takeover`` (``distill --force``) takes over a lock that still looks held.

Workers watch the same file (``LockWatch``): when the driver that started them is gone or another
job has taken the run over, they stop at the next step instead of training on unobserved.

On local disk the lock is created atomically (O_EXCL). On object storage (s3://, gs://) there is no
atomic create through pyarrow; the lock is written and read back, which catches all but a race
within the same second.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from linearard_ray.config import ConfigError
from linearard_ray.storage import fs_and_path, is_uri, read_text, write_text

LOCK_FILE = "linearard_run.lock"
HEARTBEAT_S = 5.0
# A heartbeat older than this means the owner is gone (a driver on another host cannot be asked).
STALE_AFTER_S = 30.0


class RunLockError(ConfigError):
    """The run name is held by another job (or was taken over from this one). A ``ConfigError``:
    the fix is in the job's input (wait, another ``train.run_name``, or ``--force``), and the
    pipelines report it as one, without a traceback."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run name: a per-job token, the driver's host and PID, and when."""

    token: str
    run_name: str
    host: str
    pid: int
    started: float
    heartbeat: float

    @classmethod
    def for_this_process(cls, run_name: str) -> LockOwner:
        now = time.time()
        return cls(uuid.uuid4().hex, run_name, socket.gethostname(), os.getpid(), now, now)

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner recorded in a lock file; None for a file that is not one (half written)."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host}, PID {self.pid}, started {started}"

    def gone_because(self, now: float | None = None) -> str | None:
        """Why this owner is gone, or None while it looks alive."""
        if self.host == socket.gethostname() and not process_alive(self.pid, self.started):
            return f"its process {self.pid} on {self.host} has exited"
        age = (now or time.time()) - self.heartbeat
        if age > STALE_AFTER_S:
            return f"its last heartbeat was {age:.0f} s ago"
        return None


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` runs on this host and (when ``started`` is given) was not started after the
    lock was written, i.e. is not a later process that reused the number."""
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or proc.create_time() <= started + 1.0
    except ImportError:  # pragma: no cover - psutil comes with ray[default]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except Exception:  # NoSuchProcess, AccessDenied for a process that is gone
        return False


def lock_path(storage_dir: str) -> str:
    return f"{storage_dir.rstrip('/')}/{LOCK_FILE}"


def read_owner(storage_dir: str) -> LockOwner | None:
    """The lock's owner; None when there is no lock file or it does not parse."""
    text = read_text(lock_path(storage_dir))
    return LockOwner.parse(text) if text else None


def lock_exists(storage_dir: str) -> bool:
    return read_text(lock_path(storage_dir)) is not None


@dataclass
class Acquired:
    """The lock this job holds, and the owner it replaced (a job that was killed), if any."""

    owner: LockOwner
    replaced: LockOwner | None
    replaced_because: str | None


def acquire(storage_dir: str, run_name: str, *, takeover: bool = False) -> Acquired:
    """Take the run name's lock, or raise ``RunLockError`` naming the job that holds it."""
    path = lock_path(storage_dir)
    me = LockOwner.for_this_process(run_name)
    if _create_exclusive(path, me.to_json()):
        return Acquired(me, None, None)
    held = read_owner(storage_dir)
    why = _takeover_reason(held, takeover)
    if why is None:
        raise RunLockError(
            f"run name {run_name!r} is in use by another job ({held.describe()}; lock {path}). Wait for it to "
            f"finish, pick another train.run_name, or pass --force (train.takeover=true) if that job is gone."
        )
    _write_lock(path, me.to_json())
    time.sleep(0.05)  # a racing taker writes within this window; the last writer wins, the other refuses
    if (read_owner(storage_dir) or held).token != me.token:
        raise RunLockError(f"run name {run_name!r} was taken by another job at the same moment (lock {path})")
    return Acquired(me, held, why)


def _takeover_reason(held: LockOwner | None, takeover: bool) -> str | None:
    """Why a lock that exists may be taken over, or None when it is held."""
    if held is None:
        return "the lock file was unreadable (a half-written lock)"
    if held.host == socket.gethostname() and held.pid == os.getpid():
        return "it was taken by an earlier attempt in this process"
    gone = held.gone_because()
    if gone:
        return gone
    return "train.takeover is set" if takeover else None


def _create_exclusive(path: str, text: str) -> bool:
    """Create the file with ``text`` unless it exists; True when this call created it."""
    if is_uri(path):
        if read_text(path) is not None:
            return False
        write_text(path, text)
        return True
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _write_temp(path, text)
    try:
        os.link(tmp, path)  # atomic and refuses an existing name: a reader never sees a half-written lock
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _write_lock(path: str, text: str) -> None:
    """Replace the lock's content in one step (object stores replace whole objects anyway)."""
    if is_uri(path):
        write_text(path, text)
        return
    os.replace(_write_temp(path, text), path)


def _write_temp(path: str, text: str) -> str:
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    return tmp


def release(storage_dir: str, owner: LockOwner) -> None:
    """Remove the lock if it is still this job's (a job that took over keeps its own)."""
    held = read_owner(storage_dir)
    if held is not None and held.token == owner.token:
        fs, p = fs_and_path(lock_path(storage_dir))
        fs.delete_file(p)


class Heartbeat:
    """The driver's thread that refreshes the lock every ``HEARTBEAT_S`` seconds while it holds it."""

    def __init__(self, storage_dir: str, owner: LockOwner, interval: float = HEARTBEAT_S):
        self.storage_dir, self.owner, self.interval = storage_dir, owner, interval
        self.lost_to: LockOwner | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="linearard-run-lock", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            held = read_owner(self.storage_dir)
            if held is not None and held.token != self.owner.token:
                self.lost_to = held  # taken over: stop refreshing, the workers stop on their own
                return
            fresh = LockOwner(**{**asdict(self.owner), "heartbeat": time.time()})
            _write_lock(lock_path(self.storage_dir), fresh.to_json())


class LockWatch:
    """A worker's check, once per step, that the job that started it still owns the run name."""

    def __init__(self, storage_dir: str, token: str):
        self.storage_dir, self.token = storage_dir, token

    def check(self) -> None:
        """Raise ``RunLockError`` when the driver is gone or another job holds the run name."""
        held = read_owner(self.storage_dir)
        if held is None:
            if lock_exists(self.storage_dir):
                return  # a lock that does not parse decides nothing; the next step looks again
            raise RunLockError(f"the run lock {lock_path(self.storage_dir)} is gone: its driver has ended")
        if held.token != self.token:
            raise RunLockError(f"another job took the run over ({held.describe()}); this worker stops")
        gone = held.gone_because()
        if gone:
            raise RunLockError(f"the driver of this run is gone ({gone}); this worker stops")
