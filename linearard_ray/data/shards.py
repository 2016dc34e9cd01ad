"""Writing token blocks to parquet shards, deterministically, without holding them all.

Blocks arrive as a stream in a fixed order. Without shuffling they are written as they come.
With shuffling each block gets a 64-bit key from a seeded bijective hash of its position in the
stream; blocks are spilled to 2^b bucket files by the key's top b bits, and each bucket is then
sorted in memory and written. The result is the stream sorted by key: a seeded permutation that
does not depend on how Ray scheduled the work, in memory of one bucket.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from linearard_ray.data.blocks import Block

BLOCK_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("attention_mask", pa.list_(pa.int8())),
        pa.field("doc_id", pa.string()),
        pa.field("block_index", pa.int32()),
    ]
)
_KEY = "_shuffle_key"
SHARD_PATTERN = "shard-{:05d}.parquet"


def blocks_table(
    input_ids: list[np.ndarray], masks: list[np.ndarray], doc_ids: list[str], block_index: list[int]
) -> pa.Table:
    """A table in BLOCK_SCHEMA from per-block arrays of equal length."""
    n = len(input_ids)
    width = len(input_ids[0]) if n else 0
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    ids = np.concatenate(input_ids).astype(np.int32, copy=False) if n else np.zeros(0, np.int32)
    m = np.concatenate(masks).astype(np.int8, copy=False) if n else np.zeros(0, np.int8)
    return pa.table(
        [
            pa.ListArray.from_arrays(offsets, pa.array(ids)),
            pa.ListArray.from_arrays(offsets, pa.array(m)),
            pa.array(doc_ids, type=pa.string()),
            pa.array(np.asarray(block_index, dtype=np.int32)),
        ],
        schema=BLOCK_SCHEMA,
    )


def table_of_blocks(blocks: list[Block]) -> pa.Table:
    """`blocks_table` of a list of blocks."""
    return blocks_table(
        [b.input_ids for b in blocks],
        [b.attention_mask for b in blocks],
        [b.doc_id for b in blocks],
        [b.block_index for b in blocks],
    )


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a bijection of uint64, so distinct positions get distinct keys.
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def shuffle_keys(positions: np.ndarray, seed: int) -> np.ndarray:
    """Seeded permutation keys for stream positions (unique for a given seed)."""
    salt = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return _mix64(positions.astype(np.uint64) ^ salt)


class Shuffler:
    """Spills blocks into key-range buckets and gives them back sorted by key."""

    def __init__(self, tmp_dir: Path, seed: int, n_buckets: int):
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.bits = max(0, int(n_buckets - 1).bit_length())
        self.n_buckets = 1 << self.bits
        self._writers: dict[int, ipc.RecordBatchStreamWriter] = {}
        self._schema = BLOCK_SCHEMA.append(pa.field(_KEY, pa.uint64()))
        self._pos = 0

    def add(self, table: pa.Table) -> None:
        n = table.num_rows
        if n == 0:
            return
        keys = shuffle_keys(np.arange(self._pos, self._pos + n, dtype=np.uint64), self.seed)
        self._pos += n
        table = table.append_column(_KEY, pa.array(keys, type=pa.uint64()))
        bucket = (keys >> np.uint64(64 - self.bits)).astype(np.int64) if self.bits else np.zeros(n, np.int64)
        for b in np.unique(bucket):
            part = table.filter(pa.array(bucket == b))
            w = self._writers.get(int(b))
            if w is None:
                w = self._writers[int(b)] = ipc.new_stream(str(self.dir / f"bucket-{int(b):05d}.arrow"), self._schema)
            w.write_table(part)

    def sorted_tables(self) -> Iterator[pa.Table]:
        for w in self._writers.values():
            w.close()
        for b in sorted(self._writers):
            path = self.dir / f"bucket-{b:05d}.arrow"
            with ipc.open_stream(str(path)) as r:
                t = r.read_all()
            path.unlink()
            t = t.sort_by(_KEY).drop_columns([_KEY])
            yield t.cast(BLOCK_SCHEMA)
        shutil.rmtree(self.dir, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes a stream of block tables into shards of `rows_per_shard` rows.

    Row groups and shard boundaries depend only on row counts, so the same stream gives the same
    bytes.
    """

    def __init__(self, out_dir: Path, rows_per_shard: int, ctx_len: int):
        self.dir = Path(out_dir)
        self.rows_per_shard = rows_per_shard
        # About 4M tokens per row group: large enough to read fast, small enough to hold.
        self.group_rows = max(1, min(rows_per_shard, (1 << 22) // max(1, ctx_len)))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows = 0
        self.shards: list[dict] = []

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._writer = pq.ParquetWriter(str(self.dir / name), BLOCK_SCHEMA, compression="zstd")
        self.shards.append({"file": name, "rows": 0})
        self._shard_rows = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            info = self.shards[-1]
            info["rows"] = self._shard_rows
            info["sha256"] = _sha256(self.dir / info["file"])

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self._pending)
        head, rest = t.slice(0, n), t.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        if self._writer is None:
            self._open()
        self._writer.write_table(head.combine_chunks(), row_group_size=n)
        self._shard_rows += n
        if self._shard_rows == self.rows_per_shard:
            self._close_shard()

    def _next_group(self) -> int:
        room = self.rows_per_shard - (self._shard_rows if self._writer is not None else 0)
        return min(self.group_rows, room)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._next_group():
            self._flush(self._next_group())

    def close(self) -> list[dict]:
        while self._pending_rows:
            self._flush(min(self._pending_rows, self._next_group()))
        self._close_shard()
        return self.shards
