"""RoPE settings of the student: every rope type transformers offers, on a copy of the HF config.

transformers >= 5 keeps RoPE settings in ``config.rope_parameters`` (a dict that also holds
``rope_theta``); older releases used ``config.rope_scaling`` plus a top-level ``rope_theta``.
``apply_rope_scaling`` writes whichever the config uses, so the scaled student config loads and
saves like any other checkpoint config.

Windows: ``original_max_position_embeddings`` (the native window) defaults to the config's current
``max_position_embeddings`` (or the native window already recorded in a scaled config);
``max_position_embeddings`` becomes ``rope.max_position_embeddings`` or native × factor. The one
exception is ``dynamic``: transformers reads ``max_position_embeddings`` as the native length inside
the dynamic-NTK formula, so raising it would change the model (it would equal the teacher up to the
new window instead of up to the native one); there it stays native.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from linearard_ray.config import RopeConfig

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")

# Parameters each type accepts from RopeConfig (besides factor); anything else set is an error
# rather than silently ignored.
_TYPE_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "dynamic": (),
    "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "longrope": ("long_factor", "short_factor", "attention_factor"),
}
_ALL_PARAMS = sorted({p for ps in _TYPE_PARAMS.values() for p in ps})

# Llama-3.1's published values; transformers requires them explicitly.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


class RopeError(ValueError):
    """An unusable RoPE setting; the message names the field."""


def _uses_rope_parameters(hf_config) -> bool:
    return hasattr(hf_config, "rope_parameters")


def _current_rope(hf_config) -> dict[str, Any]:
    """The config's RoPE dict (rope_parameters or rope_scaling), never None."""
    if _uses_rope_parameters(hf_config):
        rp = getattr(hf_config, "rope_parameters", None) or {}
    else:
        rp = getattr(hf_config, "rope_scaling", None) or {}
    if any(isinstance(v, dict) for v in rp.values()):
        raise RopeError("per-layer-type RoPE parameters (nested rope_parameters) are not supported")
    return dict(rp)


def rope_theta(hf_config) -> float:
    rp = _current_rope(hf_config)
    theta = rp.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        theta = getattr(hf_config, "default_theta", 10000.0)
    return float(theta)


def rotary_dim(hf_config) -> int:
    """Number of rotated dimensions of one head (head_dim × partial_rotary_factor)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    prf = _current_rope(hf_config).get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    return int(head_dim * (prf if prf is not None else 1.0))


def native_window(hf_config) -> int:
    """The window the config was trained for: the recorded original window of an already-scaled
    config, else max_position_embeddings."""
    rp = _current_rope(hf_config)
    if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
        orig = rp.get("original_max_position_embeddings", getattr(hf_config, "original_max_position_embeddings", None))
        if orig:
            return int(orig)
    return int(hf_config.max_position_embeddings)


def _check_factor_list(name: str, value: list[float] | None, n: int) -> list[float]:
    if value is None:
        raise RopeError(
            f"rope.{name} is required for rope.type 'longrope' (a list of {n} numbers, one per rotary frequency)"
        )
    if len(value) != n:
        raise RopeError(f"rope.{name} must have {n} entries (rotary dim / 2) for this model, got {len(value)}")
    if any((not isinstance(x, (int, float))) or not x > 0 for x in value):
        raise RopeError(f"rope.{name} entries must be positive numbers")
    return [float(x) for x in value]


def _check_type_and_factor(rope_cfg: RopeConfig) -> float:
    """rope.factor, after checking rope.type is known and that only its own parameters are set."""
    rtype = rope_cfg.type
    if rtype not in ROPE_TYPES:
        raise RopeError(f"rope.type {rtype!r} is unknown; choose one of {ROPE_TYPES}")
    factor = float(rope_cfg.factor)
    if not factor > 1.0:
        raise RopeError(f"rope.factor must be > 1 to extend the context window, got {factor}")
    allowed = set(_TYPE_PARAMS[rtype])
    stray = [p for p in _ALL_PARAMS if p not in allowed and getattr(rope_cfg, p) is not None]
    if stray:
        raise RopeError(
            f"rope.{stray[0]} does not apply to rope.type {rtype!r} (it takes: {sorted(allowed) or 'only factor'})"
        )
    return factor


def _windows(hf_config, rope_cfg: RopeConfig, factor: float) -> tuple[int, int]:
    """(native window, new max_position_embeddings)."""
    native = int(rope_cfg.original_max_position_embeddings or native_window(hf_config))
    if native < 1:
        raise RopeError(f"rope.original_max_position_embeddings must be positive, got {native}")
    if rope_cfg.type == "dynamic":
        if rope_cfg.max_position_embeddings is not None and rope_cfg.max_position_embeddings != native:
            raise RopeError(
                "rope.max_position_embeddings cannot be changed for rope.type 'dynamic': transformers reads "
                "max_position_embeddings as the native window in the dynamic NTK formula"
            )
        return native, native
    new_window = int(rope_cfg.max_position_embeddings or round(native * factor))
    if new_window <= native:
        raise RopeError(f"rope.max_position_embeddings ({new_window}) must exceed the native window ({native})")
    return native, new_window


def _type_parameters(hf_config, rope_cfg: RopeConfig) -> dict[str, Any]:
    """The checked parameters that only rope.type's own formula reads (yarn, llama3, longrope)."""
    rp: dict[str, Any] = {}
    if rope_cfg.type == "yarn":
        for p in _TYPE_PARAMS["yarn"]:
            v = getattr(rope_cfg, p)
            if v is not None:
                rp[p] = float(v)
        if (rp.get("mscale") is None) != (rp.get("mscale_all_dim") is None):
            raise RopeError("rope.mscale and rope.mscale_all_dim are used together for yarn; set both or neither")
        if rp.get("beta_fast", 32.0) <= rp.get("beta_slow", 1.0):
            raise RopeError("rope.beta_fast must be greater than rope.beta_slow")
    elif rope_cfg.type == "llama3":
        for p, d in _LLAMA3_DEFAULTS.items():
            v = getattr(rope_cfg, p)
            rp[p] = float(d if v is None else v)
        if not rp["high_freq_factor"] > rp["low_freq_factor"]:
            raise RopeError("rope.high_freq_factor must be greater than rope.low_freq_factor")
    elif rope_cfg.type == "longrope":
        n = rotary_dim(hf_config) // 2
        rp["long_factor"] = _check_factor_list("long_factor", rope_cfg.long_factor, n)
        rp["short_factor"] = _check_factor_list("short_factor", rope_cfg.short_factor, n)
        if rope_cfg.attention_factor is not None:
            rp["attention_factor"] = float(rope_cfg.attention_factor)
    return rp


def build_rope_parameters(hf_config, rope_cfg: RopeConfig) -> tuple[dict[str, Any], int, int]:
    """(rope dict, native window, new max_position_embeddings) for `rope_cfg` on `hf_config`."""
    if isinstance(rope_cfg, dict):
        rope_cfg = RopeConfig.model_validate(rope_cfg)
    factor = _check_type_and_factor(rope_cfg)
    native, new_window = _windows(hf_config, rope_cfg, factor)
    rtype = rope_cfg.type
    rp: dict[str, Any] = {"rope_type": rtype, "rope_theta": rope_theta(hf_config), "factor": factor}
    prf = _current_rope(hf_config).get("partial_rotary_factor")
    if prf is not None:
        rp["partial_rotary_factor"] = prf
    if rtype in ("yarn", "llama3", "longrope"):
        rp["original_max_position_embeddings"] = native
    rp.update(_type_parameters(hf_config, rope_cfg))
    if rp.get("attention_factor") is not None and not rp["attention_factor"] > 0:
        raise RopeError("rope.attention_factor must be > 0")
    return rp, native, new_window


def apply_rope_scaling(hf_config, rope_cfg: RopeConfig):
    """A copy of `hf_config` with the student's RoPE scaling; the input is left untouched.

    The new settings go to ``rope_parameters`` (transformers 5, ``rope_theta`` kept inside) or to
    ``rope_scaling`` (older releases, ``rope_theta`` stays top-level). ``max_position_embeddings``
    becomes the new window (see the module docstring for ``dynamic``), and the native window is
    recorded as ``original_max_position_embeddings``.
    """
    rp, native, new_window = build_rope_parameters(hf_config, rope_cfg)
    cfg = copy.deepcopy(hf_config)
    if _uses_rope_parameters(cfg):
        cfg.rope_parameters = rp
    else:
        old = dict(rp)
        theta = old.pop("rope_theta")
        old["type"] = old["rope_type"]  # releases before 4.45 read "type"
        cfg.rope_scaling = old
        cfg.rope_theta = theta
    cfg.max_position_embeddings = new_window
    # transformers gives a top-level original_max_position_embeddings priority over the one in
    # rope_parameters (a Phi-3 convention), so both must agree.
    cfg.original_max_position_embeddings = native
    if hasattr(cfg, "validate_rope"):
        cfg.validate_rope()
    return cfg


def rope_init(hf_config, device=None, seq_len: int | None = None):
    """(inv_freq, attention factor) exactly as the model's rotary embedding computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = copy.deepcopy(hf_config)  # the init functions standardise (mutate) the config
    rp = _current_rope(cfg)
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype in (None, "default"):
        import torch

        dim = rotary_dim(cfg)
        inv = 1.0 / (rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv, 1.0
    if rtype not in ROPE_INIT_FUNCTIONS:
        raise RopeError(f"rope type {rtype!r} is not known to this transformers release")
    kw = {"seq_len": seq_len} if seq_len is not None else {}
    inv, attn = ROPE_INIT_FUNCTIONS[rtype](cfg, device, **kw)
    return inv, float(attn)


def rope_attention_factor(hf_config) -> float:
    """The multiplier m applied to cos/sin by the config's rotary embedding (1 for most types).

    Taken from transformers' own rope init function so it always matches what the model does
    (yarn: 0.1·ln(factor)+1 or the mscale ratio or an explicit attention_factor; longrope:
    sqrt(1 + ln(factor)/ln(native)) unless given). q and k both carry m after RoPE, so their dot
    products carry m².
    """
    _, m = rope_init(hf_config)
    if not (m > 0 and math.isfinite(m)):
        raise RopeError(f"rope attention factor must be a positive number, got {m}")
    return float(m)


def rope_summary(hf_config) -> dict[str, Any]:
    """The RoPE fields worth logging / storing next to an adapter."""
    return {
        "rope": _current_rope(hf_config),
        "max_position_embeddings": int(hf_config.max_position_embeddings),
        "original_max_position_embeddings": native_window(hf_config),
    }
