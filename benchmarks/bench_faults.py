"""Fault injection on CPU: one tiny distillation job, killed again and again, must end where an
uninterrupted run ends.

    python benchmarks/bench_faults.py                        # 5 kills, seed 0
    python benchmarks/bench_faults.py --kills 8 --seed 3 --json faults.json

It first runs the job once without faults (the reference), then runs it again under a seeded plan
of N kills at random steps. Each kill is one of:

- ``driver``: SIGKILL the job's driver (``pipelines/distill.py``), wait to see whether its orphaned
  workers stop, then start the job again with the same run name, as an operator would;
- ``worker``: SIGKILL the Ray Train worker; Ray Train restarts the worker group from the last
  checkpoint on its own (``train.max_failures``).

Before one driver restart it also truncates ``trainable.pt`` of the checkpoint Ray Train would
resume from (the latest in its run record), so that restart must go back to the one before it. It
reports the kills survived, whether the exported student is bitwise equal to the reference, tokens
counted twice or skipped (the ``tokens_seen`` of every step against the reference), MLflow points
per step, the resumes past a broken checkpoint, and how many steps an orphaned worker trained
after its driver was killed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"\[distill\] step (\d+)/(\d+)")
RUN_NAME = "faults"


def job_config(workdir: Path, tag: str, steps: int, checkpoint_every: int, max_failures: int) -> Path:
    """A tiny CPU job writing under ``workdir/tag``; its YAML file."""
    out = workdir / tag
    cfg = {
        "model": {"teacher": "tiny:llama"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: a resume must restore the RNG too
        "data": {"ctx_len": 64, "output_dir": str(workdir / "data")},
        "train": {
            "run_name": RUN_NAME,
            "storage_path": str(out / "ray"),
            "output_dir": str(out / "students"),
            "max_steps": steps,
            "checkpoint_every": checkpoint_every,
            "keep_checkpoints": 3,
            "max_failures": max_failures,
            "cpus_per_worker": 1,
            "op_backend": "torch",  # the Triton interpreter is slow on CPU; resume logic is the same
        },
        "tracking": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "faults"},
    }
    path = workdir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Job:
    """One ``pipelines/distill.py`` process in its own session, its output followed line by line."""

    def __init__(self, config: Path, log: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)  # a private local Ray instance, never a cluster already running
        self.log = open(log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "pipelines" / "distill.py"), "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the driver's Ray processes share its session: one group to clean up
        )
        self.step = 0
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.append(line)
            m = STEP_LINE.search(line)
            if m:
                self.step = max(self.step, int(m.group(1)))

    def wait_for_step(self, step: int, timeout: float = 600) -> int:
        """Block until the job has logged ``step`` (or ended); the step it is at."""
        deadline = time.time() + timeout
        while self.step < step and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        return self.step

    def finish(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        self.cleanup()
        return rc

    def cleanup(self) -> None:
        """Kill whatever the driver left behind in its session (a killed driver leaves its local
        Ray instance running)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.log.close()


def session_processes(sid: int, marker: str) -> list:
    """The processes of session ``sid`` whose command line contains ``marker``."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def kill_worker(job: Job) -> bool:
    """SIGKILL the job's Ray Train worker(s); False when none was found."""
    workers = session_processes(job.proc.pid, "RayTrainWorker")
    for p in workers:
        os.kill(p.pid, signal.SIGKILL)
    return bool(workers)


def logged_steps(uri: str, key: str = "loss") -> list[int]:
    """Every step at which ``key`` was logged in the job's MLflow run (with repeats)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("faults")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id])
    return [m.step for r in runs for m in client.get_metric_history(r.info.run_id, key)]


def metric_by_step(uri: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id])
    return {m.step: m.value for r in runs for m in client.get_metric_history(r.info.run_id, key)}


def corrupt_latest_checkpoint(storage_dir: Path) -> Path | None:
    """Truncate ``trainable.pt`` of the checkpoint Ray Train would resume from (the latest in its
    run record) to half its size; the file, or None when there is no earlier one to go back to."""
    snapshot = storage_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return None
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    earlier = [p for p in storage_dir.glob("checkpoint_step*") if p.name < (latest or "")]
    if not latest or not earlier:
        return None
    target = storage_dir / latest / "trainable.pt"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def student_digest(out: Path) -> str:
    """sha256 over the exported student's weight files."""
    h = hashlib.sha256()
    for f in sorted((out / "students" / RUN_NAME).rglob("*.safetensors")):
        h.update(f.relative_to(out).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@dataclass
class Kill:
    step: int  # the step planned
    kind: str  # driver | worker
    at_step: int = 0  # the step the job had logged when the kill was sent
    orphan_steps: int | None = None  # driver kills: steps MLflow received after the kill
    corrupted: str | None = None  # the checkpoint file truncated before the restart


@dataclass
class Report:
    seed: int
    steps: int
    kills: list[Kill] = field(default_factory=list)
    kills_survived: int = 0
    bitwise_equal: bool = False
    tokens_counted_twice_or_skipped: int = 0
    mlflow_points_per_step: list[int] = field(default_factory=list)
    recoveries: list[str] = field(default_factory=list)  # the log lines of resumes past a broken checkpoint
    resumed_from_kill_tag: str | None = None
    attempts_tag: str | None = None
    seconds: float = 0.0


def plan_kills(n: int, steps: int, checkpoint_every: int, seed: int) -> list[Kill]:
    """N kills at distinct random steps after the first checkpoint, driver and worker in turn from
    a random first; the first driver kill that has a checkpoint to go back to also corrupts one."""
    rng = random.Random(seed)
    at = sorted(rng.sample(range(checkpoint_every + 1, steps), n))
    first = rng.randrange(2)
    return [Kill(s, ("driver", "worker")[(i + first) % 2]) for i, s in enumerate(at)]


def run_faults(workdir: Path, kills: list[Kill], steps: int, checkpoint_every: int) -> tuple[int, bool]:
    """The job under the kill plan; (kills survived, whether the last attempt succeeded)."""
    cfg = job_config(workdir, "faulty", steps, checkpoint_every, max_failures=len(kills) + 2)
    out, uri = workdir / "faulty", f"sqlite:///{workdir / 'faulty' / 'mlflow.db'}"
    job, survived, corrupted_once = Job(cfg, workdir / "faulty.log"), 0, False
    for kill in kills:
        kill.at_step = job.wait_for_step(kill.step)
        if job.proc.poll() is not None:
            break  # the job ended (or failed) before this kill
        if kill.kind == "worker":
            if not kill_worker(job):
                break
        else:
            os.kill(job.proc.pid, signal.SIGKILL)
            time.sleep(8)  # long enough for an orphaned worker to train on, were it not stopped
            kill.orphan_steps = max([s for s in logged_steps(uri) if s > kill.at_step], default=kill.at_step)
            kill.orphan_steps -= kill.at_step
            job.cleanup()
            if not corrupted_once:
                target = corrupt_latest_checkpoint(out / "ray" / RUN_NAME)
                kill.corrupted, corrupted_once = (str(target) if target else None), target is not None
            job = Job(cfg, workdir / "faulty.log")
        survived += 1
        print(
            f"[faults] {kill.kind} killed at step {kill.at_step}"
            + (f"; {kill.corrupted} truncated" if kill.corrupted else ""),
            flush=True,
        )
    return survived, job.finish() == 0


def compare(workdir: Path, report: Report) -> None:
    """The faulty run's student, token counts and MLflow history against the reference."""
    ref_uri, uri = (f"sqlite:///{workdir / t / 'mlflow.db'}" for t in ("reference", "faulty"))
    report.bitwise_equal = student_digest(workdir / "reference") == student_digest(workdir / "faulty")
    ref_tokens, tokens = metric_by_step(ref_uri, "tokens_seen"), metric_by_step(uri, "tokens_seen")
    report.tokens_counted_twice_or_skipped = sum(abs(int(tokens.get(s, 0)) - int(ref_tokens[s])) for s in ref_tokens)
    log = (workdir / "faulty.log").read_text()
    report.recoveries = [line.split("] ", 1)[-1].strip() for line in log.splitlines() if "failed its check" in line]
    steps = logged_steps(uri)
    report.mlflow_points_per_step = sorted({steps.count(s) for s in range(1, report.steps + 1)})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("faults").experiment_id])[0]
    report.resumed_from_kill_tag = run.data.tags.get("linearard.resumed_from_kill")
    report.attempts_tag = run.data.tags.get("linearard.attempts")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5, help="kills to inject (at least 5 for the reported figure)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.kills < 1 or args.kills >= args.steps - args.checkpoint_every:
        ap.error("--kills must be at least 1 and leave steps after the first checkpoint")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_faults_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LINEARARD_CACHE", str(workdir / "cache"))
    started = time.time()
    report = Report(args.seed, args.steps, plan_kills(args.kills, args.steps, args.checkpoint_every, args.seed))
    ref = Job(job_config(workdir, "reference", args.steps, args.checkpoint_every, 0), workdir / "reference.log")
    if ref.finish() != 0:
        print(f"[faults] the reference run failed; see {workdir / 'reference.log'}", file=sys.stderr)
        return 1
    report.kills_survived, ok = run_faults(workdir, report.kills, args.steps, args.checkpoint_every)
    if not ok:
        print(f"[faults] the faulty run did not finish; see {workdir / 'faulty.log'}", file=sys.stderr)
    compare(workdir, report)
    report.seconds = round(time.time() - started, 1)
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    good = (
        ok
        and report.kills_survived == args.kills
        and report.bitwise_equal
        and report.tokens_counted_twice_or_skipped == 0
        and report.mlflow_points_per_step == [1]
        and (report.recoveries or not any(k.corrupted for k in report.kills))
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
