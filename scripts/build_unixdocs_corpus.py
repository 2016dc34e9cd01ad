"""Build a ``unixdocs`` training corpus from what a Debian/Ubuntu machine has installed: man pages
(sections 1-8, English, rendered to plain text by ``man``) and C headers from ``/usr/include``.

    python scripts/build_unixdocs_corpus.py --out /tmp/unixdocs.jsonl.xz

It is technical text of the same *genre* as the evaluation's second domain (documentation and
code) but none of its text: pages and headers that mention Python in their name are left out, and
so are pages whose text mentions it more than twice. The restoration study (research/README.md)
uses it to ask whether the unseen-domain gap is a gap of genre. The output is one JSON line per document,
{"id", "kind", "text"}; what was left out is counted by reason and printed, with the sha256 of the
output, so a rebuild on another machine can be compared. The file depends on the packages
installed, so it is built where it is used rather than shipped.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import json
import lzma
import os
import random
import re
import subprocess
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
HEADER_DIRS = (Path("/usr/include"), Path("/usr/include/linux"))
PYTHON = re.compile(r"python|^py", re.IGNORECASE)


def _family(name: str) -> str:
    # gcloud alone has ~16K near-identical pages; a cap per leading word keeps the corpus varied.
    return re.split(r"[_.\-]", name, maxsplit=1)[0].lower()


def man_pages(per_family: int, rng: random.Random, skipped: collections.Counter) -> list[Path]:
    by_family: dict[str, list[Path]] = collections.defaultdict(list)
    for section in range(1, 9):
        d = MAN_ROOT / f"man{section}"
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if PYTHON.search(p.name):
                skipped["man page named after Python"] += 1
            elif p.is_symlink():
                skipped["man page alias (symlink)"] += 1
            else:
                by_family[_family(p.name)].append(p)
    picked = []
    for fam in sorted(by_family):
        pages = by_family[fam]
        rng.shuffle(pages)
        picked += pages[:per_family]
        skipped["man page over the per-family cap"] += max(0, len(pages) - per_family)
    return picked


def render(page: Path) -> str:
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0")
    out = subprocess.run(["man", "-l", str(page)], env=env, capture_output=True, timeout=60)
    text = subprocess.run(["col", "-bx"], input=out.stdout, capture_output=True).stdout
    return text.decode("utf-8", "replace")


def headers(skipped: collections.Counter, max_bytes: int) -> list[Path]:
    found = []
    for d in HEADER_DIRS:
        for p in sorted(d.glob("*.h")):
            if PYTHON.search(p.name):
                skipped["header named after Python"] += 1
            elif p.stat().st_size > max_bytes:
                skipped[f"header over {max_bytes} bytes"] += 1
            else:
                found.append(p)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output .jsonl.xz")
    ap.add_argument("--per-family", type=int, default=6, help="man pages kept per leading word of the name")
    ap.add_argument("--max-chars", type=int, default=14_000_000, help="stop adding documents past this many characters")
    ap.add_argument("--max-header-bytes", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    skipped: collections.Counter = collections.Counter()
    pages = man_pages(args.per_family, rng, skipped)
    with cf.ThreadPoolExecutor(args.workers) as ex:
        rendered = list(ex.map(render, pages))
    docs = []
    for page, text in zip(pages, rendered, strict=False):
        if len(text.strip()) < 200:
            skipped["man page rendered to < 200 characters"] += 1
        elif len(PYTHON.findall(text)) > 2:
            skipped["man page text mentions Python > 2 times"] += 1
        else:
            docs.append({"id": f"man/{page.parent.name}/{page.name}", "kind": "man", "text": text})
    for h in headers(skipped, args.max_header_bytes):
        text = h.read_text("utf-8", "replace")
        if len(PYTHON.findall(text)) > 2:
            skipped["header text mentions Python > 2 times"] += 1
        else:
            rel = h.relative_to(HEADER_DIRS[0]) if h.is_relative_to(HEADER_DIRS[0]) else h.name
            docs.append({"id": f"include/{rel}", "kind": "c-header", "text": text})

    rng.shuffle(docs)
    kept, chars = [], 0
    for d in docs:
        if chars >= args.max_chars:
            skipped["over --max-chars"] += 1
            continue
        kept.append(d)
        chars += len(d["text"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt", encoding="utf-8") as f:
        for d in kept:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    kinds = collections.Counter(d["kind"] for d in kept)
    print(
        json.dumps(
            {
                "out": str(out),
                "documents": len(kept),
                "by_kind": kinds,
                "characters": chars,
                "skipped": dict(sorted(skipped.items())),
                "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
