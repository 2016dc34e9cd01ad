"""The Ray Data dataset of preprocessing: read tasks that open one input file each and emit its
documents (bad ones as skip records), then a pool of `TokenizeCut` actors.

The driver iterates the dataset inside `data_context`, which keeps Ray's output order: the order
of the blocks is part of the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from linearard_ray.config import DataConfig
from linearard_ray.data.blocks import TokenSpec
from linearard_ray.data.sources import Decoding, InputFile, iter_documents
from linearard_ray.data.tokenization import TokenizeCut

if TYPE_CHECKING:
    import ray.data

__all__ = ["build_dataset", "data_context"]

_READ_BATCH_DOCS = 64
_READ_BATCH_BYTES = 16 << 20
# Read tasks are light (I/O, JSON); a CPU share unlike the actors' keeps Ray from fusing reading
# into the tokenizer actors, so the pool balances batches of documents, not whole files.
_READ_CPUS = 0.25
_READ_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("text", pa.large_string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("n_docs", pa.int64()),
        pa.field("replaced", pa.int64()),
    ]
)


def _read_files(
    batch: dict[str, np.ndarray], items: list[InputFile], text_column: str, decoding: Decoding
) -> Iterator[pa.Table]:
    """Read task: the documents of the input files whose indices are in the batch."""
    rows: dict[str, list] = {k: [] for k in _READ_SCHEMA.names}
    size = 0
    for i in batch["id"]:
        for doc in iter_documents(items[int(i)], text_column, decoding):
            rows["doc_id"].append(doc.doc_id)
            rows["text"].append(doc.text)
            rows["reason"].append(doc.reason)
            rows["detail"].append(doc.detail)
            rows["n_docs"].append(doc.n_docs)
            rows["replaced"].append(doc.replaced)
            size += len(doc.text or "")
            if len(rows["doc_id"]) >= _READ_BATCH_DOCS or size >= _READ_BATCH_BYTES:
                yield pa.table(rows, schema=_READ_SCHEMA)
                rows = {k: [] for k in _READ_SCHEMA.names}
                size = 0
    if rows["doc_id"]:
        yield pa.table(rows, schema=_READ_SCHEMA)


def _actor_cpus(n_actors: int) -> float:
    """CPUs per tokenizer actor: at most 1, leaving one CPU for the read tasks (on a 2-core
    machine a pool that takes every CPU starves the reads)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.25, min(1.0, (total - 1.0) / n_actors)) if total > 1 else 0.5


@contextmanager
def data_context(progress: bool):
    """Ray Data's context set for preprocessing (output order kept, progress bars as asked),
    restored on exit."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.execution_options.preserve_order = True  # the output order is part of the result
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def build_dataset(items: list[InputFile], data_cfg: DataConfig, tokenizer: dict, spec: TokenSpec) -> ray.data.Dataset:
    """The stream of `TokenizeCut` tables for the readable input files `items`; `tokenizer` is a
    `tokenizer_payload`."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ds = ray.data.range(len(items), override_num_blocks=len(items))
    n = data_cfg.tokenizer_actors
    actor_cpus = _actor_cpus(n)
    read_cpus = _READ_CPUS if actor_cpus != _READ_CPUS else _READ_CPUS * 0.8
    ds = ds.map_batches(
        _read_files,
        batch_size=1,
        batch_format="numpy",
        num_cpus=read_cpus,
        fn_kwargs={
            "items": items,
            "text_column": data_cfg.text_column,
            "decoding": Decoding(data_cfg.encoding, data_cfg.encoding_errors),
        },
    )
    return ds.map_batches(
        TokenizeCut,
        batch_size=data_cfg.tokenizer_batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=n),
        num_cpus=actor_cpus,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "spec": spec.to_dict(),
            "ctx_len": data_cfg.ctx_len,
            "tail": data_cfg.tail,
            "min_doc_tokens": data_cfg.min_doc_tokens,
            "pack": data_cfg.pack,
        },
    )
