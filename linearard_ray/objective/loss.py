"""The training objective: a weighted sum of relation KL, output-logit KL and next-token CE.

    loss = w_rel · relation + w_logit · logit_kl + w_nt · next_token

relation: for every selected layer l and relation r ∈ {q, k, v} (the self-relations Q·Qᵀ, K·Kᵀ,
V·Vᵀ, causal, row-wise softmax, KL(teacher ‖ student) per row),

    R_{l,r} = Σ_{b, h, valid rows i} KL_{b,h,i} / (H_r · N)

where N is the number of valid tokens of the batch (attention_mask = 1) and H_r the number of
heads that relation has: the query heads for Q/Q, the KV heads for K/K and V/V (GQA heads are not
repeated, so no head is counted twice). relation_r is the mean of R_{l,r} over the selected
layers, and ``relation = Σ_r w_r · relation_r`` with the per-relation weights
(``objective.relation.weights``). Relations use the attention's own softmax scale (1/√D).

Optionally (``weights.qk`` > 0, off by default) the attention map itself joins them: the causal
softmax rows of Q·Kᵀ, the distribution each query head actually reads positions with (GQA key heads
shared by their query heads, H_qk = the query heads). It is the term that says *where* a model
looks, which the self-relations say only indirectly.

YaRN (and LongRoPE) multiply cos/sin by an attention factor m, so post-RoPE q and k carry m and
Q·Qᵀ, K·Kᵀ carry m² (V/V does not). With ``rope.yarn_logit_correction = 'divide'`` (default) the
student's Q/Q and K/K scales are divided by m², so the loss compares the shapes of the relation
distributions the rotation produces, not m's deliberate sharpening: m exists to make the long
context attention sharper than the teacher's, and a loss that penalised it would train LoRA to
shrink q and k by m and undo YaRN. 'keep' compares the raw distributions. The attention map (qk)
is never corrected: its m² is the sharpening YaRN wants the student to attend with.

logit_kl: τ²·KL(teacher ‖ student) of the next-token distributions at temperature τ, averaged
over valid positions (or over the top-k positions per sequence), computed chunk-wise from final
hidden states (``ops.logit_kl``).

next_token: mean CE of the student over predicted tokens of ``lm_batch`` (or ``batch``): position
t predicts token t+1, counted where both are valid.

A term with weight 0 costs nothing: without relation and logit terms the teacher does not run;
without the logit term no LM head runs on the teacher; relations with weight 0 are not captured
or computed. Metrics of terms that are off are absent.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from linearard_ray import ops
from linearard_ray.config import ObjectiveConfig, RopeConfig
from linearard_ray.models.capture import capture_qkv
from linearard_ray.models.rope import rope_attention_factor
from linearard_ray.models.unwrap import decoder_and_head, unwrap_model
from linearard_ray.objective.side_stream import MOST_URGENT, SideStream
from linearard_ray.ops.api import triton_module
from linearard_ray.ops.logit_kl import chunked_cross_entropy, chunked_logit_kl

SELF_RELATIONS = ("q", "k", "v")
RELATIONS = (*SELF_RELATIONS, "qk")  # qk: the attention map, a cross-relation of q and k


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _logit_term_parts(model):
    """(decoder, lm_head) for the chunked logit terms, which compute logits from hidden states
    themselves and so support only a plain linear head."""
    base = unwrap_model(model)
    if getattr(base, "model", None) is None or getattr(base, "lm_head", None) is None:
        raise ValueError(f"{type(base).__name__} has no .model decoder and .lm_head; not a supported causal LM")
    if getattr(base.lm_head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the chunked logit terms")
    if getattr(base.config, "final_logit_softcapping", None):
        raise ValueError("models with final logit softcapping are not supported by the chunked logit terms")
    return decoder_and_head(base)


def _batch_to(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(ids, mask, dense) on `device`; dense = no padding anywhere (decided before the copy, so a
    CPU batch costs no device sync)."""
    if "input_ids" not in batch:
        raise KeyError("batch needs 'input_ids'")
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    if mask is None:
        mask, dense = torch.ones_like(ids), True
    else:
        dense = bool(mask.all())
        mask = mask.to(device)
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise ValueError(f"batch input_ids {tuple(ids.shape)} / attention_mask {tuple(mask.shape)} must both be [B, T]")
    return ids, mask, dense


def relation_caster(device: torch.device, tensors: list[torch.Tensor]):
    """The relation op wants one dtype for a layer's six tensors. Mixed precision can hand it
    several: with fp32 weights under bf16 autocast, RoPE multiplies the bf16 projections by fp32
    cos/sin, so q/k arrive in fp32 and v in bf16. Under autocast everything goes to the autocast
    dtype (the fast 16-bit kernels, the precision the rest of the step runs in); otherwise to the
    widest dtype present. Casting keeps the graph, so gradients flow back in each input's dtype."""
    if torch.is_autocast_enabled(device.type):
        target = torch.get_autocast_dtype(device.type)
    else:
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) <= 1:
            return lambda t: t
        target = functools.reduce(torch.promote_types, dtypes)
    return lambda t: t if t.dtype == target else t.to(target)


def _backward_mode(mode: str):
    """The Triton relation kernels' backward for the forwards run inside ("auto" and no Triton: as is)."""
    rk = triton_module() if mode != "auto" else None
    return rk.backward_mode(mode) if rk is not None else contextlib.nullcontext()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _output_anchor(hidden: torch.Tensor) -> torch.Tensor:
    """A zero that depends on the decoder's output. FSDP2 gathers a layer's weights again for its
    backward from a hook on the layer's output; with relation terms alone the last layers' outputs
    get no gradient (only their captured q/k/v do), so their backward would meet the weights still
    in shards. This zero gives every output a (zero) gradient, at the cost of the backward of the
    final norm and the last layer's tail."""
    return hidden.sum() * 0.0


class Objective:
    """``Objective(objective_cfg, rope_cfg, num_layers)(teacher, student, batch, lm_batch)``.

    ``own_lm_stream``: the next-token term reads only ``lm_batch``; a call without one (a step
    between ``data.lm_every`` draws) leaves the term out instead of moving it onto ``batch``."""

    def __init__(
        self,
        objective_cfg: ObjectiveConfig,
        rope_cfg: RopeConfig | None,
        num_layers: int,
        backend: str = "auto",
        own_lm_stream: bool = False,
        sharded: bool = False,
    ):
        self.cfg = objective_cfg
        self.own_lm_stream = own_lm_stream
        self.sharded = sharded
        self.rope_cfg = rope_cfg or RopeConfig()
        self.num_layers = int(num_layers)
        self.backend = backend
        rel = objective_cfg.relation
        self.w_rel = float(rel.weight)
        self.w_logit = float(objective_cfg.logits.weight)
        self.w_nt = float(objective_cfg.next_token.weight)
        self.rel_weights = {r: float(rel.weights.get(r, 0.0)) for r in RELATIONS}
        self.relations = tuple(r for r in RELATIONS if self.rel_weights[r] > 0) if self.w_rel > 0 else ()
        if self.w_rel > 0 and not self.relations:
            raise ValueError("objective.relation.weight > 0 but every per-relation weight is 0")
        # the captured tensors the relations read (the attention map needs q and k)
        need = set(self.relations) | ({"q", "k"} if "qk" in self.relations else set())
        self.captured = tuple(r for r in SELF_RELATIONS if r in need)
        self.self_relations = tuple(r for r in self.relations if r in SELF_RELATIONS)
        self.layers = rel.layers.resolve(self.num_layers) if self.relations else []
        self.needs_teacher = bool(self.relations) or self.w_logit > 0
        self._corr_cache: dict[int, tuple[object, float]] = {}
        self._sides: dict[torch.device, SideStream] = {}

    # ------------------------------------------------------------------ helpers

    def _scale_correction(self, model) -> float:
        """1/m² for the Q/Q and K/K scales of a model whose RoPE multiplies cos/sin by m."""
        if self.rope_cfg.yarn_logit_correction == "keep":
            return 1.0
        cfg = unwrap_model(model).config
        hit = self._corr_cache.get(id(cfg))
        if hit is None or hit[0] is not cfg:
            m = rope_attention_factor(cfg)
            hit = self._corr_cache[id(cfg)] = (cfg, 1.0 / (m * m))
        return hit[1]

    def _layer_relations(
        self, layer: int, tcap, scap, op_mask, n_tok: torch.Tensor, corr_s: float, corr_t: float
    ) -> dict[str, torch.Tensor]:
        """R_{l,r} of every relation r of this layer (l; the per-layer terms of the module docstring)."""
        s_scale, t_scale = scap.scaling[layer], tcap.scaling[layer]
        scales_s = {"q": s_scale * corr_s, "k": s_scale * corr_s, "v": s_scale}
        scales_t = {"q": t_scale * corr_t, "k": t_scale * corr_t, "v": t_scale}
        cast = relation_caster(n_tok.device, [getattr(c, r)[layer] for c in (scap, tcap) for r in self.captured])
        with _backward_mode(self.cfg.relation.backward):
            sums = self._layer_sums(layer, tcap, scap, op_mask, cast, scales_s, scales_t)
        out = {}
        for r in self.relations:
            heads = getattr(scap, "q" if r == "qk" else r)[layer].shape[1]
            out[r] = sums[r].float() / (heads * n_tok)
        return out

    def _layer_sums(
        self, layer: int, tcap, scap, op_mask, cast, scales_s: dict, scales_t: dict
    ) -> dict[str, torch.Tensor]:
        s_scale, t_scale = scap.scaling[layer], tcap.scaling[layer]
        if self.cfg.relation.fused and len(self.self_relations) == 3:
            vals = ops.relation_kl_layer(
                *(cast(getattr(c, r)[layer]) for c in (scap, tcap) for r in SELF_RELATIONS),
                attention_mask=op_mask,
                causal=True,
                student_scales=tuple(scales_s[r] for r in SELF_RELATIONS),
                teacher_scales=tuple(scales_t[r] for r in SELF_RELATIONS),
                reduction="sum",
                backend=self.backend,
            )
            sums = dict(zip(SELF_RELATIONS, vals, strict=False))
        else:
            sums = {}
            for r in self.self_relations:
                s, t = cast(getattr(scap, r)[layer]), cast(getattr(tcap, r)[layer])
                sums[r] = ops.relation_kl(
                    s,
                    None,
                    t,
                    None,
                    attention_mask=op_mask,
                    causal=True,
                    student_scale=scales_s[r],
                    teacher_scale=scales_t[r],
                    reduction="sum",
                    backend=self.backend,
                )
        if "qk" in self.relations:
            sums["qk"] = ops.relation_kl(
                cast(scap.q[layer]),
                cast(scap.k[layer]),
                cast(tcap.q[layer]),
                cast(tcap.k[layer]),
                attention_mask=op_mask,
                causal=True,
                student_scale=s_scale,
                teacher_scale=t_scale,
                reduction="sum",
                backend=self.backend,
            )
        return sums

    def _combine_relations(
        self, per_layer: dict[int, dict[str, torch.Tensor]], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logs: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            for r, v in per_layer[layer].items():
                logs[f"relation_layer{layer}_{r}"] = v
        total = torch.zeros((), device=device)
        for r in self.relations:
            mean_r = torch.stack([per_layer[layer][r] for layer in self.layers]).mean()
            logs[f"relation_{r}"] = mean_r
            total = total + self.rel_weights[r] * mean_r
        logs["relation"] = total
        return total, logs

    def _side_stream(self, device: torch.device) -> SideStream:
        side = self._sides.get(device)
        if side is None:
            # Most urgent: the main stream waits on what the side stream computes (the loss at the
            # end of the forward, each layer's q/k/v gradients in the backward), so the relation
            # kernels are on the critical path. Against the default priority the gain on the 7B step
            # was within the spread between runs (measured: benchmarks/README.md, 'Distillation step').
            side = self._sides[device] = SideStream(device, priority=MOST_URGENT)
        return side

    def _student_relations(self, student, s_dec, ids, mask, dense: bool, tcap, corr_t: float):
        """The student's forward with capture, and the relation loss on what it captured.

        With ``relation.overlap`` each layer's relations are queued the moment its q/k/v are
        recorded, on a second CUDA stream (``side_stream``), while the forward goes on with the
        next layer; autograd then runs their backward on that stream too. Otherwise they run on
        the main stream after the forward. The values are the same either way.
        """
        n_tok = mask.sum().clamp_min(1).to(torch.float32)
        # A block without padding needs no mask in the kernels: the masked path loads and applies
        # it on every tile, which costs time in an exp-bound inner loop.
        op_mask = None if dense else mask
        corr_s = self._scale_correction(student)
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        overlap = self.cfg.relation.overlap
        side = self._side_stream(mask.device) if overlap else None

        def on_record(scap, layer: int) -> None:
            inputs = [getattr(c, r)[layer] for c in (scap, tcap) for r in self.captured] + [n_tok, op_mask]
            with side.run(inputs):
                per_layer[layer] = self._layer_relations(layer, tcap, scap, op_mask, n_tok, corr_s, corr_t)

        with capture_qkv(student, self.layers, what=self.captured, on_record=on_record if overlap else None) as scap:
            s_out = s_dec(input_ids=ids, attention_mask=mask, use_cache=False)
        scap.check_complete()
        if overlap:
            side.join([v for terms in per_layer.values() for v in terms.values()])
        else:
            for layer in self.layers:
                per_layer[layer] = self._layer_relations(layer, tcap, scap, op_mask, n_tok, corr_s, corr_t)
        rel, logs = self._combine_relations(per_layer, mask.device)
        return s_out, rel, logs

    # ------------------------------------------------------------------ call

    def __call__(self, teacher, student, batch: dict, lm_batch: dict | None = None) -> LossOutput:
        dev = _device_of(student)
        ids, mask, dense = _batch_to(batch, dev)
        s_dec, s_head = _logit_term_parts(student)
        logs: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=dev)
        # The student's forward on `batch` serves the KL terms, and the next-token term when it
        # has no stream of its own.
        nt_on_batch = self.w_nt > 0 and lm_batch is None and not self.own_lm_stream
        if self.needs_teacher or nt_on_batch:
            loss = self._batch_terms(teacher, student, s_dec, s_head, ids, mask, dense, nt_on_batch, loss, logs)
        if self.w_nt > 0 and lm_batch is not None:
            lids, lmask, _ = _batch_to(lm_batch, dev)
            h = s_dec(input_ids=lids, attention_mask=lmask, use_cache=False).last_hidden_state
            nt = self._next_token(h, s_head, lids, lmask)
            logs["next_token"] = nt
            loss = loss + self.w_nt * nt
        logs["loss"] = loss
        keys = list(logs)
        vals = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()  # one device sync
        return LossOutput(loss=loss, metrics=dict(zip(keys, vals, strict=False)))

    def _teacher_forward(self, teacher, ids, mask, device: torch.device):
        """The teacher's forward without grad -> (its captured q/k/v, None without relations; its
        final hidden states on the student's device, None without the logit term; its LM head)."""
        if teacher is None:
            raise ValueError("this objective needs a teacher (relation or logit weight > 0) but teacher is None")
        t_dec, t_head = _logit_term_parts(teacher)
        tcap = None
        t_hidden = None
        with torch.no_grad():
            if self.relations:
                with capture_qkv(teacher, self.layers, what=self.captured) as tcap:
                    t_out = t_dec(
                        input_ids=ids.to(_device_of(teacher)),
                        attention_mask=mask.to(_device_of(teacher)),
                        use_cache=False,
                    )
                tcap.check_complete()
            else:
                t_out = t_dec(
                    input_ids=ids.to(_device_of(teacher)),
                    attention_mask=mask.to(_device_of(teacher)),
                    use_cache=False,
                )
            if self.w_logit > 0:
                t_hidden = t_out.last_hidden_state.to(device)
            del t_out
        return tcap, t_hidden, t_head

    def _batch_terms(
        self, teacher, student, s_dec, s_head, ids, mask, dense: bool, nt_on_batch: bool, loss, logs: dict
    ) -> torch.Tensor:
        """The terms of the student's forward on `batch` (relation, logit KL, next token when it
        reads `batch`) added to `loss`, their values to `logs`."""
        tcap, t_hidden, t_head = None, None, None
        if self.needs_teacher:
            tcap, t_hidden, t_head = self._teacher_forward(teacher, ids, mask, ids.device)
        if self.relations:
            s_out, rel, rel_logs = self._student_relations(
                student, s_dec, ids, mask, dense, tcap, self._scale_correction(teacher)
            )
            logs.update(rel_logs)
            loss = loss + self.w_rel * rel
            del tcap
        else:
            s_out = s_dec(input_ids=ids, attention_mask=mask, use_cache=False)
        s_hidden = s_out.last_hidden_state
        if self.sharded and not (self.w_logit > 0 or nt_on_batch):
            loss = loss + _output_anchor(s_hidden)
        if self.w_logit > 0:
            lc = self.cfg.logits
            kl = chunked_logit_kl(
                s_hidden,
                t_hidden,
                s_head.weight,
                t_head.weight,
                attention_mask=mask,
                temperature=lc.temperature,
                top_k_positions=lc.top_k_positions,
                chunk_size=lc.chunk_size,
                reduction="mean",
            )
            logs["logit_kl"] = kl
            loss = loss + self.w_logit * kl
        if nt_on_batch:
            nt = self._next_token(s_hidden, s_head, ids, mask)
            logs["next_token"] = nt
            loss = loss + self.w_nt * nt
        return loss

    def _next_token(self, hidden, head, ids, mask) -> torch.Tensor:
        chunk = self.cfg.logits.chunk_size
        valid = mask[:, :-1].bool() & mask[:, 1:].bool()
        return chunked_cross_entropy(hidden[:, :-1], head.weight, ids[:, 1:], valid, chunk, reduction="mean")
