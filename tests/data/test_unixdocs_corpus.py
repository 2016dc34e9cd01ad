"""scripts/build_unixdocs_corpus.py on a fake man tree and include directory: what it keeps, what it
leaves out (counted by reason), and that nothing about Python reaches the corpus."""

from __future__ import annotations

import json
import lzma
import random
import sys

from tests.scripts import load_script


def _tree(tmp_path, rng):
    man = tmp_path / "man"
    (man / "man1").mkdir(parents=True)
    (man / "man3").mkdir()
    inc = tmp_path / "include"
    inc.mkdir()
    n_gcloud = rng.randrange(5, 12)
    pages = {f"man1/gcloud_cmd{i}.1.gz": "gcloud command" for i in range(n_gcloud)}
    pages.update(
        {
            "man1/ls.1.gz": "list directory contents",
            "man3/printf.3.gz": "formatted output",
            "man1/python3.11.1.gz": "an interpreter",
            "man1/pydoc.1.gz": "docs",
            "man3/embed.3.gz": "python python python embedding",
        }
    )
    for name, what in pages.items():
        (man / name).write_text(what)
    (man / "man1" / "dir.1.gz").symlink_to(man / "man1" / "ls.1.gz")
    (inc / "stdio.h").write_text("int printf(const char *fmt, ...);\n" * 20)
    (inc / "Python.h").write_text("#include <pyconfig.h>\n")
    (inc / "huge.h").write_text("x" * 5000)
    return man, inc, n_gcloud


def test_corpus_keeps_varied_docs_and_counts_every_exclusion(tmp_path, monkeypatch, capsys):
    mod = load_script("scripts/build_unixdocs_corpus.py")
    rng = random.Random()
    man, inc, n_gcloud = _tree(tmp_path, rng)
    per_family = rng.randrange(1, 4)
    monkeypatch.setattr(mod, "MAN_ROOT", man)
    monkeypatch.setattr(mod, "HEADER_DIRS", (inc,))
    # `man` is not on every CI image: render the fake page's own text, padded past the 200-char floor
    monkeypatch.setattr(mod, "render", lambda p: f"{p.name}\n" + (p.read_text() + " ") * 40)
    out = tmp_path / "u.jsonl.xz"
    monkeypatch.setattr(
        sys,
        "argv",
        ["build", "--out", str(out), "--per-family", str(per_family), "--max-header-bytes", "1000", "--workers", "2"],
    )
    mod.main()
    summary = json.loads(capsys.readouterr().out)
    with lzma.open(out, "rt") as f:
        docs = [json.loads(line) for line in f]
    ids = {d["id"] for d in docs}
    assert sum(i.startswith("man/man1/gcloud_") for i in ids) == min(per_family, n_gcloud)
    assert {"man/man1/ls.1.gz", "man/man3/printf.3.gz", "include/stdio.h"} <= ids
    assert not any("python" in d["text"].lower() or "pydoc" in d["id"] for d in docs)
    sk = summary["skipped"]
    assert sk["man page named after Python"] == 2 and sk["header named after Python"] == 1
    assert sk["man page text mentions Python > 2 times"] == 1 and sk["man page alias (symlink)"] == 1
    assert sk["man page over the per-family cap"] == n_gcloud - min(per_family, n_gcloud)
    assert sk["header over 1000 bytes"] == 1
    assert summary["documents"] == len(docs) and summary["by_kind"] == {"man": len(docs) - 1, "c-header": 1}
