"""Student RoPE settings: inv_freq and attention factor of every type against direct formulas,
config fields and round trip, errors."""

import math
import types

import pytest
import torch

from linearard_ray.config import RopeConfig
from linearard_ray.models.rope import RopeError, apply_rope_scaling, rope_attention_factor, rope_init
from linearard_ray.models.tiny import tiny_config

THETA = 50000.0
NATIVE = 256


def _cfg(family="llama", **kw):
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": THETA})
    return tiny_config(family, **kw)


def _default_inv(dim, theta=THETA):
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _rotary(cfg):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(cfg)


def _yarn_ref(dim, theta, factor, native, beta_fast=32.0, beta_slow=1.0):
    # Written from the YaRN paper (Peng et al. 2023, eq. 16-18), independent of transformers.
    def corr_dim(rot):
        return dim * math.log(native / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    i = torch.arange(dim // 2, dtype=torch.float64)
    ramp = ((i - low) / (high - low)).clamp(0, 1)  # 0 = keep (extrapolate), 1 = interpolate
    base = _default_inv(dim, theta)
    return base * (1 - ramp) + (base / factor) * ramp


def _llama3_ref(dim, theta, factor, native, low_ff, high_ff):
    out = []
    for f in _default_inv(dim, theta).tolist():
        wavelen = 2 * math.pi / f
        if wavelen < native / high_ff:
            out.append(f)
        elif wavelen > native / low_ff:
            out.append(f / factor)
        else:
            smooth = (native / wavelen - low_ff) / (high_ff - low_ff)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def _check_inv(cfg, expected, rtol=1e-5):
    inv, _ = rope_init(cfg)
    torch.testing.assert_close(inv.double(), expected, rtol=rtol, atol=0)
    torch.testing.assert_close(_rotary(cfg).inv_freq.double(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_linear_divides_inv_freq(factor):
    cfg = apply_rope_scaling(_cfg(), RopeConfig(type="linear", factor=factor))
    _check_inv(cfg, _default_inv(16) / factor)
    assert rope_attention_factor(cfg) == 1.0
    assert cfg.max_position_embeddings == int(NATIVE * factor)
    assert cfg.original_max_position_embeddings == NATIVE
    assert cfg.rope_parameters == {"rope_type": "linear", "rope_theta": THETA, "factor": factor}


def test_dynamic_is_native_below_window_and_ntk_above():
    cfg = apply_rope_scaling(_cfg(), RopeConfig(type="dynamic", factor=4.0))
    assert cfg.max_position_embeddings == NATIVE  # transformers reads it as the native window
    _check_inv(cfg, _default_inv(16))
    L, d, f = 3 * NATIVE, 16, 4.0
    theta = THETA * ((f * L / NATIVE) - (f - 1)) ** (d / (d - 2))
    inv, m = rope_init(cfg, seq_len=L)
    torch.testing.assert_close(inv.double(), _default_inv(d, theta), rtol=1e-5, atol=0)
    assert m == 1.0
    # and the module itself switches when it sees positions beyond the native window
    rot = _rotary(cfg)
    rot(torch.zeros(1, dtype=torch.float32), torch.arange(L)[None])
    torch.testing.assert_close(rot.inv_freq.double(), _default_inv(d, theta), rtol=1e-5, atol=0)


@pytest.mark.parametrize("factor,extra", [(4.0, {}), (8.0, {"beta_fast": 16.0, "beta_slow": 2.0})])
def test_yarn_inv_freq_and_attention_factor(factor, extra):
    cfg = apply_rope_scaling(_cfg(), RopeConfig(type="yarn", factor=factor, **extra))
    _check_inv(cfg, _yarn_ref(16, THETA, factor, NATIVE, extra.get("beta_fast", 32.0), extra.get("beta_slow", 1.0)))
    m = 0.1 * math.log(factor) + 1.0
    assert rope_attention_factor(cfg) == pytest.approx(m, rel=1e-12)
    assert cfg.rope_parameters["original_max_position_embeddings"] == NATIVE
    # the rotary module multiplies cos and sin by exactly that factor
    rot = _rotary(cfg)
    pos = torch.arange(40)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    ang = pos[0, :, None].double() * _rotary(cfg).inv_freq.double()[None]
    torch.testing.assert_close(cos[0, :, :8].double(), m * ang.cos(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin[0, :, :8].double(), m * ang.sin(), rtol=1e-5, atol=1e-6)


def test_yarn_mscale_and_explicit_attention_factor():
    cfg = apply_rope_scaling(_cfg(), RopeConfig(type="yarn", factor=4.0, mscale=0.8, mscale_all_dim=0.5))
    g = lambda s: 0.1 * s * math.log(4.0) + 1.0  # noqa: E731
    assert rope_attention_factor(cfg) == pytest.approx(g(0.8) / g(0.5), rel=1e-12)
    cfg = apply_rope_scaling(_cfg(), RopeConfig(type="yarn", factor=4.0, attention_factor=1.7))
    assert rope_attention_factor(cfg) == pytest.approx(1.7)
    assert _rotary(cfg).attention_scaling == pytest.approx(1.7)


def test_llama3_inv_freq():
    # native 64 with head_dim 64 so that all three bands (keep / smooth / divide) occur
    base = _cfg(max_position_embeddings=64, hidden_size=256, num_attention_heads=4, head_dim=64)
    cfg = apply_rope_scaling(base, RopeConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0))
    ref = _llama3_ref(64, THETA, 8.0, 64, 1.0, 4.0)
    ratio = ref / _default_inv(64)
    assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio > 1 / 8) & (ratio < 1)).any()
    _check_inv(cfg, ref)
    assert rope_attention_factor(cfg) == 1.0
    # defaults are Llama-3.1's
    d = apply_rope_scaling(base, RopeConfig(type="llama3", factor=8.0))
    assert d.rope_parameters["low_freq_factor"] == 1.0 and d.rope_parameters["high_freq_factor"] == 4.0


def test_longrope_short_and_long_factors():
    g = torch.Generator().manual_seed(0)
    short = (1 + torch.rand(8, generator=g)).tolist()
    long = (2 + 4 * torch.rand(8, generator=g)).tolist()
    cfg = apply_rope_scaling(_cfg(), RopeConfig(type="longrope", factor=4.0, short_factor=short, long_factor=long))
    base = _default_inv(16)
    _check_inv(cfg, base / torch.tensor(short, dtype=torch.float64))
    inv_long, _ = rope_init(cfg, seq_len=NATIVE + 1)
    torch.testing.assert_close(inv_long.double(), base / torch.tensor(long, dtype=torch.float64), rtol=1e-5, atol=0)
    m = math.sqrt(1 + math.log(4.0) / math.log(NATIVE))
    assert rope_attention_factor(cfg) == pytest.approx(m, rel=1e-12)
    assert _rotary(cfg).attention_scaling == pytest.approx(m, rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_round_trip_keeps_theta_and_windows(family, tmp_path):
    from transformers import AutoConfig

    base = _cfg(family)
    before = dict(base.rope_parameters)
    cfg = apply_rope_scaling(base, RopeConfig(type="yarn", factor=4.0, max_position_embeddings=2000))
    assert base.rope_parameters == before and base.max_position_embeddings == NATIVE  # input untouched
    cfg.save_pretrained(tmp_path)
    r = AutoConfig.from_pretrained(tmp_path)
    assert r.rope_parameters["rope_type"] == "yarn"
    assert r.rope_parameters["rope_theta"] == THETA
    assert r.rope_parameters["factor"] == 4.0
    assert r.max_position_embeddings == 2000
    assert r.rope_parameters["original_max_position_embeddings"] == NATIVE
    assert rope_attention_factor(r) == pytest.approx(rope_attention_factor(cfg))


def test_scaling_an_already_scaled_config_starts_from_its_native_window():
    once = apply_rope_scaling(_cfg(), RopeConfig(type="yarn", factor=2.0))
    twice = apply_rope_scaling(once, RopeConfig(type="linear", factor=4.0))
    assert twice.max_position_embeddings == 4 * NATIVE
    assert twice.original_max_position_embeddings == NATIVE


def test_old_style_rope_scaling_config():
    # transformers < 5: rope_scaling dict and a top-level rope_theta
    old = types.SimpleNamespace(
        rope_scaling=None,
        rope_theta=THETA,
        max_position_embeddings=NATIVE,
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
    )
    new = apply_rope_scaling(old, RopeConfig(type="yarn", factor=4.0, beta_fast=24.0))
    assert old.rope_scaling is None
    assert new.rope_scaling == {
        "rope_type": "yarn",
        "type": "yarn",
        "factor": 4.0,
        "beta_fast": 24.0,
        "original_max_position_embeddings": NATIVE,
    }
    assert new.rope_theta == THETA and new.max_position_embeddings == 4 * NATIVE


def test_errors_name_the_problem():
    c = _cfg()
    with pytest.raises(RopeError, match="unknown"):
        apply_rope_scaling(c, RopeConfig.model_construct(type="ntk-by-parts", factor=4.0))
    with pytest.raises(ValueError, match="factor"):
        RopeConfig(type="linear", factor=1.0)
    for f in (1.0, 0.5):
        with pytest.raises(RopeError, match="factor must be > 1"):
            apply_rope_scaling(c, RopeConfig.model_construct(**{**RopeConfig().model_dump(), "factor": f}))
    with pytest.raises(RopeError, match="long_factor is required"):
        apply_rope_scaling(c, RopeConfig(type="longrope", factor=4.0, short_factor=[1.0] * 8))
    with pytest.raises(RopeError, match="short_factor must have 8 entries"):
        apply_rope_scaling(c, RopeConfig(type="longrope", factor=4.0, short_factor=[1.0] * 4, long_factor=[2.0] * 8))
    with pytest.raises(RopeError, match="beta_fast does not apply"):
        apply_rope_scaling(c, RopeConfig(type="linear", factor=4.0, beta_fast=32.0))
    with pytest.raises(RopeError, match="mscale_all_dim"):
        apply_rope_scaling(c, RopeConfig(type="yarn", factor=4.0, mscale=1.0))
    with pytest.raises(RopeError, match="dynamic"):
        apply_rope_scaling(c, RopeConfig(type="dynamic", factor=4.0, max_position_embeddings=4096))
    with pytest.raises(RopeError, match="must exceed the native window"):
        apply_rope_scaling(c, RopeConfig(type="linear", factor=4.0, max_position_embeddings=NATIVE))
    with pytest.raises(RopeError, match="high_freq_factor"):
        apply_rope_scaling(c, RopeConfig(type="llama3", factor=4.0, low_freq_factor=4.0, high_freq_factor=2.0))
