"""Next-token negative log-likelihood, computed in chunks of positions so long contexts never
materialise a [T, vocab] fp32 logit matrix."""

from __future__ import annotations

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
