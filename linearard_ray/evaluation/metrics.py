"""What an evaluation measures on its windows: next-token negative log-likelihood (computed in
chunks of positions so long contexts never materialise a [T, vocab] fp32 logit matrix) and the
relation KL of a model to the teacher, layer by layer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from linearard_ray.models.unwrap import decoder_and_head


@torch.no_grad()
def sequence_nll_rows(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, chunk_size: int = 1024
) -> tuple[list[float], list[int]]:
    """Per row of the batch: summed NLL (nats) over its predicted tokens, and how many it predicted.

    Position t predicts token t+1; positions whose target is padding are not counted. Per row, so
    that two models can be compared window by window (linearard_ray.evaluation.paired_stats).
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = input_ids[:, 1:]
    valid = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    totals = torch.zeros(targets.shape[0], dtype=torch.float64, device=targets.device)
    T = targets.shape[1]
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        logits = head(hidden[:, s:e]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets[:, s:e], reduction="none")
        totals += (nll * valid[:, s:e]).sum(dim=1, dtype=torch.float64)
    return totals.tolist(), valid.sum(dim=1).tolist()


def sequence_nll(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, chunk_size: int = 1024
) -> tuple[float, int]:
    """Summed NLL (nats) over the batch's predicted tokens and how many were predicted."""
    sums, counts = sequence_nll_rows(model, input_ids, attention_mask, chunk_size)
    return float(sum(sums)), int(sum(counts))


def nll_windows(model, windows: np.ndarray, batch_size: int, device) -> dict:
    """Summed NLL and predicted-token count over windows (each window predicts its own tokens), and
    each window's mean NLL in window order: every model gets the same windows, so the report can
    compare two of them window by window."""
    sums: list[float] = []
    counts: list[int] = []
    for s in range(0, len(windows), batch_size):
        ids = torch.as_tensor(windows[s : s + batch_size], dtype=torch.long, device=device)
        t, c = sequence_nll_rows(model, ids, torch.ones_like(ids))
        sums += t
        counts += c
    return {
        "nll_sum": float(sum(sums)),
        "tokens": int(sum(counts)),
        "window_nll": [t / c for t, c in zip(sums, counts, strict=False)],
    }


def qk_correction(hf_config, yarn_logit_correction: str) -> float:
    """Multiplier on the Q·Qᵀ and K·Kᵀ logit scale of one model (V·Vᵀ keeps its scale).

    RoPE types with an attention factor m (yarn, longrope) multiply cos/sin by m, so q·q and k·k
    carry m²; 'divide' removes it so the relation compares shapes of distributions, as the
    training objective does.
    """
    if yarn_logit_correction != "divide":
        return 1.0
    from linearard_ray.models.rope import rope_attention_factor

    return 1.0 / rope_attention_factor(hf_config) ** 2


def _captured_qkv(model, layers: list[int], ids: torch.Tensor, mask: torch.Tensor):
    """The post-RoPE q, k, v (and softmax scales) of `layers` in the model's forward on ids."""
    from linearard_ray.models.capture import capture_qkv

    with capture_qkv(model, layers) as captured:
        decoder_and_head(model)[0](input_ids=ids, attention_mask=mask)
    captured.check_complete()
    return captured


def _layer_relation_kls(ct, cs, layer: int, mask: torch.Tensor, ct_corr: float, cs_corr: float) -> dict[str, float]:
    """Summed row KL(teacher ‖ student) of one layer's Q/Q, K/K, V/V relations and attention map."""
    from linearard_ray.ops import relation_kl, relation_kl_layer

    a_t, a_s = ct.scaling[layer], cs.scaling[layer]
    student = (cs.q[layer], cs.k[layer], cs.v[layer])
    teacher = (ct.q[layer], ct.k[layer], ct.v[layer])
    student_scales = (a_s * cs_corr, a_s * cs_corr, a_s)
    teacher_scales = (a_t * ct_corr, a_t * ct_corr, a_t)
    common = {"attention_mask": mask, "causal": True, "reduction": "sum"}
    kls = relation_kl_layer(*student, *teacher, student_scales=student_scales, teacher_scales=teacher_scales, **common)
    out = {r: float(kl) for r, kl in zip("qkv", kls, strict=False)}
    # The attention map: queries against keys, at the model's own (uncorrected) logit scale.
    attention_map = relation_kl(*student[:2], *teacher[:2], student_scale=a_s, teacher_scale=a_t, **common)
    out["qk"] = float(attention_map)
    return out


@torch.no_grad()
def relation_kl_windows(
    teacher,
    student,
    windows: np.ndarray,
    batch_size: int,
    device,
    yarn_logit_correction: str = "divide",
    layers: list[int] | None = None,
) -> dict:
    """Per layer, summed row KL(teacher ‖ student) of the Q/Q, K/K and V/V self-relations and of the
    attention map ("qk": the causal softmax of Q·Kᵀ the model reads positions with), and the number
    of rows (batch × heads × positions) each was summed over.

    Relation logits use each attention's own softmax scale (1/√D for the supported models); the
    attention map keeps YaRN's m² (it is what the model attends with), the Q/Q and K/K relations
    divide it out as the objective does."""
    n_layers = teacher.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else layers
    ct_corr = qk_correction(teacher.config, yarn_logit_correction)
    cs_corr = qk_correction(student.config, yarn_logit_correction)
    sums = {layer: {"q": 0.0, "k": 0.0, "v": 0.0, "qk": 0.0} for layer in layers}
    rows = {"q": 0, "k": 0, "v": 0}
    for s in range(0, len(windows), batch_size):
        ids = torch.as_tensor(windows[s : s + batch_size], dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        ct = _captured_qkv(teacher, layers, ids, mask)
        cs = _captured_qkv(student, layers, ids, mask)
        for layer in layers:
            for r, kl in _layer_relation_kls(ct, cs, layer, mask, ct_corr, cs_corr).items():
                sums[layer][r] += kl
        B, T = ids.shape
        for r in "qkv":
            rows[r] += B * getattr(ct, r)[layers[0]].shape[1] * T
        del ct, cs
    rows["qk"] = rows["q"]  # the attention map has a row per query head and position, as Q/Q
    return {"sums": {str(layer): v for layer, v in sums.items()}, "rows": rows}
