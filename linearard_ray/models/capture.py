"""Record post-RoPE q, k and v of chosen layers through transformers' attention interface.

Every supported decoder attention (Llama, Mistral, Qwen2, Qwen3, ...) computes q/k/v, applies
RoPE and then calls ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)(self,
q, k, v, mask, ...)``. While a capture is active that lookup is wrapped: the function it returns
is the very one the model would have used (sdpa, eager, flash, ...), preceded by a recorder that
stores the tensors for attention modules marked for capture. The attention result, mask creation
and every other code path are untouched, so the model's outputs are bit-identical.

Shapes: ``q[l]`` is ``[B, H_q, T, D]``, ``k[l]``/``v[l]`` are ``[B, H_kv, T, D]`` (GQA heads not
repeated). Under ``torch.no_grad`` (the teacher) the tensors hold no graph; otherwise (the
student) they keep it, so a loss on them trains the q/k/v projections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from linearard_ray.models.unwrap import unwrap_model

_ATTR = "_linearard_capture"
_lock = threading.Lock()
_active = 0
_orig_get_interface = None


def attention_modules(model) -> list[torch.nn.Module]:
    """The decoder's self-attention modules in layer order (works through peft/DDP wrappers)."""
    base = unwrap_model(model)
    found: dict[int, torch.nn.Module] = {}
    for _, mod in base.named_modules():
        if hasattr(mod, "q_proj") and hasattr(mod, "k_proj") and hasattr(mod, "v_proj") and hasattr(mod, "layer_idx"):
            idx = int(mod.layer_idx)
            if idx in found:
                raise RuntimeError(f"two attention modules claim layer_idx {idx}; cannot map layers for capture")
            found[idx] = mod
    if not found:
        raise ValueError(
            f"{type(base).__name__}: no attention modules with q_proj/k_proj/v_proj and layer_idx found; "
            "capture supports decoder-only HF models of the Llama family layout"
        )
    if sorted(found) != list(range(len(found))):
        raise RuntimeError(f"attention layer indices are not contiguous: {sorted(found)}")
    return [found[i] for i in range(len(found))]


class Capture:
    """What one ``capture_qkv`` context recorded: ``q``, ``k``, ``v`` dicts keyed by layer index,
    plus ``scaling[l]``, the softmax scale the model's attention uses."""

    def __init__(
        self, layers: list[int], what: tuple[str, ...], on_record: Callable[[Capture, int], None] | None = None
    ):
        self.layers = layers
        self.what = what
        self.on_record = on_record
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}

    def _record(self, layer: int, q, k, v, scaling):
        # Only the first call per layer counts: a gradient-checkpointing recompute that runs while
        # the context is still open must not replace the tensors the loss was built from.
        if layer in self.scaling:
            return
        grad = torch.is_grad_enabled()
        for name, t in (("q", q), ("k", k), ("v", v)):
            if name in self.what:
                getattr(self, name)[layer] = t if grad else t.detach()
        self.scaling[layer] = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
        if self.on_record is not None:
            self.on_record(self, layer)

    def check_complete(self) -> None:
        missing = [layer for layer in self.layers if layer not in self.scaling]
        if missing:
            raise RuntimeError(
                f"capture recorded nothing for layers {missing}: the model's attention did not go through "
                "transformers' ALL_ATTENTION_FUNCTIONS interface (or no forward pass ran inside the context)"
            )

    def clear(self) -> None:
        self.q.clear(), self.k.clear(), self.v.clear(), self.scaling.clear()


def _recording(fn):
    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        rec = getattr(module, _ATTR, None)
        if rec is not None:
            cap, layer = rec
            cap._record(layer, query, key, value, kwargs.get("scaling"))
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


def _install() -> None:
    global _active, _orig_get_interface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _lock:
        if _active == 0:
            # Bound method of the shared instance; patched on the instance so only the global
            # interface that model files import is affected, and removed when the last capture ends.
            _orig_get_interface = ALL_ATTENTION_FUNCTIONS.get_interface

            def get_interface(attn_implementation, default):
                return _recording(_orig_get_interface(attn_implementation, default))

            ALL_ATTENTION_FUNCTIONS.get_interface = get_interface
        _active += 1


def _uninstall() -> None:
    global _active, _orig_get_interface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _lock:
        _active -= 1
        if _active == 0:
            try:
                del ALL_ATTENTION_FUNCTIONS.get_interface  # back to the class method
            except AttributeError:
                pass
            _orig_get_interface = None


@contextmanager
def capture_qkv(
    model,
    layers: Iterable[int],
    what: Iterable[str] = ("q", "k", "v"),
    on_record: Callable[[Capture, int], None] | None = None,
) -> Iterator[Capture]:
    """Record post-RoPE q, k and v of `layers` during forward passes inside the context.

    ``what`` limits the recording to the relations that are needed (e.g. ``("q", "k")``) so the
    teacher keeps nothing the loss will not read. The context yields a :class:`Capture`; its
    tensors stay valid after the context exits. ``on_record(capture, layer)``, when given, is called once
    per layer right after its tensors are recorded, before that layer's attention runs (the
    relation loss starts on a layer while the forward goes on with the next).
    """
    mods = attention_modules(model)
    layers = sorted({int(layer) for layer in layers})
    bad = [layer for layer in layers if not 0 <= layer < len(mods)]
    if bad:
        raise ValueError(f"capture layers {bad} out of range for a model with {len(mods)} layers")
    what = tuple(w for w in ("q", "k", "v") if w in set(what))
    cap = Capture(layers, what, on_record)
    for layer in layers:
        if getattr(mods[layer], _ATTR, None) is not None:
            raise RuntimeError(
                f"layer {layer} of this model is already being captured (nested capture_qkv on one model)"
            )
    _install()
    try:
        for layer in layers:
            setattr(mods[layer], _ATTR, (cap, layer))
        yield cap
    finally:
        for layer in layers:
            if getattr(mods[layer], _ATTR, None) is not None and getattr(mods[layer], _ATTR)[0] is cap:
                delattr(mods[layer], _ATTR)
        _uninstall()
