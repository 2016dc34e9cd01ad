"""research/rope_ceiling.py: the fast-pair split of attention logits against a direct computation."""

from __future__ import annotations

import torch

from tests.scripts import load_script


def _mod():
    return load_script("research/rope_ceiling.py")


def test_fast_pairs_are_those_the_scaled_model_cannot_turn():
    m = _mod()
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert m.fast_pairs(inv_freq, 4.0) == [0, 1, 2, 3]  # 1, 0.70, 0.49, 0.34 > 0.25 > 0.24
    assert m.fast_pairs(inv_freq, 1.0) == []


def test_row_figures_against_a_direct_computation():
    m = _mod()
    g = torch.Generator().manual_seed(3)
    H, T, D, scale, fast = 2, 9, 8, 0.35, [0, 2]
    q, k = (
        torch.randn(H, T, D, generator=g, dtype=torch.float64),
        torch.randn(H, T, D, generator=g, dtype=torch.float64),
    )
    kl, var_f, var_r = m.row_figures(q, k, scale, fast)
    dims = [0, 2, 4, 6]  # pairs 0 and 2 in rotate_half layout: dims p and p + D/2
    rest = [d for d in range(D) if d not in dims]
    for h in range(H):
        for t in range(T):
            s = (k[h, : t + 1] @ q[h, t]) * scale
            f = (k[h, : t + 1, dims] @ q[h, t, dims]) * scale
            r = (k[h, : t + 1, rest] @ q[h, t, rest]) * scale
            assert torch.allclose(s, f + r)
            p, p_drop = torch.softmax(s, 0), torch.softmax(s - f, 0)
            assert torch.isclose(kl[h, t], (p * (p.log() - p_drop.log())).sum(), atol=1e-10)
            assert torch.isclose(var_f[h, t], (p * (f - (p * f).sum()) ** 2).sum(), atol=1e-10)
            assert torch.isclose(var_r[h, t], (p * (r - (p * r).sum()) ** 2).sum(), atol=1e-10)
    assert (kl[:, 1:] > 0).all() and torch.all(kl[:, 0].abs() < 1e-12)  # one key: nothing to move
    none = m.row_figures(q, k, scale, [])
    assert torch.all(none[0].abs() < 1e-12) and torch.all(none[1] == 0)
