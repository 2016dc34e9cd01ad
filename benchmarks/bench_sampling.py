#!/usr/bin/env python
"""Teacher sampling throughput (`pipelines/sample_teacher.py`): transformers' top-p warper against
the bisection nucleus of `linearard_ray.data.sampling`, and how far their nucleus sets differ.

Both sides run the same `generate` call from BOS (sampling, top-k off, a fixed number of new
tokens) on the teacher; only the top-p step differs. The set comparison uses the teacher's real
next-token distributions after 64 sampled tokens, against a float64 sort of the same logits.

    python benchmarks/bench_sampling.py                         # smollm2-135m on the GPU
    python benchmarks/bench_sampling.py --teacher tiny:llama --batch 8 --tokens 16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "linearard_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--batch", type=int, nargs="+", default=[520, 1040])
    p.add_argument("--tokens", type=int, default=128, help="new tokens per timed generate call")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def _time_methods(model, tok, a) -> tuple[list[dict], object]:
    """Tokens per second of each top-p method at each batch size, and the last generated batch."""
    import torch
    from transformers import LogitsProcessorList

    from linearard_ray.data.sampling import NucleusSampling

    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def run(bs: int, **kw):
        ids = torch.full((bs, 1), start, dtype=torch.long, device=a.device)
        torch.manual_seed(0)
        _sync(a.device)
        t0 = time.perf_counter()
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=0,
            max_new_tokens=a.tokens,
            min_new_tokens=a.tokens,
            pad_token_id=tok.pad_token_id,
            **kw,
        )
        _sync(a.device)
        return gen, time.perf_counter() - t0

    methods = {
        "transformers top-p": {"top_p": a.top_p},
        "bisection nucleus": {"top_p": 1.0, "logits_processor": LogitsProcessorList([NucleusSampling(1.0, a.top_p)])},
        "no top-p": {"top_p": 1.0},
    }
    run(a.batch[0], top_p=1.0)  # warm-up: kernels, allocator
    runs, gen = [], None
    for bs in a.batch:
        for name, kw in methods.items():
            gen, dt = run(bs, **kw)
            r = {"batch": bs, "method": name, "ms_per_step": 1000 * dt / a.tokens, "tokens_per_s": bs * a.tokens / dt}
            runs.append(r)
            print(
                f"batch {bs:5d}  {name:20s} {r['ms_per_step']:7.1f} ms/step {r['tokens_per_s']:10,.0f} tok/s",
                flush=True,
            )
    return runs, gen


def _nucleus_sets(model, gen, top_p: float) -> dict[str, dict]:
    """Each method's nucleus on real next-token distributions against a float64 sort (ties broken
    by sort order)."""
    import torch
    from transformers import TopPLogitsWarper

    from linearard_ray.data.sampling import nucleus_keep

    with torch.no_grad():
        logits = model(gen[:, :64]).logits[:, -1, :].float()
    p64 = torch.softmax(logits.double(), -1)
    sp, order = p64.sort(-1, descending=True)
    ref = torch.zeros_like(sp, dtype=torch.bool).scatter(-1, order, (sp.cumsum(-1) - sp) < top_p)
    sets = {
        "transformers top-p": torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone())),
        "bisection nucleus": nucleus_keep(torch.softmax(logits, -1), top_p),
    }
    out = {}
    for name, keep in sets.items():
        d = keep ^ ref
        s = {
            "rows": int(keep.shape[0]),
            "rows_equal": int((~d.any(-1)).sum()),
            "max_tokens_differing": int(d.sum(-1).max()),
            "max_mass_differing": float((p64 * d).sum(-1).max()),
            "mean_kept": float(keep.sum(-1).float().mean()),
            "min_kept_mass": float((p64 * keep).sum(-1).min()),
        }
        out[name] = s
        print(
            f"{name:20s} vs float64 sort: {s['rows_equal']}/{s['rows']} rows equal, at most "
            f"{s['max_tokens_differing']} tokens / {s['max_mass_differing']:.2e} mass apart; "
            f"{s['mean_kept']:.0f} tokens kept on average, kept mass >= {s['min_kept_mass']:.4f}",
            flush=True,
        )
    return out


def main() -> int:
    a = _parser().parse_args()

    import torch

    from linearard_ray.config import ModelConfig
    from linearard_ray.models.loading import load_teacher, load_tokenizer

    cfg = ModelConfig(teacher=a.teacher)
    tok = load_tokenizer(cfg)
    model = load_teacher(cfg, device=a.device)
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    out = {
        "card": card,
        "teacher": a.teacher,
        "dtype": str(next(model.parameters()).dtype),
        "tokens": a.tokens,
        "top_p": a.top_p,
    }
    print(f"{card}, {a.teacher} ({out['dtype']}), {a.tokens} new tokens per call, top-p {a.top_p}", flush=True)
    out["runs"], gen = _time_methods(model, tok, a)
    out["sets"] = _nucleus_sets(model, gen, a.top_p)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
