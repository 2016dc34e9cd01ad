"""``data.teacher_samples``: text sampled from the teacher, made before the data is preprocessed.

Training on a corpus plus text the teacher itself wrote restored the most in the SmolLM2 study
(research/LOG.md). With this section a recipe says so in one place: the job samples the corpus
once (in a Ray actor that holds a GPU when the job trains on GPUs), keeps it under a name derived
from the teacher and the settings, resumes it batch by batch after an interruption, and appends it
to ``data.sources``. The driver writes the file, so it lands where the driver preprocesses even
when the actor runs on another node.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from linearard_ray.config import Config, ModelConfig, SampleSpec
from linearard_ray.logs import get_logger
from linearard_ray.paths import output_path

_log = get_logger(__name__)


def samples_path(cfg: Config) -> Path:
    """Where this config's teacher samples live: ``data.teacher_samples.path``, else a name that
    changes with the teacher or any sampling setting (so a changed setting never reuses a file)."""
    ts = cfg.data.teacher_samples
    if ts is None:
        raise ValueError("data.teacher_samples is not set")
    if ts.path:
        return Path(output_path(ts.path))
    from linearard_ray.data.sampling import sample_args

    key = json.dumps(sample_args(cfg.model, ts), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(output_path(Path("outputs") / "data" / "teacher-samples" / f"{digest}.jsonl"))


def short_samples_note(cfg: Config, path: Path) -> str | None:
    """A warning when some samples will give no training block, else None.

    Samples stop at EOS, so many are shorter than ``data.ctx_len``; without packing, preprocessing
    drops such a document whole (it counts it as ``no_full_block``), silently training on a small
    part of the samples (research/LOG.md). The count is a floor: a sample's text tokenized again
    often comes out a few tokens shorter than drawn (1,396 of SmolLM2's 1,849 shipped samples are
    dropped at ctx_len 2048, 623 of them drawn shorter; research/LOG.md#packing-context)."""
    d = cfg.data
    if d.pack or d.tail != "drop":
        return None
    with Path(path).open() as f:
        lengths = [json.loads(line)["tokens"] for line in f if line.strip()]
    short = sum(n < d.ctx_len for n in lengths)
    if not short:
        return None
    return (
        f"{short} of {len(lengths)} samples have fewer than data.ctx_len={d.ctx_len} tokens (and more "
        f"may once their text is tokenized again); with data.pack=false and data.tail=drop, preprocessing "
        f"skips each of them whole (no_full_block, counted in its report). "
        f"Set data.pack: best_fit to train on them too, each kept whole in one block (true packs them "
        f"across block boundaries)."
    )


class _SamplerActor:
    def __init__(self, model_cfg: ModelConfig, spec: SampleSpec, device: str):
        from linearard_ray.data.sampling import BatchSampler

        self.sampler = BatchSampler(model_cfg, spec, device=device, log=_log.info)

    def sample(self, b: int, batches: int) -> tuple[list[dict], int]:
        return self.sampler(b, batches)


def with_teacher_samples(cfg: Config, use_gpu: bool, log: Callable[[str], None] = _log.info) -> Config:
    """``cfg`` with its teacher samples in ``data.sources``, sampling whatever is missing first
    (Ray must be initialised). Without ``data.teacher_samples`` it returns ``cfg`` unchanged."""
    ts = cfg.data.teacher_samples
    if ts is None:
        return cfg
    from linearard_ray.data.sampling import is_complete, sample_corpus

    out = samples_path(cfg)
    if is_complete(out, cfg.model, ts):
        log(f"[distill] teacher samples: {out} (complete, reused)")
    else:
        import ray

        log(
            f"[distill] teacher samples: sampling {ts.num_samples} × up to {ts.max_new_tokens} tokens from "
            f"{cfg.model.teacher} on {'a GPU' if use_gpu else 'CPU'} into {out}"
        )
        # ts is a SampleSpec (plus its path), so it goes to the sampler as it is
        actor = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_SamplerActor).remote(
            cfg.model, ts, "cuda" if use_gpu else "cpu"
        )
        try:
            summary = sample_corpus(
                cfg.model, ts, out, log=log, sampler=lambda b, n: ray.get(actor.sample.remote(b, n))
            )
        finally:
            ray.kill(actor)
        log(
            f"[distill] teacher samples: {summary['written']} written, {summary['skipped_short']} skipped "
            f"(ended before {ts.min_tokens} tokens)"
        )
    note = short_samples_note(cfg, out)
    if note:
        log(f"[distill] teacher samples: {note}")
    if str(out) in cfg.data.sources:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": [*cfg.data.sources, str(out)]})})
