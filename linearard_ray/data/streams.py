"""Deterministic, resumable per-worker block streams over a Ray Data iterator.

Ray Data's ``streaming_split`` hands blocks to whichever worker asks first, so which worker sees
which block is not reproducible and a resumed run could not know what was already consumed.
Instead every worker reads the same (unsplit, order-preserving) stream, applies the same seeded
shuffle buffer for the epoch, and keeps the rows whose global index ``g`` has ``g % world == rank``.
The order is then a pure function of (data, seed, epoch, world size), and the position is two
integers: the epoch and how many of its own rows the worker consumed. Resuming re-reads the
stream up to that position and discards it, so no block is seen twice or skipped.

Each epoch uses the first ``epoch_rows`` rows of the shuffled order, a multiple of ``world ×
micro_batch`` (by default ``num_rows`` rounded down to one), so every worker takes exactly
``epoch_rows // world`` of them and runs the same number of micro-batches (collectives never hang
on a ragged tail); the rows this leaves out of an epoch are counted in ``dropped_per_epoch``.

Across workers, micro-batch ``k`` of every worker together covers the global rows
``[k·world·micro_batch, (k+1)·world·micro_batch)`` of the epoch, so an optimizer step covers a
contiguous range of ``world × micro_batch × grad_accum`` rows whatever the worker count. That is
what lets a run resume on another number of workers with the same global batch
(``remap_position``), provided its epochs keep their length (``epoch_rows`` fixed for the run).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Shuffle-buffer size in tokens (rows = this // block length). Preprocessing already shuffles
# globally; this buffer only re-orders each epoch differently, so it can stay small.
DEFAULT_SHUFFLE_TOKENS = 1 << 20


@dataclass
class StreamPosition:
    """Where a worker's block stream stands: ``rows`` of its own rows of ``epoch`` are consumed."""

    epoch: int = 0
    rows: int = 0


def default_epoch_rows(num_rows: int, unit: int) -> int:
    """The rows an epoch uses: ``num_rows`` rounded down to a multiple of ``unit`` (the rows one
    micro-batch of every worker takes together, or a whole optimizer step's)."""
    return num_rows // unit * unit


def remap_position(pos: StreamPosition, epoch_rows: int, old_world: int, new_world: int, micro_batch: int, name: str):
    """``pos`` of a stream read by ``old_world`` workers as the position of each of ``new_world``
    workers with micro-batches of ``micro_batch`` rows: the same global rows consumed. Valid at an
    optimizer step's end (every worker at the same position). Raises ``ValueError`` when the new
    workers cannot continue exactly there."""
    unit = new_world * micro_batch
    if epoch_rows % unit:
        raise ValueError(
            f"{name} stream: the run's epochs use {epoch_rows} blocks, which {new_world} workers × micro-batch "
            f"{micro_batch} cannot share evenly"
        )
    consumed = pos.rows * old_world
    if consumed % unit:
        raise ValueError(
            f"{name} stream: the checkpoint stands {consumed} blocks into epoch {pos.epoch}, not a whole "
            f"micro-batch of {new_world} workers × {micro_batch}"
        )
    return StreamPosition(pos.epoch, consumed // new_world)


def _rows_of(batch: dict[str, Any]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for i in range(len(ids)):
        yield np.asarray(ids[i]), np.asarray(mask[i])


def shuffled(rows: Iterable[Any], seed: int, epoch: int, buffer_size: int) -> Iterator[Any]:
    """A seeded buffer shuffle: deterministic for a deterministic input order; a full
    permutation when the buffer holds the whole stream."""
    rng = np.random.default_rng([seed, epoch])
    buf: list[Any] = []
    for row in rows:
        if len(buf) < buffer_size:
            buf.append(row)
            continue
        j = int(rng.integers(buffer_size))
        out, buf[j] = buf[j], row
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[int(j)]


class BlockStream:
    """Micro-batches ``{"input_ids", "attention_mask"}`` (LongTensor ``[B, T]``) for one worker.

    ``open_epoch()`` must return a fresh pass over the whole dataset in a deterministic order
    (e.g. ``lambda: shard.iter_batches(batch_format="numpy")`` on an order-preserving iterator).
    """

    def __init__(
        self,
        open_epoch: Callable[[], Iterable[dict[str, Any]]],
        *,
        num_rows: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        shuffle_buffer: int = 4096,
        max_epochs: int = 100,
        start: StreamPosition | None = None,
        name: str = "train",
        epoch_rows: int | None = None,
    ):
        if num_rows <= 0:
            raise ValueError(f"{name} stream: the dataset has no blocks")
        unit = world_size * micro_batch_size
        epoch_rows = default_epoch_rows(num_rows, unit) if epoch_rows is None else epoch_rows
        if epoch_rows % unit or epoch_rows > num_rows:
            raise ValueError(
                f"{name} stream: epochs of {epoch_rows} of its {num_rows} blocks cannot be shared evenly by "
                f"{world_size} workers × micro_batch_size {micro_batch_size}"
            )
        self.rows_per_epoch = epoch_rows // world_size
        if self.rows_per_epoch == 0:
            raise ValueError(
                f"{name} stream: {num_rows} blocks cannot feed {world_size} workers × micro_batch_size "
                f"{micro_batch_size}; add data or lower train.num_workers / train.micro_batch_size"
            )
        self.open_epoch = open_epoch
        self.num_rows = num_rows
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, max(1, shuffle_buffer)
        self.max_epochs = max_epochs
        self.name = name
        self.dropped_per_epoch = num_rows - self.rows_per_epoch * world_size
        self.position = StreamPosition(**vars(start)) if start is not None else StreamPosition()
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.rows_per_epoch // self.micro_batch_size

    def __iter__(self) -> BlockStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._generate()
        return next(self._it)

    def _global_rows(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = (r for batch in self.open_epoch() for r in _rows_of(batch))
        return shuffled(rows, self.seed, epoch, self.shuffle_buffer) if self.shuffle else rows

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.position.epoch < self.max_epochs:
            epoch, skip = self.position.epoch, self.position.rows
            if skip < self.rows_per_epoch:
                buf: list[tuple[np.ndarray, np.ndarray]] = []
                own = -1
                for g, row in enumerate(self._global_rows(epoch)):
                    if g % self.world_size != self.rank:
                        continue
                    own = g // self.world_size
                    if own >= self.rows_per_epoch:
                        break
                    if own < skip:
                        continue
                    buf.append(row)
                    if len(buf) == self.micro_batch_size:
                        self.position = StreamPosition(epoch, own + 1)
                        yield _collate(buf)
                        buf = []
                if self.position.rows < self.rows_per_epoch:
                    raise RuntimeError(
                        f"{self.name} stream: epoch {epoch} ended after {own + 1} of this worker's rows, "
                        f"expected {self.rows_per_epoch} (the dataset holds fewer than the {self.num_rows} "
                        "blocks counted before training)"
                    )
            self.position = StreamPosition(epoch + 1, 0)


def _collate(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
    return {"input_ids": ids, "attention_mask": mask}


class _End:
    pass


class Prefetcher:
    """Runs a ``BlockStream`` ``depth`` micro-batches ahead in a background thread.

    Reading and shuffling the stream, stacking rows and pinning host memory then overlap with the
    device's work instead of adding to every step. ``position`` is the stream position after the
    last batch *handed out* (not the last one prefetched), so checkpoints stay exact.
    """

    def __init__(self, stream: BlockStream, depth: int = 2, pin_memory: bool = False):
        self.stream = stream
        self.position = StreamPosition(**vars(stream.position))
        self._pin = pin_memory
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"prefetch-{stream.name}", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self.stream:
                if self._pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if not self._put((batch, StreamPosition(**vars(self.stream.position)))):
                    return
            self._put(_End())
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._done:
            raise StopIteration
        item = self._q.get()
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        batch, self.position = item
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
