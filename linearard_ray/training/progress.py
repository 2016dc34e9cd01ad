"""The step lines rank 0 logs: the step's numbers, a running mean of the loss, and an ETA."""

from __future__ import annotations

import collections

# steps in the running means (loss, step time) of the progress line
WINDOW = 10


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, m: dict[str, float], eta_s: float, loss_avg: float | None = None) -> str:
    """One step as a line; ``loss_avg`` (a running mean) shows the trend through per-block noise."""
    rel = " ".join(
        f"{k.removeprefix('relation_')} {m[k]:.4f}"
        for k in ("relation_q", "relation_k", "relation_v", "relation_qk")
        if k in m
    )
    parts = [
        f"step {step}/{total}",
        f"loss {m['loss']:.4f}" + (f" (avg {loss_avg:.4f})" if loss_avg is not None else ""),
    ]
    if rel:
        parts.append(f"rel {rel}")
    for k, label in (("logit_kl", "logit_kl"), ("next_token", "ce")):
        if k in m:
            parts.append(f"{label} {m[k]:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:.0f} tok/s", f"ETA {format_eta(eta_s)}"]
    return "[distill] " + " | ".join(parts)


class Progress:
    """The recent step times and losses behind a step line's ETA and running mean."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.step_times: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.recent_loss: collections.deque[float] = collections.deque(maxlen=WINDOW)

    def record(self, step_time_s: float, loss: float) -> None:
        self.step_times.append(step_time_s)
        self.recent_loss.append(loss)

    def line(self, step: int, metrics: dict[str, float]) -> str:
        eta = (self.total_steps - step) * (sum(self.step_times) / len(self.step_times))
        return progress_line(step, self.total_steps, metrics, eta, sum(self.recent_loss) / len(self.recent_loss))
