"""Cutting token streams into fixed-length training blocks.

Three layouts:
- per document: a block never mixes documents, as the paper trains; a document shorter than one
  block gives none (unless padded);
- packed: the documents, each ending in EOS, are concatenated and cut regardless of boundaries, so
  nothing is dropped but a document may start anywhere in a block and run on into the next;
- best-fit packed: a long document is cut into its own full blocks from its start, and the short
  documents (and long ones' remainders) are placed whole into the open block they fill best, so no
  document shorter than a block is ever split; blocks that nothing more fits are padded.
A document's (or the packed stream's) last partial block is dropped or padded with attention_mask 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np


def layout_name(pack: bool | str) -> str:
    """How ``data.pack`` lays documents into blocks, in words for reports."""
    return {True: "packed", "best_fit": "best-fit packed"}.get(pack, "per document")


@dataclass(frozen=True)
class TokenSpec:
    """Special tokens around each document, as the model's tokenizer expects them."""

    add_bos: bool
    add_eos: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_adds_bos(tok) -> bool:
    """Whether the tokenizer itself prepends BOS when asked for special tokens."""
    if tok.bos_token_id is None:
        return False
    with_sp = tok("a b", add_special_tokens=True)["input_ids"]
    without = tok("a b", add_special_tokens=False)["input_ids"]
    return len(with_sp) > len(without) and with_sp[0] == tok.bos_token_id


def resolve_token_spec(tok, add_bos: bool | None, add_eos: bool, pack: bool) -> TokenSpec:
    """BOS as the tokenizer does (unless set), EOS after each document (always when packing:
    it is the separator between documents)."""
    bos = tok.bos_token_id
    eos = tok.eos_token_id
    want_bos = tokenizer_adds_bos(tok) if add_bos is None else add_bos
    want_eos = add_eos or pack
    if want_bos and bos is None:
        raise ValueError("data.add_bos is true but the tokenizer has no BOS token")
    if want_eos and eos is None:
        what = "packing needs an EOS separator" if pack else "data.add_eos is true"
        raise ValueError(f"{what}, but the tokenizer has no EOS token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    return TokenSpec(bool(want_bos), bool(want_eos), bos, eos, int(pad))


def vocab_hash(tok) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special token ids."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def frame_document(content: np.ndarray, spec: TokenSpec) -> np.ndarray:
    """The document's ids with BOS/EOS added as the spec says (int32)."""
    parts = []
    if spec.add_bos:
        parts.append(np.array([spec.bos_id], dtype=np.int32))
    parts.append(np.asarray(content, dtype=np.int32))
    if spec.add_eos:
        parts.append(np.array([spec.eos_id], dtype=np.int32))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


@dataclass
class Block:
    input_ids: np.ndarray  # int32 [ctx_len]
    attention_mask: np.ndarray  # int8 [ctx_len]
    doc_id: str
    block_index: int


def _pad(ids: np.ndarray, ctx_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full(ctx_len, pad_id, dtype=np.int32)
    out[: len(ids)] = ids
    mask = np.zeros(ctx_len, dtype=np.int8)
    mask[: len(ids)] = 1
    return out, mask


def cut_document(ids: np.ndarray, doc_id: str, ctx_len: int, tail: str, pad_id: int) -> tuple[list[Block], int]:
    """Consecutive ctx_len blocks of one document, and the number of tail tokens dropped."""
    n_full = len(ids) // ctx_len
    blocks = [
        Block(
            ids[i * ctx_len : (i + 1) * ctx_len].astype(np.int32, copy=True), np.ones(ctx_len, dtype=np.int8), doc_id, i
        )
        for i in range(n_full)
    ]
    rest = len(ids) - n_full * ctx_len
    if rest == 0:
        return blocks, 0
    if tail == "drop":
        return blocks, rest
    ids_p, mask = _pad(ids[n_full * ctx_len :], ctx_len, pad_id)
    blocks.append(Block(ids_p, mask, doc_id, n_full))
    return blocks, 0


_MAX_IDS_IN_NAME = 8


def _block_name(ids: list[str]) -> str:
    """A packed block's doc_id: the documents it holds, 'a+b+c', at most 8 then '+…(n more)'."""
    if len(ids) <= _MAX_IDS_IN_NAME:
        return "+".join(ids)
    return "+".join(ids[:_MAX_IDS_IN_NAME]) + f"+…({len(ids) - _MAX_IDS_IN_NAME} more)"


class Packer:
    """Concatenates framed documents and emits full blocks as they fill.

    A packed block's doc_id names the documents it holds ('a+b+c', at most 8 then '+…');
    block_index counts blocks of the whole packed stream.
    """

    def __init__(self, ctx_len: int, tail: str, pad_id: int):
        self.ctx_len, self.tail, self.pad_id = ctx_len, tail, pad_id
        self._buf: list[np.ndarray] = []
        self._buf_len = 0
        self._ids: list[str] = []  # documents with tokens in the current block
        self._next_index = 0
        self.docs_split = 0  # documents no longer than a block that run across two

    def add(self, doc_id: str, ids: np.ndarray) -> Iterator[Block]:
        pos = 0
        n = len(ids)
        if n <= self.ctx_len < self._buf_len + n:
            self.docs_split += 1
        while pos < n:
            if not self._ids or self._ids[-1] != doc_id:
                self._ids.append(doc_id)
            take = min(n - pos, self.ctx_len - self._buf_len)
            self._buf.append(ids[pos : pos + take])
            self._buf_len += take
            pos += take
            if self._buf_len == self.ctx_len:
                block = np.concatenate(self._buf).astype(np.int32, copy=False)
                yield Block(block, np.ones(self.ctx_len, dtype=np.int8), _block_name(self._ids), self._next_index)
                self._next_index += 1
                self._buf, self._buf_len, self._ids = [], 0, []

    def finish(self) -> tuple[list[Block], int]:
        """The last partial block (padded) or the number of tokens dropped."""
        if self._buf_len == 0:
            return [], 0
        rest = self._buf_len
        ids = np.concatenate(self._buf)
        name = _block_name(self._ids)
        self._buf, self._buf_len, self._ids = [], 0, []
        if self.tail == "drop":
            return [], rest
        ids_p, mask = _pad(ids, self.ctx_len, self.pad_id)
        block = Block(ids_p, mask, name, self._next_index)
        self._next_index += 1
        return [block], 0


@dataclass(eq=False)  # identity: list.remove must not compare the arrays
class _OpenBlock:
    parts: list[np.ndarray]
    ids: list[str]
    used: int


class BestFitPacker:
    """Packs whole documents into blocks (``data.pack: best_fit``), emitting blocks as they fill.

    Plain packing cuts the concatenated stream, so most short documents straddle two blocks and a
    block's tokens see, on average, far less of their own document than cutting per document gives
    (research/LOG.md#packing-context). Here a document of ctx_len tokens or more gives its own full
    blocks from its start, as per document; what is left of it, and every shorter document, goes
    whole into the open block whose free space it fills most tightly (best fit). A piece that fits
    no open block opens a new one; with ``max_open`` blocks already open, the fullest is first
    closed, padded. No token is dropped: ``finish`` pads the blocks still open.
    """

    def __init__(self, ctx_len: int, pad_id: int, max_open: int = 64):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, not {max_open}")
        self.ctx_len, self.pad_id, self.max_open = ctx_len, pad_id, max_open
        # in the order they were opened: min() takes the oldest of equal fits, finish() pads oldest first
        self._open: list[_OpenBlock] = []
        self._next_index = 0
        self.docs_split = 0  # as Packer counts it: none, by construction

    def add(self, doc_id: str, ids: np.ndarray) -> Iterator[Block]:
        n_full = len(ids) // self.ctx_len
        for i in range(n_full):
            piece = ids[i * self.ctx_len : (i + 1) * self.ctx_len]
            yield self._emit(_OpenBlock([piece], [doc_id], self.ctx_len))
        rest = ids[n_full * self.ctx_len :]
        if len(rest):
            yield from self._place(doc_id, rest)

    def finish(self) -> tuple[list[Block], int]:
        """The blocks still open, padded, oldest first; nothing is dropped."""
        left, self._open = self._open, []
        return [self._emit(b) for b in left], 0

    def _place(self, doc_id: str, piece: np.ndarray) -> Iterator[Block]:
        fits = [b for b in self._open if self.ctx_len - b.used >= len(piece)]
        if fits:
            target = min(fits, key=lambda b: self.ctx_len - b.used)
        else:
            if len(self._open) >= self.max_open:
                fullest = min(self._open, key=lambda b: self.ctx_len - b.used)
                self._open.remove(fullest)
                yield self._emit(fullest)
            target = _OpenBlock([], [], 0)
            self._open.append(target)
        target.parts.append(piece)
        target.ids.append(doc_id)
        target.used += len(piece)
        if target.used == self.ctx_len:
            self._open.remove(target)
            yield self._emit(target)

    def _emit(self, b: _OpenBlock) -> Block:
        ids = np.concatenate(b.parts).astype(np.int32, copy=False)
        if b.used < self.ctx_len:
            ids, mask = _pad(ids, self.ctx_len, self.pad_id)
        else:
            mask = np.ones(self.ctx_len, dtype=np.int8)
        block = Block(ids, mask, _block_name(b.ids), self._next_index)
        self._next_index += 1
        return block
