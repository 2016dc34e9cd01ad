"""research/stage_gpu_round.sh in a clone of the repository: the GGUF cut into equal parts that each
fit beside the working tree under the per-call limit, joined back to the same bytes by the command it
prints, and the genres carried with the last part (no Ray bundle here) or with the bundle."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from tests.scripts import ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the script measures the tree with git")


def _disk_bytes(path) -> int:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) * 1024


def _stage(tmp_path, bundle_mib: int | None):
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    shutil.copy(ROOT / "research" / "stage_gpu_round.sh", repo / "research")  # the script as it is now
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(5 * 1024 * 1024 + 123))
    genres = tmp_path / "genres"
    (genres / "legal").mkdir(parents=True)
    (genres / "build.json").write_text("{}\n")
    (genres / "legal" / "manifest.json").write_text("{}\n")
    if bundle_mib:
        (repo / ".gpu-bundle").mkdir()
        (repo / ".gpu-bundle" / "site.tar.xz").write_bytes(os.urandom(bundle_mib * 1024 * 1024))
        (repo / ".git" / "info" / "exclude").write_text("/.gpu-bundle/\n")
    tree = _disk_bytes(repo) - _disk_bytes(repo / ".git") - (_disk_bytes(repo / ".gpu-bundle") if bundle_mib else 0)
    limit_mib = tree // (1024 * 1024) + 5  # about 4 MiB of room beside the tree
    env = {**os.environ, "GGUF": str(gguf), "GENRES": str(genres), "LIMIT_MIB": str(limit_mib)}
    run = subprocess.run(
        ["bash", "research/stage_gpu_round.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return repo, gguf, limit_mib, run.stdout


@pytest.mark.parametrize("bundle_mib", [None, 1])
def test_stage_gpu_round_parts_fit_and_join_back(tmp_path, bundle_mib):
    repo, gguf, limit_mib, out = _stage(tmp_path, bundle_mib)
    parts = sorted((repo / ".gpu-stage").iterdir(), key=lambda p: int(p.name))
    assert len(parts) >= 2 and f"in {len(parts)} part(s)" in out
    sizes = [sum(f.stat().st_size for f in p.glob("*.part.*")) for p in parts]
    assert max(sizes) - min(sizes) <= len(parts)  # equal parts
    tree = _disk_bytes(repo) - sum(
        _disk_bytes(repo / d) for d in (".git", ".gpu-stage", ".gpu-genres", ".gpu-bundle") if (repo / d).exists()
    )
    genres = _disk_bytes(repo / ".gpu-genres")
    for i, p in enumerate(parts, 1):
        carried = _disk_bytes(p) + (genres if i == len(parts) and not bundle_mib else 0)
        assert tree + carried <= limit_mib * 1024 * 1024
    joined = b"".join(f.read_bytes() for p in parts for f in sorted(p.glob("*.part.*")))
    assert hashlib.sha256(joined).hexdigest() == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert (parts[-1] / "manifest.sha256").read_text().split()[0] == hashlib.sha256(joined).hexdigest()
    last_call = out.strip().splitlines()[-1]
    assert ('".gpu-genres"' in last_call) is (not bundle_mib)
    assert ('carry [".gpu-bundle", ".gpu-genres"]' in out) is bool(bundle_mib)
    assert {"/.gpu-stage/", "/.gpu-genres/"} <= set((repo / ".git" / "info" / "exclude").read_text().split())
