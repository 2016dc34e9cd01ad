"""Chunked logit KL / cross-entropy against float64 references: values, gradients, memory shape."""

import pytest
import torch
import torch.nn.functional as F

from linearard_ray.ops.logit_kl import chunked_cross_entropy, chunked_logit_kl

B, T, H, V = 3, 37, 24, 101


def _inputs(seed, dtype=torch.float32, Ht=H):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ht = (
        hs[..., :Ht] * 0.7 + 0.5 * torch.randn(B, T, Ht, generator=g, dtype=torch.float64)
        if Ht == H
        else torch.randn(B, T, Ht, generator=g, dtype=torch.float64)
    )
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3
    wt = torch.randn(V, Ht, generator=g, dtype=torch.float64) / Ht**0.5 * 3
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, :4] = 0
    return [x.to(dtype) for x in (hs, ht, ws, wt)] + [mask]


def _ref_kl(hs, ht, ws, wt, mask, tau):
    s = (hs.double() @ ws.double().T) / tau
    t = (ht.double() @ wt.double().T) / tau
    per = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1) * tau * tau
    return per * mask.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 16, 1024])
def test_logit_kl_values_and_grads(dtype, tol, tau, chunk):
    hs, ht, ws, wt, mask = _inputs(int(tau * 10) + chunk, dtype)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    got = chunked_logit_kl(hs, ht, ws, wt, attention_mask=mask, temperature=tau, chunk_size=chunk)
    hs64 = hs.detach().double().requires_grad_(True)
    ws64 = ws.detach().double().requires_grad_(True)
    ref = _ref_kl(hs64, ht, ws64, wt, mask, tau).sum()
    assert ref.item() > 1.0
    torch.testing.assert_close(got.double(), ref.detach(), rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(1)
    w_out = torch.rand((), generator=g).item() + 0.5
    (got * w_out).backward()
    (ref * w_out).backward()
    torch.testing.assert_close(hs.grad.double(), hs64.grad, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(ws.grad.double(), ws64.grad, rtol=tol * 10, atol=tol * 10)
    assert hs.grad[1, 25:].abs().max() == 0  # padded positions get no gradient


def test_logit_kl_reductions_topk_and_2d():
    hs, ht, ws, wt, mask = _inputs(3, torch.float64)
    ref = _ref_kl(hs, ht, ws, wt, mask, 1.0)
    none = chunked_logit_kl(hs, ht, ws, wt, attention_mask=mask, chunk_size=7, reduction="none")
    torch.testing.assert_close(none, ref)
    mean = chunked_logit_kl(hs, ht, ws, wt, attention_mask=mask, chunk_size=7, reduction="mean")
    torch.testing.assert_close(mean, ref.sum() / mask.sum())
    # top-k per sequence: the k largest valid positions of each row
    k = 5
    hs.requires_grad_(True)
    top = chunked_logit_kl(hs, ht, ws, wt, attention_mask=mask, top_k_positions=k, chunk_size=7, reduction="mean")
    masked = ref.masked_fill(mask == 0, float("-inf"))
    want = masked.topk(k, -1).values
    torch.testing.assert_close(top, want.sum() / (B * k))
    top.backward()
    rows_with_grad = (hs.grad.abs().sum(-1) > 0).sum(-1)
    assert rows_with_grad.tolist() == [k] * B
    # flattened [N, H] input: top-k over all valid positions
    flat = chunked_logit_kl(
        hs.detach().reshape(-1, H),
        ht.reshape(-1, H),
        ws,
        wt,
        attention_mask=mask.reshape(-1),
        top_k_positions=k,
        reduction="sum",
    )
    torch.testing.assert_close(flat, masked.reshape(-1).topk(k).values.sum())


def test_logit_kl_zero_for_same_model_and_teacher_gets_no_grad():
    hs, _, ws, _, mask = _inputs(4, torch.float64)
    ht = hs.clone().requires_grad_(True)
    out = chunked_logit_kl(hs, ht, ws, ws, attention_mask=mask)
    assert abs(out.item()) < 1e-10
    assert not out.requires_grad  # only teacher tensors required grad; the teacher side is a constant


def test_logit_kl_teacher_of_other_width():
    hs, ht, ws, wt, mask = _inputs(5, torch.float64, Ht=40)
    got = chunked_logit_kl(hs, ht, ws, wt, attention_mask=mask, temperature=2.0, chunk_size=10)
    torch.testing.assert_close(got, _ref_kl(hs, ht, ws, wt, mask, 2.0).sum())


def test_logit_kl_never_saves_vocab_sized_tensors():
    # Memory must be linear in T: nothing [N, V]-sized may be kept for backward.
    Tn, Vb = 512, 4096
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(1, Tn, 8, generator=g, requires_grad=True)
    ht = torch.randn(1, Tn, 8, generator=g)
    w = torch.randn(Vb, 8, generator=g)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_logit_kl(hs, ht, w, w.clone(), chunk_size=64)
        ce = chunked_cross_entropy(hs, w, torch.randint(0, Vb, (1, Tn), generator=g), None, 64)
    (out + ce).backward()
    assert saved and max(saved) < Tn * Vb / 16


def test_enclosing_autocast_does_not_change_results():
    hs, ht, ws, wt, mask = _inputs(9)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    grads = []
    for amp in (False, True):
        h = hs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            kl = chunked_logit_kl(h, ht, ws, wt, attention_mask=mask, chunk_size=8)
            ce = chunked_cross_entropy(h, ws, y, mask, 8)
        assert kl.dtype == ce.dtype == torch.float32
        (kl + ce).backward()
        grads.append((kl.detach(), ce.detach(), h.grad))
    for a, b in zip(*grads, strict=False):
        assert torch.equal(a, b)


def _ref_ce(h, w, y, valid):
    logits = h.double() @ w.double().T
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.clamp_min(0).reshape(-1), reduction="none")
    return nll.view(y.shape) * valid.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk", [5, 1000])
def test_cross_entropy_values_and_grads(dtype, tol, chunk):
    hs, _, ws, _, mask = _inputs(7 + chunk, dtype)
    g = torch.Generator().manual_seed(chunk)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3] = -100  # ignored target
    valid = mask.bool() & (y >= 0)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    got = chunked_cross_entropy(hs, ws, y, mask, chunk)
    hs64 = hs.detach().double().requires_grad_(True)
    ws64 = ws.detach().double().requires_grad_(True)
    ref = _ref_ce(hs64, ws64, y, valid).sum()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=tol, atol=tol)
    got.backward()
    ref.backward()
    torch.testing.assert_close(hs.grad.double(), hs64.grad, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(ws.grad.double(), ws64.grad, rtol=tol * 10, atol=tol * 10)
    mean = chunked_cross_entropy(hs.detach(), ws.detach(), y, mask, chunk, reduction="mean")
    torch.testing.assert_close(mean.double(), ref.detach() / valid.sum(), rtol=tol, atol=tol)
    none = chunked_cross_entropy(hs.detach(), ws.detach(), y, mask, chunk, reduction="none")
    torch.testing.assert_close(none.double(), _ref_ce(hs64.detach(), ws64.detach(), y, valid), rtol=tol, atol=tol)


def test_errors():
    hs, ht, ws, wt, mask = _inputs(8)
    with pytest.raises(ValueError, match="temperature"):
        chunked_logit_kl(hs, ht, ws, wt, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_logit_kl(hs, ht, ws, wt, reduction="avg")
    with pytest.raises(ValueError, match="different positions"):
        chunked_logit_kl(hs, ht[:, :5], ws, wt)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_logit_kl(hs, ht, ws, wt[:50])
    with pytest.raises(ValueError, match="attention_mask shape"):
        chunked_logit_kl(hs, ht, ws, wt, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="top_k_positions"):
        chunked_logit_kl(hs, ht, ws, wt, top_k_positions=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hs, ws, torch.zeros(B, T, dtype=torch.long), mask, 0)
    with pytest.raises(ValueError, match="vocabulary size"):
        chunked_cross_entropy(hs, ws, torch.full((B, T), V), mask)
    with pytest.raises(ValueError, match="targets shape"):
        chunked_cross_entropy(hs, ws, torch.zeros(B, T - 1, dtype=torch.long), mask)
