"""Evaluation metrics against direct computations on tiny models: windowed NLL / perplexity versus
full-logit log-softmax, and relation KL versus dense float64 relation maps built from q/k/v that
the test recomputes itself (projections + its own RoPE)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from linearard_ray.config import ModelConfig, RopeConfig
from linearard_ray.evaluation.metrics import nll_windows, relation_kl_windows


def _load(path, rope=None):
    from linearard_ray.models.loading import load_model

    return load_model(str(path), ModelConfig(teacher=str(path), dtype="float32"), rope_cfg=rope, device="cpu")


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


def _windows(seed, n, T, vocab=512):
    return np.random.default_rng(seed).integers(3, vocab, size=(n, T)).astype(np.int64)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_nll_matches_full_logits(llama, batch_size):
    model = _load(llama)
    w = _windows(batch_size, 5, 47)
    got = nll_windows(model, w, batch_size, "cpu")
    with torch.no_grad():
        logits = model(torch.as_tensor(w)).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1)
    want = -lp.gather(-1, torch.as_tensor(w)[:, 1:, None]).sum().item()
    assert got["tokens"] == 5 * 46
    assert got["nll_sum"] == pytest.approx(want, rel=1e-5)
    ppl = math.exp(got["nll_sum"] / got["tokens"])
    assert ppl == pytest.approx(math.exp(want / (5 * 46)), rel=1e-5)
    per_window = -lp.gather(-1, torch.as_tensor(w)[:, 1:, None])[..., 0].mean(dim=1)
    assert got["window_nll"] == pytest.approx(per_window.tolist(), rel=1e-5)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _own_cos_sin(config, T, factor):
    """Llama RoPE (linear scaling = positions divided by factor), float64, computed here."""
    D = config.head_dim
    theta = config.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64) / factor, inv)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def _reference_qkv(model, ids, own_rope_factor=None):
    """Per layer (q, k, v) in float64 [B, H, T, D], from the attention's input and projections."""
    cfg = model.config
    out = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):

        def pre(mod, args, kwargs, index=index):
            h = kwargs["hidden_states"].double()
            B, T, _ = h.shape
            D = mod.head_dim
            q = (h @ mod.q_proj.weight.double().T).view(B, T, -1, D).transpose(1, 2)
            k = (h @ mod.k_proj.weight.double().T).view(B, T, -1, D).transpose(1, 2)
            v = (h @ mod.v_proj.weight.double().T).view(B, T, -1, D).transpose(1, 2)
            if own_rope_factor is not None:
                cos, sin = _own_cos_sin(cfg, T, own_rope_factor)
            else:  # the model's own table (carries yarn's attention factor)
                cos, sin = (t.double()[0] for t in kwargs["position_embeddings"])
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out[index] = (q, k, v)

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(torch.as_tensor(ids))
    finally:
        for h in hooks:
            h.remove()
    return out


def _dense_kl(s, t, a_s, a_t):
    """Sum over rows of KL(softmax(t) ‖ softmax(s)) of the causal self-relations, and the rows."""
    return _dense_cross_kl(s, s, t, t, a_s, a_t)


def _dense_cross_kl(sq, sk, tq, tk, a_s, a_t):
    """Sum over rows of KL(softmax(t) ‖ softmax(s)) of the causal maps sq·skᵀ, tq·tkᵀ, float64, and the rows."""
    T = sq.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ls = torch.log_softmax((sq @ sk.transpose(-1, -2) * a_s).masked_fill(~causal, -math.inf), -1)
    lt = torch.log_softmax((tq @ tk.transpose(-1, -2) * a_t).masked_fill(~causal, -math.inf), -1)
    kl = (lt.exp() * (lt - ls)).masked_fill(~causal, 0).sum(-1)
    return kl.sum().item(), kl.numel()


@pytest.mark.parametrize("rope", [{"type": "linear", "factor": 2.0}, {"type": "yarn", "factor": 4.0}])
def test_relation_kl_matches_dense_reference(llama, rope):
    teacher = _load(llama)
    student = _load(llama, RopeConfig(**rope))
    w = _windows(7, 3, 40)
    got = relation_kl_windows(teacher, student, w, batch_size=2, device="cpu", yarn_logit_correction="divide")
    linear = rope["type"] == "linear"
    ref_t = _reference_qkv(teacher, w, own_rope_factor=1.0)
    ref_s = _reference_qkv(student, w, own_rope_factor=rope["factor"] if linear else None)
    D = teacher.config.head_dim
    m = 1.0 if linear else 0.1 * math.log(rope["factor"]) + 1.0  # yarn's default attention factor
    a_t = D**-0.5
    for layer in range(teacher.config.num_hidden_layers):
        for i, r in enumerate("qkv"):
            a_s = D**-0.5 / (m * m if r != "v" else 1.0)
            want, rows = _dense_kl(ref_s[layer][i], ref_t[layer][i], a_s, a_t)
            assert got["rows"][r] == rows
            assert got["sums"][str(layer)][r] == pytest.approx(want, rel=2e-4, abs=1e-6)
        # the attention map: causal softmax of Q·Kᵀ (key heads shared by their query heads), no m²
        # correction, rows = the query heads' rows
        qs, ks, _ = ref_s[layer]
        qt, kt, _ = ref_t[layer]
        rep = qs.shape[1] // ks.shape[1]
        want, rows = _dense_cross_kl(qs, ks.repeat_interleave(rep, 1), qt, kt.repeat_interleave(rep, 1), a_t, a_t)
        assert got["rows"]["qk"] == rows == got["rows"]["q"]
        assert got["sums"][str(layer)]["qk"] == pytest.approx(want, rel=2e-4, abs=1e-6)
    assert got["sums"]["1"]["qk"] > 1e-3
    # layer 0 sees identical inputs, so V/V (no RoPE) agrees exactly; Q/Q and K/K do not
    assert got["sums"]["0"]["v"] == pytest.approx(0.0, abs=1e-6)
    assert got["sums"]["0"]["q"] > 1e-3 and got["sums"]["1"]["v"] > 1e-3


def test_relation_kl_zero_for_identical_models(llama):
    teacher = _load(llama)
    w = _windows(9, 2, 24)
    got = relation_kl_windows(teacher, teacher, w, batch_size=2, device="cpu")
    for per in got["sums"].values():
        for v in per.values():
            assert abs(v) < 1e-5


def test_sequence_nll_chunks_and_padding(llama):
    from linearard_ray.evaluation.metrics import sequence_nll, sequence_nll_rows

    model = _load(llama)
    ids = torch.as_tensor(_windows(21, 3, 37))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding: targets that are padding are not counted
    mask[2, 12:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    valid = mask[:, 1:].bool()
    want = -lp[valid].sum().item()
    for chunk in (5, 16, 1024):
        total, count = sequence_nll(model, ids, mask, chunk_size=chunk)
        assert count == int(valid.sum())
        assert total == pytest.approx(want, rel=1e-5)
        # per row, for comparing two models window by window
        sums, counts = sequence_nll_rows(model, ids, mask, chunk_size=chunk)
        assert counts == valid.sum(dim=1).tolist()
        for r in range(ids.shape[0]):
            assert sums[r] == pytest.approx(-lp[r][valid[r]].sum().item(), rel=1e-5)
