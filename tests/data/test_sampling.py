"""pipelines/sample_teacher.py: a corpus sampled from the teacher, seeded, resumable, counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linearard_ray.config import ModelConfig
from linearard_ray.data.sampling import SampleSpec, SamplingError, sample_corpus
from linearard_ray.data.sources import iter_documents, resolve_sources

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def model_cfg(tiny_model_dir):
    tiny_model_dir("llama")
    return ModelConfig(teacher="tiny:llama")


def _records(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_samples_are_seeded_counted_and_readable_as_a_source(model_cfg, tmp_path):
    spec = SampleSpec(num_samples=5, max_new_tokens=24, min_tokens=4, batch_size=2, seed=1)
    a = sample_corpus(model_cfg, spec, tmp_path / "a.jsonl", device="cpu", log=lambda m: None)
    b = sample_corpus(model_cfg, spec, tmp_path / "b.jsonl", device="cpu", log=lambda m: None)
    ra, rb = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert ra == rb  # same seed, same samples
    assert a["written"] + a["skipped_short"] == 5 and a["written"] == len(ra) > 0 and a["batches"] == 3
    assert all(4 <= r["tokens"] <= 24 and r["text"] for r in ra)
    assert len({r["text"] for r in ra}) == len(ra)  # sampled, not one greedy string
    c = sample_corpus(
        model_cfg, spec.model_copy(update={"seed": 2}), tmp_path / "c.jsonl", device="cpu", log=lambda m: None
    )
    assert _records(tmp_path / "c.jsonl") != ra and c["written"] > 0
    docs = [d for item in resolve_sources([str(tmp_path / "a.jsonl")]) for d in iter_documents(item)]
    assert [d.text for d in docs] == [r["text"] for r in ra]
    assert b["tokens_this_run"] == sum(r["tokens"] for r in rb)


def test_restart_continues_after_the_last_complete_batch(model_cfg, tmp_path):
    spec = SampleSpec(num_samples=6, max_new_tokens=16, min_tokens=2, batch_size=2, seed=4)
    full = tmp_path / "full.jsonl"
    sample_corpus(model_cfg, spec, full, device="cpu", log=lambda m: None)
    want = _records(full)
    # A run that died during batch 2: batch 1's records, half a line, and a sidecar after batch 1.
    part = tmp_path / "part.jsonl"
    first = [r for r in want if int(r["id"].split("-")[1]) < 2]
    part.write_text("".join(json.dumps(r) + "\n" for r in first) + '{"id": "teacher-2", "te')
    meta = json.loads((tmp_path / "full.jsonl.meta.json").read_text())
    meta.update(batches_done=1, written=len(first), skipped=2 - len(first))
    (tmp_path / "part.jsonl.meta.json").write_text(json.dumps(meta))
    logs = []
    out = sample_corpus(model_cfg, spec, part, device="cpu", log=logs.append)
    assert _records(part) == want
    assert any("resuming" in m and "1/3" in m for m in logs)
    assert out["written"] == len(want)


def test_bad_arguments_and_foreign_files_are_refused(model_cfg, tmp_path):
    spec = SampleSpec(num_samples=2, max_new_tokens=8, min_tokens=2, batch_size=2)
    sample_corpus(model_cfg, spec, tmp_path / "x.jsonl", device="cpu", log=lambda m: None)
    with pytest.raises(SamplingError, match="other arguments"):
        sample_corpus(model_cfg, spec.model_copy(update={"temperature": 0.5}), tmp_path / "x.jsonl", device="cpu")
    (tmp_path / "foreign.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(SamplingError, match="not written by this sampler"):
        sample_corpus(model_cfg, spec, tmp_path / "foreign.jsonl", device="cpu")
    with pytest.raises(SamplingError, match="min_tokens"):
        sample_corpus(
            model_cfg,
            spec.model_copy(update={"min_tokens": 50}),
            tmp_path / "y.jsonl",
            device="cpu",
            log=lambda m: None,
        )
    with pytest.raises(SamplingError, match=".jsonl"):
        sample_corpus(model_cfg, spec, tmp_path / "z.txt", device="cpu")


def test_cli(tmp_path, tiny_model_dir):
    tiny_model_dir("llama")
    cmd = [
        sys.executable,
        str(ROOT / "pipelines" / "sample_teacher.py"),
        "--set",
        "model.teacher=tiny:llama",
        "--out",
        str(tmp_path / "s.jsonl"),
        "--samples",
        "3",
        "--tokens",
        "12",
        "--min-tokens",
        "2",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["written"] == len(_records(tmp_path / "s.jsonl")) > 0
    bad = subprocess.run(cmd[:-10] + ["--samples", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--samples" in bad.stderr
    unreachable = subprocess.run(cmd[:-6] + ["--min-tokens", "13"], capture_output=True, text=True, timeout=300)
    assert unreachable.returncode == 2 and "min_tokens=13 is more than max_new_tokens=12" in unreachable.stderr


def test_long_batches_report_progress(model_cfg, tmp_path):
    lines: list[str] = []
    spec = SampleSpec(num_samples=2, max_new_tokens=130, min_tokens=1, batch_size=2, seed=3)
    out = sample_corpus(model_cfg, spec, tmp_path / "p.jsonl", device="cpu", log=lines.append)
    steps = [ln for ln in lines if "token " in ln]
    # every 64 decoded tokens while the batch is still running (unless every sample hit EOS first)
    longest = max(r["tokens"] for r in _records(tmp_path / "p.jsonl"))
    assert any("batch 1/1: token 64/130" in ln for ln in steps) == (longest >= 64)
    assert all("tokens/s" in ln for ln in steps) and out["written"] >= 1


def _nucleus_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sort-based nucleus in float64: the most likely tokens, in order, until their mass reaches top_p."""
    probs = torch.softmax(logits.double(), dim=-1)
    sp, order = probs.sort(dim=-1, descending=True)
    before = sp.cumsum(-1) - sp  # mass of the tokens ranked above each one
    keep_sorted = before < top_p  # a token is needed while the mass above it is short of top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
def test_bisection_nucleus_matches_the_sorted_definition(top_p):
    from linearard_ray.data.sampling import nucleus_keep

    g = torch.Generator().manual_seed(int(top_p * 1000))
    rows = [torch.randn(4, 5000, generator=g) * s for s in (0.5, 2.0, 6.0)]  # flat to peaked
    peaked = torch.randn(1, 5000, generator=g)
    peaked[0, 7] = 40.0  # one token holds nearly all the mass
    logits = torch.cat(rows + [peaked])
    got = nucleus_keep(torch.softmax(logits, dim=-1), top_p)
    want = _nucleus_reference(logits, top_p)
    assert torch.equal(got, want)
    assert got[-1].sum() == 1 and got[-1, 7]
    kept_mass = (torch.softmax(logits.double(), -1) * got).sum(-1)
    assert (kept_mass >= top_p - 1e-6).all()


def test_nucleus_processor_applies_temperature_then_masks():
    from linearard_ray.data.sampling import NucleusSampling

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 700, generator=g) * 3
    out = NucleusSampling(temperature=0.7, top_p=0.8)(None, scores)
    want = _nucleus_reference(scores / 0.7, 0.8)
    assert torch.equal(torch.isfinite(out), want)
    assert torch.allclose(out[want], (scores / 0.7)[want])
    assert torch.equal(NucleusSampling(1.0, 1.0)(None, scores), scores)


def test_nucleus_keeps_a_tied_boundary_group_whole():
    from linearard_ray.data.sampling import nucleus_keep

    g = torch.Generator().manual_seed(11)
    # Logits on a coarse grid, as bf16 logits are: many tokens share each probability.
    logits = (torch.randn(6, 3000, generator=g) * 2).mul(4).round().div(4)
    probs = torch.softmax(logits.double(), -1)
    keep = nucleus_keep(torch.softmax(logits, -1), 0.9)
    for row, k in zip(probs, keep, strict=False):
        t = row[k].min()
        assert torch.equal(k, row >= t)  # a threshold set: every token as likely as the last kept one is kept
        assert row[k].sum() >= 0.9 - 1e-6
        assert row[row > t].sum() < 0.9  # and the threshold is the highest that keeps the mass


def test_completeness_is_judged_by_the_sidecar_and_foreign_settings_are_refused(model_cfg, tmp_path):
    from linearard_ray.data.sampling import is_complete

    spec = SampleSpec(num_samples=3, max_new_tokens=12, min_tokens=2, batch_size=2, seed=5)
    out = tmp_path / "s.jsonl"
    assert not is_complete(out, model_cfg, spec)
    sample_corpus(model_cfg, spec.model_copy(update={"num_samples": 2}), out, device="cpu", log=lambda m: None)
    with pytest.raises(SamplingError, match="other arguments"):
        is_complete(out, model_cfg, spec)  # 2 samples on file, 3 asked for: never silently reused
    out2 = tmp_path / "t.jsonl"
    sample_corpus(model_cfg, spec, out2, device="cpu", log=lambda m: None)
    assert is_complete(out2, model_cfg, spec)


def test_the_default_samples_path_follows_the_teacher_and_every_setting(tmp_path, monkeypatch):
    from linearard_ray.config import load_config
    from linearard_ray.data.teacher_samples import samples_path, with_teacher_samples

    monkeypatch.chdir(tmp_path)
    base = ["data.teacher_samples={num_samples: 8, batch_size: 4}"]
    p = samples_path(load_config(None, base))
    assert p.parent == tmp_path.resolve() / "outputs" / "data" / "teacher-samples" and p.suffix == ".jsonl"
    assert samples_path(load_config(None, base)) == p
    for extra in (["data.teacher_samples.top_p=0.9"], ["data.teacher_samples.seed=1"], ["model.teacher=tiny:llama"]):
        assert samples_path(load_config(None, [*base, *extra])) != p, extra
    named = load_config(None, [*base, "data.teacher_samples.path=corp/x.jsonl"])
    assert samples_path(named) == tmp_path.resolve() / "corp" / "x.jsonl"
    plain = load_config(None, [])
    assert with_teacher_samples(plain, use_gpu=False) is plain  # no section: nothing sampled, nothing added


def test_samples_shorter_than_a_block_are_announced_unless_packed(tmp_path):
    """Without packing, a sample shorter than data.ctx_len gives no block: the job says how many."""
    import random

    from linearard_ray.config import load_config
    from linearard_ray.data.teacher_samples import short_samples_note

    rng = random.Random()
    lengths = [
        rng.randrange(1, 100),
        rng.randrange(100, 200),
        *(rng.randrange(1, 200) for _ in range(rng.randrange(5, 30))),
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": "x", "tokens": n}) + "\n" for i, n in enumerate(lengths)))
    base = ["data.teacher_samples={num_samples: 8, batch_size: 4}", "data.ctx_len=100"]
    short = sum(n < 100 for n in lengths)
    note = short_samples_note(load_config(None, base), path)
    assert note.startswith(f"{short} of {len(lengths)} samples") and "data.pack: best_fit" in note
    assert short_samples_note(load_config(None, [*base, "data.pack=true"]), path) is None
    assert short_samples_note(load_config(None, [*base, "data.pack=best_fit"]), path) is None
    assert short_samples_note(load_config(None, [*base, "data.tail=pad"]), path) is None
