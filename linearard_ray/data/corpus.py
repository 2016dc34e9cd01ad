"""The embedded corpus: 233 State of the Union addresses (public domain), shipped compressed.

Splits: ``train`` 1790–1989, ``eval`` 1990–2016, ``extra`` 2017–2021. Referred to in configs as
``builtin:sotu/<split>`` (``builtin:sotu`` = every split).
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from importlib import resources

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "eval", "extra")


def sotu_path() -> str:
    return str(resources.files("linearard_ray") / "assets" / "sotu.jsonl.xz")


def iter_sotu(split: str | None = None) -> Iterator[dict]:
    """Yield {'id', 'year', 'president', 'party', 'split', 'text'} in chronological order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown SOTU split {split!r}; choose one of {SPLITS}")
    with lzma.open(sotu_path(), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if split is None or row["split"] == split:
                yield row


def is_builtin(source: str) -> bool:
    return source.startswith(BUILTIN_PREFIX)


def check_builtin(source: str) -> None:
    """ValueError unless ``source`` names a built-in corpus and one of its splits; reads nothing,
    so configs can be checked before any worker starts."""
    corpus, _, split = source[len(BUILTIN_PREFIX) :].partition("/")
    splits = {"sotu": SPLITS, "pydocs": PYDOCS_SECTIONS}.get(corpus)
    if splits is None:
        raise ValueError(
            f"unknown built-in corpus {source!r}; available: builtin:sotu[/train|/eval|/extra], "
            f"builtin:pydocs[/{'|/'.join(PYDOCS_SECTIONS)}]"
        )
    if split and split not in splits:
        raise ValueError(f"{source!r}: unknown {corpus} split {split!r}; choose one of {splits}")


def iter_builtin(source: str) -> Iterator[dict]:
    """Documents of a ``builtin:`` source."""
    check_builtin(source)
    corpus, _, split = source[len(BUILTIN_PREFIX) :].partition("/")
    if corpus == "pydocs":
        return iter_pydocs(split or None)
    return iter_sotu(split or None)


# Second, out-of-training domain: Python 3.11 documentation pages as plain text (PSF licence,
# assets/pydocs.LICENSE.txt; built by scripts/build_pydocs_asset.py). Splits are doc sections.
PYDOCS_SECTIONS = ("tutorial", "howto", "faq", "reference", "library")


def iter_pydocs(section: str | None = None) -> Iterator[dict]:
    """Yield {'id', 'section', 'title', 'text'}, one per documentation page."""
    if section is not None and section not in PYDOCS_SECTIONS:
        raise ValueError(f"unknown pydocs section {section!r}; choose one of {PYDOCS_SECTIONS}")
    path = resources.files("linearard_ray") / "assets" / "pydocs.jsonl.xz"
    with lzma.open(str(path), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if section is None or row["section"] == section:
                yield row
