"""research/gpu_round.sh on a CPU box: `start` writes the chain with the lengths and models the
environment asks for (the study's by default; with LONG_ONLY, short text for every model first and
long context for those named) and detaches it, `wait` reports how it ended, `fetch`
brings the job records and logs to $OUT. A variant the study does not know stops the chain at its
training step with that step's exit code, so nothing heavier than the argument check runs. Missing
arguments, bundle or model are refused before anything detaches."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.scripts import ROOT

pytestmark = pytest.mark.skipif(shutil.which("xz") is None, reason="gpu_round.sh unpacks the teacher corpus with xz")


def _run(tmp_path, *args, env_extra=None, gguf=True):
    """gpu_round.sh with a fake nvidia-smi, an empty Ray bundle folder and, with ``gguf``, a staged
    model file (its name is all the script checks)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "stage").mkdir(exist_ok=True)
    if gguf:
        (tmp_path / "stage" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_text("stub")
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "OUT": str(tmp_path / "out"),
        "SITE_DIR": str(tmp_path / "site"),
        "STAGE_DIR": str(tmp_path / "stage"),
        **(env_extra or {}),
    }
    return subprocess.run(
        ["bash", "research/gpu_round.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "lengths, long_only",
    [(None, None), (("[8192,16384,32768]", "[4096,8192,16384,30000]"), None), (None, "no-such-variant")],
)
def test_gpu_round_chain_start_wait_fetch(tmp_path, lengths, long_only):
    work = tmp_path / "work"
    seed = tmp_path / "seed_jobs.jsonl"
    seed.write_text('{"key": "k", "result": {"kind": "nll", "model": "teacher"}}\n')
    extra = (
        {}
        if lengths is None
        else {"LONG_LENGTHS": lengths[0], "PASSKEY_LENGTHS": lengths[1], "EVAL_ONLY": "no-such-variant,PI×4,YaRN×4"}
    )
    if long_only:
        extra["LONG_ONLY"] = long_only
    started = _run(tmp_path, "start", str(work), "no-such-variant", str(seed), env_extra=extra)
    assert started.returncode == 0 and "started chain" in started.stdout
    chain = (work / "chain.sh").read_text()
    want_long, want_pk = lengths or ("[16384,32768]", "[8192,16384,30000]")
    only = extra.get("EVAL_ONLY", "no-such-variant")
    if long_only:
        assert f"evaluate '{only}' '[]' '[]' {work}/out-short" in chain
        assert f"evaluate '{long_only}' '{want_long}' '{want_pk}' {work}/out" in chain
    else:
        assert f"evaluate '{only}' '{want_long}' '{want_pk}' {work}/out" in chain
    assert '--set "eval.long_lengths=$2" --set "eval.passkey_lengths=$3"' in chain
    assert (work / "eval" / "jobs.jsonl").read_text() == seed.read_text()  # the seed's jobs are reused
    waited = _run(tmp_path, "wait", str(work), "240")
    assert waited.returncode == 0 and "chain exit 12" in waited.stdout  # 12: the training step refused it
    assert "unknown variants ['no-such-variant']" in (work / "driver.log").read_text()
    # the shipped teacher corpus was unpacked, so no sampling step ran before training
    assert (work / "teacher_samples.jsonl").stat().st_size > 1_000_000 and " sample " not in (
        work / "driver.log"
    ).read_text()
    (tmp_path / "out").mkdir()
    fetched = _run(tmp_path, "fetch", str(work))
    assert fetched.returncode == 0
    assert {"jobs.jsonl", "driver.log", "round.tar.gz"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_gpu_round_genres_installs_the_carried_genres_over_the_hosts(tmp_path):
    """`genres` (the staging's first call, and `start` itself) replaces the host's genre cache with a
    carried .gpu-genres, and leaves it alone when none was carried."""
    home = tmp_path / "home"
    stale = home / ".cache" / "linearard_ray" / "genres" / "stale"
    stale.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home)}
    script = str(ROOT / "research" / "gpu_round.sh")
    assert subprocess.run(["bash", script, "genres"], cwd=tmp_path, env=env).returncode == 0
    assert stale.is_dir()  # nothing carried: the host's cache stays
    (tmp_path / ".gpu-genres" / "legal").mkdir(parents=True)
    (tmp_path / ".gpu-genres" / "build.json").write_text("{}\n")
    assert subprocess.run(["bash", script, "genres"], cwd=tmp_path, env=env).returncode == 0
    installed = home / ".cache" / "linearard_ray" / "genres"
    assert sorted(p.name for p in installed.iterdir()) == ["build.json", "legal"]


def test_gpu_round_sweep_reads_the_shipped_corpus_and_shares_the_card(tmp_path):
    """`sweep` derives the sweep config with the unpacked shipped corpus, runs pipelines/tune.py with
    TRIALS_PER_GPU trials a card and the overrides given; a bad override stops the chain at the sweep
    (exit 15) after tune.py's own config check, so nothing trains here."""
    work = tmp_path / "work"
    started = _run(
        tmp_path,
        "sweep",
        str(work),
        "configs/sweep-smollm2-135m-genres.yaml",
        "4",
        "model.teacher=tiny:llama",
        "tune.metric=no_such_metric",
        gguf=False,  # a tiny random teacher needs no model file: a note, not a refusal
    )
    assert started.returncode == 0 and "started chain" in started.stdout, started.stderr
    assert "fine for this tiny teacher" in started.stderr
    derived = (work / "sweep.yaml").read_text()
    assert str(work / "teacher_samples.jsonl") in derived and "teacher_samples:" not in derived
    chain = (work / "chain.sh").read_text()
    assert "--set train.gpus_per_worker=0.25" in chain and f"--set tune.storage_path={work}/tune" in chain
    assert f"--set train.output_dir={work}/students" in chain  # the winner's student stays on the host
    assert "--set 'tune.metric=no_such_metric'" in chain
    waited = _run(tmp_path, "wait", str(work), "240")
    assert waited.returncode == 0 and "chain exit 15" in waited.stdout
    assert "no_such_metric" in (work / "driver.log").read_text()


def test_gpu_round_refuses_before_detaching(tmp_path):
    """No phase, an unknown one, missing arguments, a missing model, bundle or seed file and fetch
    without $OUT each exit 2 with a line naming what is missing, and no chain is started."""
    work = tmp_path / "work"
    cases = [
        ((), {}, True, "One restoration-study round"),  # the usage text
        (("bogus",), {}, True, "unknown phase 'bogus'"),
        (("start",), {}, True, "start needs WORK"),
        (("start", str(work)), {}, True, "start needs WORK and VARIANTS"),
        (("start", str(work), "genre-long"), {}, False, "no SmolLM2 GGUF"),
        (("start", str(work), "genre-long"), {"SITE_DIR": str(tmp_path / "nowhere")}, True, "no Ray bundle"),
        (("start", str(work), "genre-long", f"{tmp_path}/a.jsonl"), {}, True, "no seed jobs file"),
        (("sweep", str(work), "configs/none.yaml"), {}, True, "no sweep config configs/none.yaml"),
        (("sweep", str(work), "configs/sweep-smollm2-135m-genres.yaml"), {}, False, "no SmolLM2 GGUF"),
        (("start", str(work), "x-s0"), {"RECIPE_VARIANTS": "x=configs/none.yaml"}, True, "no recipe config"),
        (("start", str(work), "x-s0"), {"RECIPE_VARIANTS": "configs/a.yaml"}, True, "NAME=CONFIG entries"),
        (("wait", str(work)), {}, True, "wait needs WORK and SECONDS"),
        (("fetch", str(work)), {"OUT": str(tmp_path / "no-out")}, True, "fetch copies to $OUT"),
    ]
    for args, env, gguf, message in cases:
        for f in (tmp_path / "stage").glob("*.gguf"):
            f.unlink()
        r = _run(tmp_path, *args, env_extra=env, gguf=gguf)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert not (work / "chain.sh").exists()
    help_text = _run(tmp_path, "--help")
    assert help_text.returncode == 0 and "sweep:  bash research/gpu_round.sh sweep" in help_text.stdout


def test_gpu_round_seeds_the_evaluation_with_several_job_files(tmp_path):
    work = tmp_path / "work"
    seeds = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for i, f in enumerate(seeds):
        f.write_text(f'{{"key": "k{i}", "result": {{"kind": "nll", "model": "teacher"}}}}\n')
    started = _run(tmp_path, "start", str(work), "no-such-variant", ",".join(map(str, seeds)))
    assert started.returncode == 0, started.stderr
    assert (work / "eval" / "jobs.jsonl").read_text() == "".join(f.read_text() for f in seeds)
    assert _run(tmp_path, "wait", str(work), "240").returncode == 0


def test_gpu_round_passes_recipe_variants_to_training_and_evaluation(tmp_path):
    """RECIPE_VARIANTS reaches restoration_study.py's train and eval alike; the study defines the
    variant and then refuses the unknown one beside it, at the training step (exit 12)."""
    work = tmp_path / "work"
    env = {"RECIPE_VARIANTS": "cand=configs/smollm2-135m-x4-restore-general.yaml"}
    started = _run(tmp_path, "start", str(work), "cand-s0,no-such-variant", env_extra=env)
    assert started.returncode == 0, started.stderr
    chain = (work / "chain.sh").read_text()
    assert chain.count("--recipe-variant 'cand=configs/smollm2-135m-x4-restore-general.yaml'") == 2
    waited = _run(tmp_path, "wait", str(work), "240")
    assert "chain exit 12" in waited.stdout
    assert "unknown variants ['no-such-variant']" in (work / "driver.log").read_text()
