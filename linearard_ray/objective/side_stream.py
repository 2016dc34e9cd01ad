"""Run part of a step on a second CUDA stream, so its kernels overlap the main stream's.

Why the relation loss goes there: its kernels are bound by the tensor cores and the exponential
units, while much of a decoder step is memory-bound elementwise work (RMSNorm, RoPE, SiLU, casts,
residual adds) that leaves both idle. On one stream the two only take turns; on two the GPU
can run them at once. Autograd runs an op's backward on the stream its forward ran on, so the
relation backward lands on the side stream as well and overlaps the decoder's backward. On the
LLaMA-2-7B-shaped step the gain is about the gaps the relation op's host path leaves on one
stream; the decoder's GEMMs fill the GPU as well, so the relation kernels themselves mostly share
SMs rather than hide (measured: benchmarks/README.md, 'Distillation step').

The stream rules kept here, so the caching allocator never hands out memory a stream still reads:
the side stream waits for the main one before reading what the main one wrote; every tensor one
stream allocated and the other reads is ``record_stream``-ed on the reader; the main stream waits
for the side one before it uses a result. Gradients that the relation backward hands to the main
stream need nothing from us: autograd's input buffer makes the consumer wait and records its
stream on them. Off CUDA everything runs in place: same ops, same order
within the relation loss, same values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

# torch maps any priority past the device's range to its end: this is the most urgent one
MOST_URGENT = -100


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class SideStream:
    """``with side.run(inputs): ...`` queues work on the side stream; ``side.join(outputs)`` hands
    its results back to the main stream. ``enabled`` is False off CUDA (both are then no-ops)."""

    def __init__(self, device: torch.device, priority: int = 0):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        # priority: CUDA's, lower is more urgent; 0 is the default streams' (the least urgent)
        self.stream = torch.cuda.Stream(device=self.device, priority=priority) if self.enabled else None

    @contextmanager
    def run(self, inputs: Iterable[torch.Tensor]) -> Iterator[None]:
        """Work inside runs on the side stream after everything queued so far on the main one.

        Saved tensors are kept as they are inside: the work may start inside a non-reentrant
        checkpointed layer, whose hooks would otherwise take the relation op's saved tensors for
        ones it can recompute, and it cannot (the op is not part of the layer).
        """
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            if not self.enabled:
                yield
                return
            main = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(main)
            for t in inputs:
                if t is not None and t.device.type == "cuda":
                    t.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                yield

    def join(self, outputs: Iterable[torch.Tensor]) -> None:
        """The main stream waits for the side stream; ``outputs`` may then be used on it."""
        if not self.enabled:
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        for t in outputs:
            if t is not None and t.device.type == "cuda":
                t.record_stream(main)
