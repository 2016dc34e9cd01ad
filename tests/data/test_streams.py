"""The block stream a worker trains on: each epoch partitioned across workers without repeats,
deterministic, resumable at an exact position, and the prefetcher handing out the same batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linearard_ray.data.streams import BlockStream, Prefetcher, StreamPosition, shuffled


def _fake_dataset(n_rows: int, T: int, seed: int):
    """Rows whose first token is a unique id; served in batches of 5 like a DataIterator."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 500, size=(n_rows, T)).astype(np.int32)
    ids[:, 0] = np.arange(n_rows)
    mask = (rng.random((n_rows, T)) > 0.1).astype(np.int8)

    def open_epoch():
        for s in range(0, n_rows, 5):
            yield {"input_ids": ids[s : s + 5], "attention_mask": mask[s : s + 5]}

    return open_epoch, ids, mask


def _ids(batches):
    return [int(x) for b in batches for x in b["input_ids"][:, 0]]


def _stream(open_epoch, n, rank, world, mb=2, start=None, buffer=8, seed=3):
    return BlockStream(
        open_epoch,
        num_rows=n,
        rank=rank,
        world_size=world,
        micro_batch_size=mb,
        seed=seed,
        shuffle_buffer=buffer,
        max_epochs=4,
        start=start,
    )


def test_stream_partitions_each_epoch_without_repeats_and_counts_the_rest():
    n, world, mb = 53, 3, 2
    open_epoch, ids, mask = _fake_dataset(n, 6, seed=1)
    streams = [_stream(open_epoch, n, r, world, mb) for r in range(world)]
    per_epoch = streams[0].micro_batches_per_epoch
    assert streams[0].rows_per_epoch == (n // world) // mb * mb == 16
    assert streams[0].dropped_per_epoch == n - 16 * world
    epochs = []
    for e in range(2):
        got = [_ids([next(s) for _ in range(per_epoch)]) for s in streams]
        flat = [i for g in got for i in g]
        assert len(flat) == len(set(flat)) == 16 * world  # nobody sees a block twice in an epoch
        epochs.append(got)
        assert all(s.position == StreamPosition(e, 16) for s in streams)
    assert epochs[0] != epochs[1]  # a new order every epoch
    # batches carry the real rows
    b = next(_stream(open_epoch, n, 1, world, mb))
    for row_ids, row_mask in zip(b["input_ids"], b["attention_mask"], strict=False):
        k = int(row_ids[0])
        assert torch.equal(row_ids, torch.from_numpy(ids[k].astype(np.int64)))
        assert torch.equal(row_mask, torch.from_numpy(mask[k].astype(np.int64)))
        assert b["input_ids"].dtype == torch.long


def test_stream_is_deterministic_and_resumes_exactly_across_epochs():
    n, world = 41, 2
    open_epoch, _, _ = _fake_dataset(n, 4, seed=2)
    for rank in range(world):
        full = _ids(list(_take(_stream(open_epoch, n, rank, world), 25)))
        assert full == _ids(list(_take(_stream(open_epoch, n, rank, world), 25)))
        for cut in (1, 7, 10, 11, 19):  # 10 micro-batches per epoch: cuts inside and at the boundary
            s = _stream(open_epoch, n, rank, world)
            head = _ids(list(_take(s, cut)))
            resumed = _stream(open_epoch, n, rank, world, start=s.position)
            tail = _ids(list(_take(resumed, 25 - cut)))
            assert head + tail == full, (rank, cut)


def test_stream_stops_after_max_epochs_and_rejects_too_little_data():
    open_epoch, _, _ = _fake_dataset(8, 4, seed=3)
    s = BlockStream(open_epoch, num_rows=8, rank=0, world_size=2, micro_batch_size=2, seed=0, max_epochs=2)
    assert len(list(s)) == 4
    with pytest.raises(ValueError, match="num_workers"):
        BlockStream(open_epoch, num_rows=3, rank=0, world_size=2, micro_batch_size=2, seed=0)
    short = BlockStream(open_epoch, num_rows=20, rank=0, world_size=1, micro_batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="fewer than the 20 blocks"):
        list(short)


def test_shuffle_buffer_is_a_permutation():
    rows = list(range(37))
    for buf in (1, 5, 37, 100):
        out = list(shuffled(iter(rows), seed=4, epoch=1, buffer_size=buf))
        assert sorted(out) == rows
    assert list(shuffled(iter(rows), 4, 1, 100)) != rows


def test_prefetcher_hands_out_the_same_batches_with_exact_positions():
    n, world = 41, 2
    open_epoch, _, _ = _fake_dataset(n, 4, seed=5)
    plain = _stream(open_epoch, n, 1, world)
    ahead = Prefetcher(_stream(open_epoch, n, 1, world), depth=3)
    assert ahead.position == StreamPosition(0, 0)
    for _ in range(23):  # across an epoch boundary (10 micro-batches per epoch)
        a, b = next(plain), next(ahead)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert ahead.position == plain.position  # what was handed out, not what was read ahead
    ahead.close()
    # a resumed stream starts from the handed-out position
    resumed = Prefetcher(_stream(open_epoch, n, 1, world, start=ahead.position))
    assert torch.equal(next(resumed)["input_ids"], next(plain)["input_ids"])
    resumed.close()


def test_prefetcher_ends_and_raises_like_the_stream():
    open_epoch, _, _ = _fake_dataset(8, 4, seed=6)
    p = Prefetcher(BlockStream(open_epoch, num_rows=8, rank=0, world_size=2, micro_batch_size=2, seed=0, max_epochs=2))
    assert len(list(p)) == 4
    with pytest.raises(StopIteration):
        next(p)
    bad = Prefetcher(BlockStream(open_epoch, num_rows=20, rank=0, world_size=1, micro_batch_size=2, seed=0))
    with pytest.raises(RuntimeError, match="fewer than the 20 blocks"):
        list(bad)


def _take(it, k):
    for _ in range(k):
        yield next(it)
