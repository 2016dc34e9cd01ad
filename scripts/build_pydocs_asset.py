"""Build ``linearard_ray/assets/pydocs.jsonl.xz`` (the ``builtin:pydocs`` corpus) from Debian's
``python3.11-doc`` package: one plain-text document per HTML page of the tutorial, the HOWTOs,
the FAQ, the language reference and the library reference.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb x
    python scripts/build_pydocs_asset.py x/usr/share/doc/python3.11/html

It is a text of another kind than the State of the Union addresses (technical prose with code),
used as the second, out-of-training domain of the evaluation. Licence: PSF License Agreement for
the documentation, Zero-Clause BSD for its code examples (see assets/pydocs.LICENSE.txt).
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
from html.parser import HTMLParser
from pathlib import Path

SECTIONS = ("tutorial", "howto", "faq", "reference", "library")
BLOCK = {
    "p",
    "div",
    "section",
    "li",
    "dt",
    "dd",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "tr",
    "table",
    "ul",
    "ol",
    "dl",
    "blockquote",
    "pre",
    "br",
    "hr",
    "figure",
    "caption",
}


class _BodyText(HTMLParser):
    """Text of the Sphinx ``<div class="body" role="main">``; ``<pre>`` keeps its layout."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # div nesting inside the body; 0 = outside
        self.skip = 0  # inside <script>/<style>
        self.skip_link = False  # inside a "¶" header link
        self.pre = 0
        self.out: list[str] = []
        self.title = ""
        self._in_h1 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style"):
            self.skip += 1
        if tag == "a" and "headerlink" in (a.get("class") or ""):
            self.skip_link = True
        if tag == "pre":
            self.pre += 1
            self.out.append("\n")
        if tag == "h1":
            self._in_h1 = True
        if tag == "li":
            self.out.append("\n- ")
        elif tag in BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag == "div":
            self.depth -= 1
        if tag in ("script", "style") and self.skip:
            self.skip -= 1
        if tag == "a":
            self.skip_link = False
        if tag == "pre":
            self.pre -= 1
        if tag == "h1":
            self._in_h1 = False
        if tag in BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.depth == 0 or self.skip or self.skip_link:
            return
        if self._in_h1:
            self.title += data
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        raw = "".join(self.out)
        lines = [ln.rstrip() for ln in raw.split("\n")]
        # Collapse runs of blank lines; strip leading spaces outside code (they come from inline joins).
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        return text


def page_text(path: Path) -> tuple[str, str]:
    p = _BodyText()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    return p.title.strip(), p.text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html_dir", help=".../usr/share/doc/python3.11/html")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "linearard_ray" / "assets" / "pydocs.jsonl.xz")
    )
    ap.add_argument("--min-chars", type=int, default=2000, help="pages shorter than this (indexes, stubs) are left out")
    args = ap.parse_args()
    root = Path(args.html_dir)
    rows, dropped = [], 0
    for sec in SECTIONS:
        for f in sorted((root / sec).glob("*.html")):
            title, text = page_text(f)
            if len(text) < args.min_chars:
                dropped += 1
                continue
            rows.append(
                {"id": f"{sec}/{f.stem}", "section": sec, "title": title.replace("¶", "").strip(), "text": text}
            )
    with lzma.open(args.out, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    chars = sum(len(r["text"]) for r in rows)
    print(f"{len(rows)} pages ({chars / 1e6:.1f} M chars) -> {args.out}; {dropped} short pages left out")


if __name__ == "__main__":
    main()
