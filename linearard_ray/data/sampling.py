"""A training corpus sampled from the teacher itself (a data-free stream for the KL terms).

The KL terms ask the student to match the teacher's distributions; on a single-domain corpus they
only see that domain. Text the teacher writes from scratch (ancestral sampling from its first
token) spreads over whatever the teacher knows, so a student distilled on it is corrected where
the teacher puts its probability mass rather than only on the training domain. The file written
is ordinary JSONL (``{"id", "text", "tokens"}``), usable in ``data.sources`` next to any corpus.

Sampling is seeded per batch (from the seed and the batch index), so a run that stops can be started again with
the same arguments and continues after the last complete batch; the arguments are kept in a
sidecar ``<out>.meta.json`` and a restart with different ones is refused. Samples that end (EOS)
before ``min_tokens`` are counted and reported, never silently dropped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import ValidationError

from linearard_ray.config import ModelConfig, SampleSpec
from linearard_ray.logs import get_logger

_log = get_logger(__name__)

__all__ = [
    "BatchSampler",
    "NucleusSampling",
    "SampleSpec",
    "SamplingError",
    "is_complete",
    "nucleus_keep",
    "sample_args",
    "sample_corpus",
]


class SamplingError(ValueError):
    """Bad sampling arguments, or an output file that belongs to other arguments."""


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _resume_point(out: Path, meta: dict) -> tuple[int, int, int]:
    """(complete batches already written, records written, skipped) for a restart of the same run."""
    mp = _meta_path(out)
    if not out.exists():
        return 0, 0, 0
    if not mp.exists():
        raise SamplingError(f"{out} exists but has no {mp.name}; it was not written by this sampler (remove it)")
    old = json.loads(mp.read_text())
    if old.get("args") != meta["args"]:
        raise SamplingError(f"{out} was sampled with other arguments {old.get('args')}; use a new path or remove it")
    return int(old.get("batches_done", 0)), int(old.get("written", 0)), int(old.get("skipped", 0))


def _plain_spec(spec: SampleSpec) -> SampleSpec:
    """The sampling settings alone (a TeacherSamplesConfig also carries its path), validated again:
    ``model_copy(update=...)`` does not validate."""
    try:
        return SampleSpec(**spec.model_dump(include=set(SampleSpec.model_fields)))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise SamplingError(f"{where + ': ' if where else ''}{err['msg']}") from None


def sample_args(model_cfg: ModelConfig, spec: SampleSpec) -> dict:
    """Everything the samples depend on: kept in the sidecar (a restart must match it) and hashed
    into data.teacher_samples' default file name."""
    return {"teacher": model_cfg.teacher, **_plain_spec(spec).model_dump()}


def is_complete(out: str | Path, model_cfg: ModelConfig, spec: SampleSpec) -> bool:
    """Whether ``out`` holds every batch of this teacher and these settings (SamplingError when it
    was written with other ones: a named file is never silently replaced)."""
    spec = _plain_spec(spec)
    done, _, _ = _resume_point(Path(out), {"args": sample_args(model_cfg, spec)})
    return done >= math.ceil(spec.num_samples / spec.batch_size)


def nucleus_keep(probs: torch.Tensor, top_p: float, iters: int = 32) -> torch.Tensor:
    """Boolean mask of each row's nucleus: the smallest set of most likely tokens whose mass is at
    least ``top_p``, i.e. every token with probability >= t*, t* the largest threshold that still
    keeps that mass. t* is found by bisection, each step one masked sum over the vocabulary,
    instead of transformers' sort-based top-p warper: a fixed number of masked sums avoids sorting
    the whole vocabulary at every decoding step, which pays off at the large batches teacher
    samples are drawn with (benchmarks/bench_sampling.py; figures in research/LOG.md). Ties at t*
    (common: the logits come from bf16) are all kept, so the set does not depend on a sort's order
    among equal probabilities."""
    p = probs.float()
    lo = torch.zeros(p.shape[:-1] + (1,), dtype=p.dtype, device=p.device)  # mass(>= lo) >= top_p holds
    hi = p.amax(dim=-1, keepdim=True)
    hi_mass = torch.where(p >= hi, p, 0).sum(-1, keepdim=True)
    lo = torch.where(hi_mass >= top_p, hi, lo)  # the top token alone is enough
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = torch.where(p >= mid, p, 0).sum(-1, keepdim=True) >= top_p
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return p >= lo


class NucleusSampling:
    """Temperature then nucleus (top-p) filtering as a logits processor for ``generate``, with the
    nucleus from ``nucleus_keep``; generate runs with temperature 1 and top_p 1 around it."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature if self.temperature != 1.0 else scores
        if self.top_p >= 1.0:
            return scores
        keep = nucleus_keep(torch.softmax(scores.float(), dim=-1), self.top_p)
        return scores.masked_fill(~keep, float("-inf"))


class _Progress:
    """A stopping criterion that never stops: it logs the decoding position of a long batch
    (a batch of 2,048-token samples runs for minutes with nothing else to show)."""

    def __init__(self, log: Callable[[str], None], label: str, total: int, every: int):
        self.log, self.label, self.total, self.every = log, label, total, max(1, every)
        self.start_len: int | None = None
        self.t0 = time.time()

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.start_len is None:
            self.start_len = input_ids.shape[1] - 1
        done = input_ids.shape[1] - self.start_len
        if done % self.every == 0 and done < self.total:
            rate = done * input_ids.shape[0] / max(time.time() - self.t0, 1e-9)
            self.log(f"[sample] {self.label}: token {done}/{self.total}, {rate:,.0f} tokens/s")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class BatchSampler:
    """The teacher, loaded once, generating one seeded batch of samples at a time. The driver of
    ``sample_corpus`` owns the file; this object only generates, so it can live in a Ray actor on
    a GPU node while the output stays where the driver is."""

    def __init__(self, model_cfg: ModelConfig, spec: SampleSpec, device=None, log: Callable[[str], None] = _log.info):
        from linearard_ray.models.loading import load_teacher, load_tokenizer

        self.spec, self.log = spec, log
        self.tok = load_tokenizer(model_cfg)
        self.model = load_teacher(model_cfg, device=device)
        self.start_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if self.start_id is None:
            raise SamplingError(
                f"the tokenizer of {model_cfg.teacher} has neither a BOS nor an EOS token to start from"
            )
        self.nucleus = NucleusSampling(spec.temperature, spec.top_p)

    def __call__(self, b: int, batches: int) -> tuple[list[dict], int]:
        """Batch ``b`` (0-based) of ``batches``: (records of the samples kept, samples skipped)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        spec, tok = self.spec, self.tok
        n = min(spec.batch_size, spec.num_samples - b * spec.batch_size)
        torch.manual_seed(spec.seed * 1_000_003 + b)
        dev = next(self.model.parameters()).device
        ids = torch.full((n, 1), self.start_id, dtype=torch.long, device=dev)
        progress = _Progress(
            self.log, f"batch {b + 1}/{batches}", spec.max_new_tokens, every=max(64, spec.max_new_tokens // 8)
        )
        with torch.no_grad():
            gen = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                logits_processor=LogitsProcessorList([self.nucleus]),
                max_new_tokens=spec.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                stopping_criteria=StoppingCriteriaList([progress]),
            )
        records, skipped = [], 0
        for i, row in enumerate(gen[:, 1:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            if len(row) < spec.min_tokens:
                skipped += 1
                continue
            records.append(
                {
                    "id": f"teacher-{b * spec.batch_size + i}",
                    "text": tok.decode(row, skip_special_tokens=True),
                    "tokens": len(row),
                }
            )
        return records, skipped


def _resume(out: Path, meta: dict, batches: int, log: Callable[[str], None]) -> tuple[int, int, int]:
    """(batches done, samples written, samples skipped) of an earlier run into ``out``, with any
    partially written batch cut off the file."""
    done, written, skipped = _resume_point(out, meta)
    if out.exists():
        # Drop a partially written batch (a crash between its records and the sidecar).
        lines = out.read_text(encoding="utf-8").splitlines(keepends=True)[:written]
        out.write_text("".join(lines), encoding="utf-8")
        log(f"[sample] resuming {out} after {done}/{batches} batches ({written} samples)")
    return done, written, skipped


def sample_corpus(
    model_cfg: ModelConfig,
    spec: SampleSpec,
    out_path: str | Path,
    *,
    device=None,
    log: Callable[[str], None] = _log.info,
    sampler: Callable[[int, int], tuple[list[dict], int]] | None = None,
) -> dict:
    """Write ``spec.num_samples`` teacher samples to ``out_path`` (JSONL); returns the summary.

    ``sampler(b, batches)`` generates batch b; default a local ``BatchSampler`` on ``device``."""
    spec = _plain_spec(spec)
    out = Path(out_path)
    if out.suffix != ".jsonl":
        raise SamplingError(f"out must be a .jsonl file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"args": sample_args(model_cfg, spec)}
    batches = math.ceil(spec.num_samples / spec.batch_size)
    done, written, skipped = _resume(out, meta, batches, log)
    meta.update(batches_done=done, written=written, skipped=skipped)
    _meta_path(out).write_text(json.dumps(meta, indent=1))
    if sampler is None and done < batches:
        sampler = BatchSampler(model_cfg, spec, device=device, log=log)
    tokens = 0
    t0 = time.time()
    with open(out, "a", encoding="utf-8") as f:
        for b in range(done, batches):
            records, skipped_b = sampler(b, batches)
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            written += len(records)
            skipped += skipped_b
            tokens += sum(r["tokens"] for r in records)
            meta.update(batches_done=b + 1, written=written, skipped=skipped)
            _meta_path(out).write_text(json.dumps(meta, indent=1))
            rate = tokens / max(time.time() - t0, 1e-9)
            log(
                f"[sample] batch {b + 1}/{batches}: {written} samples written, {skipped} skipped "
                f"(ended before {spec.min_tokens} tokens), {rate:,.0f} tokens/s"
            )
    summary = {
        "out": str(out),
        "written": written,
        "skipped_short": skipped,
        "batches": batches,
        "tokens_this_run": tokens,
        "seconds": round(time.time() - t0, 1),
    }
    if written == 0:
        raise SamplingError(f"no sample reached min_tokens={spec.min_tokens}; lower it or raise max_new_tokens")
    return summary
