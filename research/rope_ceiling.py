#!/usr/bin/env python
"""How much of the teacher's attention rides on rotary pairs that a PI×s student cannot rotate.

Position interpolation by s divides every RoPE frequency by s, so the student's fastest rotary
pair turns at ω_max/s. A LoRA on q/k acts before the rotation: it can move a teacher pair's
content to a pair whose scaled frequency is close, but nothing turns faster than ω_max/s. The
teacher's pairs with ω > ω_max/s (4 of SmolLM2's 32 at s=4) therefore have no counterpart.

For each layer and head this script splits the teacher's post-RoPE attention logits
S = Σ_pairs c_p into the part F carried by those fast pairs and the rest, on the evaluation's own
windows of each domain, and reports per row (query position):
- KL(softmax S ‖ softmax(S − F)): what dropping the fast pairs alone does to the attention rows;
- the fast pairs' share of the attention-weighted logit variance, Var_A(F) / (Var_A(F) +
  Var_A(S − F)) summed over rows (bounded: F and the rest can partly cancel, so Var_A(F) alone
  can exceed Var_A(S)).
Neither is the student's error (the student can approximate F with slower pairs); they measure
how much each domain's attention leans on local, fast-rotating position information.

    python research/rope_ceiling.py                                   # SmolLM2-135M, ×4, 512 tokens, CPU
    python research/rope_ceiling.py --teacher tiny:llama --factor 2 --length 64 --windows 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "linearard_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def fast_pairs(inv_freq, factor: float):
    """Indices of the rotary pairs turning faster than the scaled model's fastest pair."""
    return [i for i, w in enumerate(inv_freq.tolist()) if w > float(inv_freq.max()) / factor]


def row_figures(q, k, scale: float, fast: list[int]):
    """Per-row KL(softmax S ‖ softmax(S − F)), and per-row Var_A(F) and Var_A(S − F), causal,
    over [H, T] rows.

    q: [H, T, D], k: [H, T, D] (GQA already repeated), post-RoPE; rotate_half layout, so pair p is
    dimensions p and p + D/2."""
    import torch

    D = q.shape[-1]
    dims = fast + [p + D // 2 for p in fast]
    S = torch.einsum("htd,hsd->hts", q, k) * scale
    F = torch.einsum("htd,hsd->hts", q[..., dims], k[..., dims]) * scale
    T = S.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=S.device).tril()
    neg = torch.finfo(S.dtype).min
    logp = torch.log_softmax(S.masked_fill(~causal, neg), -1)
    logp_drop = torch.log_softmax((S - F).masked_fill(~causal, neg), -1)
    p = logp.exp()
    kl = (p * (logp - logp_drop)).masked_fill(~causal, 0).sum(-1)
    R = S - F

    def var(X):
        m = (p * X).sum(-1, keepdim=True)
        return (p * (X - m) ** 2).masked_fill(~causal, 0).sum(-1)

    return kl, var(F), var(R)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument(
        "--domain",
        action="append",
        default=None,
        help="NAME=SOURCE (repeatable); default SOTU=builtin:sotu/eval and pydocs=builtin:pydocs",
    )
    p.add_argument("--seed", type=int, default=0, help="window seed (the evaluation's default, so the same windows)")
    p.add_argument("--json", default=None)
    return p


def _rotary_frequencies(cfg):
    """The model's head dimension, RoPE base and per-pair inverse frequencies (float64)."""
    import torch

    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    return D, theta, 1.0 / (float(theta) ** (torch.arange(0, D, 2, dtype=torch.float64) / D))


def _window_figures(model, window, layers: list[int], fast: list[int]):
    """Per layer, on one window: the mean row KL, and the fast and remaining pairs' summed variance."""
    import torch

    from linearard_ray.models.capture import capture_qkv

    ids = torch.as_tensor(window, dtype=torch.long)[None]
    with torch.no_grad(), capture_qkv(model, layers, what=("q", "k")) as cap:
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    per_layer = []
    for layer in layers:
        q, k = cap.q[layer][0], cap.k[layer][0]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        per_layer.append(row_figures(q.double(), k.double(), float(cap.scaling[layer]), fast))
    return (
        torch.stack([x[0].mean() for x in per_layer]),
        torch.stack([x[1].sum() for x in per_layer]),
        torch.stack([x[2].sum() for x in per_layer]),
    )


def _domain_figures(model, tok, name: str, source: str, layers: list[int], fast: list[int], a) -> dict:
    """One domain's KL and fast-pair variance share per layer, over ``a.windows`` windows."""
    import torch

    from linearard_ray.evaluation.texts import bos_prefix, load_documents, make_windows, tokenize_documents

    docs = load_documents([source])
    tok_docs = tokenize_documents(docs, tok)
    ws = make_windows(
        tok_docs, [d.id for d in docs.documents], a.length, a.windows, a.seed, bos_prefix(tok), tok.eos_token_id
    )
    figures = [_window_figures(model, w, layers, fast) for w in ws.windows]
    kl = torch.stack([f[0] for f in figures]).mean(0)
    vf, vr = torch.stack([f[1] for f in figures]).sum(0), torch.stack([f[2] for f in figures]).sum(0)
    share = vf / (vf + vr)
    print(
        f"{name} ({source}, {len(ws.windows)} windows of {a.length}): mean over layers "
        f"KL {float(kl.mean()):.4f} nats/row, fast-pair variance share {100 * float(share.mean()):.1f}%",
        flush=True,
    )
    return {
        "source": source,
        "kl_per_layer": kl.tolist(),
        "share_per_layer": share.tolist(),
        "kl_mean": float(kl.mean()),
        "share_mean": float(share.mean()),
    }


def _print_layer_table(domains: dict[str, dict], layers: list[int]) -> None:
    names = list(domains)
    print("\n| layer | " + " | ".join(f"{n} KL | {n} share" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for layer in layers:
        cells = []
        for n in names:
            d = domains[n]
            cells += [f"{d['kl_per_layer'][layer]:.4f}", f"{100 * d['share_per_layer'][layer]:.1f}%"]
        print(f"| {layer} | " + " | ".join(cells) + " |")


def main() -> int:
    a = _parser().parse_args()

    from linearard_ray.config import ModelConfig
    from linearard_ray.models.loading import load_model, load_tokenizer

    domains = dict(d.split("=", 1) for d in (a.domain or ["SOTU=builtin:sotu/eval", "pydocs=builtin:pydocs"]))
    mcfg = ModelConfig(teacher=a.teacher, dtype="float32")
    tok = load_tokenizer(mcfg)
    model = load_model(a.teacher, mcfg, device="cpu")
    D, theta, inv_freq = _rotary_frequencies(model.config)
    fast = fast_pairs(inv_freq, a.factor)
    layers = list(range(model.config.num_hidden_layers))
    print(
        f"{a.teacher}: head_dim {D}, theta {theta:g}; PI×{a.factor:g} leaves the student's fastest pair at "
        f"{float(inv_freq.max()) / a.factor:.3f} rad/token; teacher pairs faster than that: {fast} "
        f"({', '.join(f'{float(inv_freq[i]):.3f}' for i in fast)} rad/token)",
        flush=True,
    )
    out = {"teacher": a.teacher, "factor": a.factor, "length": a.length, "windows": a.windows, "fast_pairs": fast}
    out["domains"] = {name: _domain_figures(model, tok, name, src, layers, fast, a) for name, src in domains.items()}
    _print_layer_table(out["domains"], layers)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
