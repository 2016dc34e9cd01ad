"""Genre corpora from unpacked Debian package trees (synthetic here: no apt, no network): reproducible
files and sha256s, counts, Austen left out, duplicates dropped, the seeded split, the manifest; the
overlap report; genre: sources in training and evaluation, with the error for a genre not built."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from linearard_ray.config.evaluation import EVAL_PRESETS
from linearard_ray.data import genres as G
from linearard_ray.evaluation.texts import bos_prefix, make_windows
from linearard_ray.models.loading import COMPLETE_MARKER, load_tokenizer
from linearard_ray.models.tiny import default_cache_dir
from tests.scripts import load_script

FORTUNES = "\n%\n".join(
    [
        "A fool and his money are soon parted.",
        "It is a truth universally acknowledged...\n\t\t-- Jane Austen",
        "Q: Why did the chicken cross the road?\nA: To get to the other side.",
        "A fool and his money are soon parted.",  # a duplicate
    ]
    + [f"Cookie number {k}: every cloud has a silver lining, said person {k}." for k in range(40)]
)


AZTEC_RULESET = r"""[nation_aztec]

name=_("Aztec")
groups="Medieval", "American", "Core"
legend=_("The Azteca, a Nahuatl speaking people from the Sonoran desert,\
 seized control of Central Mexico during the 15th century. They called\
 their capital \"Tenochtitlan\".\nCortés conquered it in 1521.")

leaders = {
 "name",                        "sex"
 "Itzcoatl",                    "Male"
}
"""
# Legends that are not history: a game device and an imaginary nation, left out of the history genre.
PIRATE_RULESET = r"""[nation_pirate]
name=_("Pirate")
legend=_("As long as honest men have sailed the seas, pirates have been a\
 scourge of them.")
barbarian_type = "Sea"
"""
HACKER_RULESET = r"""[nation_hacker]
groups="Imaginary"
legend=_("h4xx0r r0xx0rz!")
"""


def _trees(tmp_path: Path) -> Path:
    """<package>_<version>/ trees as dpkg-deb -x writes them, for the fortunes, legal and history genres."""
    root = tmp_path / "unpacked"
    f = root / "fortunes_1%3a1.99.1-7.3" / G.FORTUNE_DIR
    f.mkdir(parents=True)
    (f / "wisdom").write_text(FORTUNES)
    (f / "wisdom.u8").write_text(FORTUNES)  # the UTF-8 copy is the one read
    (f / "wisdom.dat").write_bytes(b"\x00\x01")
    m = root / "fortunes-min_1%3a1.99.1-7.3" / G.FORTUNE_DIR
    m.mkdir(parents=True)
    (m / "riddles").write_text("What has keys but opens no lock?\n%\nA fool and his money are soon parted.\n")
    lic = root / "base-files_12.4" / "usr/share/common-licenses"
    lic.mkdir(parents=True)
    (lic / "GPL-3").write_text("The licenses for most software are designed to take away your freedom. " * 20)
    (lic / "GPL").symlink_to("GPL-3")  # an alias, read once
    (lic / "Austen-notes").write_text("Notes on Pride and Prejudice.")
    doc = root / "doc-debian_11.3" / "usr/share/doc/debian"
    doc.mkdir(parents=True)
    (doc / "constitution.txt.gz").write_bytes(gzip.compress(b"The Debian Project is an association of individuals."))
    (doc / "social-contract.txt.gz").write_bytes(gzip.compress(b"Debian will remain 100% free."))
    (doc / "bug-reporting.txt.gz").write_bytes(gzip.compress(b"not part of the legal genre"))
    hist = root / "debian-history_2.28" / "usr/share/doc/debian-history/docs"
    hist.mkdir(parents=True)
    (hist / "project-history.en.txt.gz").write_bytes(gzip.compress(b"Debian was begun in August 1993 by Ian Murdock."))
    nations = root / "freeciv-data_3.0.6-1+deb12u1" / G.NATION_DIR
    nations.mkdir(parents=True)
    (nations / "aztec.ruleset").write_text(AZTEC_RULESET)
    (nations / "pirate.ruleset").write_text(PIRATE_RULESET)
    (nations / "hacker.ruleset").write_text(HACKER_RULESET)
    return root


def _build(tmp_path: Path, out: str = "out", names=("fortunes", "legal", "history")) -> dict:
    unpacked = tmp_path / "unpacked"
    trees = G.trees_from_dir(unpacked if unpacked.exists() else _trees(tmp_path))
    return G.build_genres(list(names), trees, tmp_path / out, seed=0)


def test_build_is_reproducible_counted_and_filtered(tmp_path):
    first = _build(tmp_path, "a")
    second = _build(tmp_path, "b")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)  # same files, counts, sha256s
    fortunes = first["genres"]["fortunes"]
    assert fortunes["dropped"] == {"austen": 1, "duplicates": 2, "empty": 0}  # the quip twice in fortunes-min too
    assert fortunes["count_unit"] == "characters and words"
    src = {s["package"]: s for s in fortunes["sources"]}
    assert src["fortunes"]["version"] == "1:1.99.1-7.3"
    for s in fortunes["sources"]:
        for part, f in s["files"].items():
            path = tmp_path / "a" / "fortunes" / f["path"]
            assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            docs = list(G.read_documents(path))
            assert f["documents"] == len(docs)
            assert f["characters"] == sum(len(d["text"]) for d in docs)
            assert all("Austen" not in d["text"] for d in docs)
            assert path.name.startswith(f"{s['package']}_1%3a1.99.1-7.3") and path.parent.name == part
    legal = first["genres"]["legal"]
    assert legal["dropped"]["austen"] == 1
    legal_docs = list(G.iter_genre_documents("genre:legal", tmp_path / "a"))
    assert sorted(d["id"] for d in legal_docs) == [
        "usr/share/common-licenses/GPL-3",
        "usr/share/doc/debian/constitution.txt.gz",
        "usr/share/doc/debian/social-contract.txt.gz",
    ]
    manifest = json.loads((tmp_path / "a" / "legal" / "manifest.json").read_text())
    assert manifest["role"] == "eval" and manifest["parts"] == ["eval"]
    assert manifest["totals"]["eval"]["documents"] == 3
    history = {d["id"]: d["text"] for d in G.iter_genre_documents("genre:history", tmp_path / "a")}
    assert set(history) == {"nation/aztec", "usr/share/doc/debian-history/docs/project-history.en.txt.gz"}
    assert [s["package"] for s in first["genres"]["history"]["sources"]] == ["debian-history", "freeciv-data"]


def test_nation_legends_are_read_unescaped_without_the_barbarians(tmp_path):
    assert G.ruleset_legend(AZTEC_RULESET) == (
        "The Azteca, a Nahuatl speaking people from the Sonoran desert, seized control of Central "
        'Mexico during the 15th century. They called their capital "Tenochtitlan".\nCortés conquered it in 1521.'
    )
    assert G.ruleset_legend('[nation_x]\nname=_("X")\n') is None
    docs = list(G.read_nation_legends(_trees(tmp_path) / "freeciv-data_3.0.6-1+deb12u1", {}))
    assert [doc_id for doc_id, _ in docs] == ["nation/aztec"]  # the pirates are a game device, hackers a joke


def test_training_genres_split_by_document_with_a_seed():
    ids = [f"doc/{k}" for k in range(2000)]
    parts = [G.split_part(i, 0, 0.1) for i in ids]
    assert 150 < parts.count("heldout") < 250
    assert parts == [G.split_part(i, 0, 0.1) for i in reversed(ids)][::-1]  # order does not matter
    assert parts != [G.split_part(i, 1, 0.1) for i in ids]  # the seed does


def test_chunks_join_consecutive_documents_of_one_group():
    docs = [("a/1", "x" * 10), ("a/2", "y" * 10), ("a/3", "z" * 10), ("b/1", "w")]
    assert G.chunk_documents(docs, 25) == [("a/1", "x" * 10 + "\n\n" + "y" * 10), ("a/3", "z" * 10), ("b/1", "w")]


def test_bible_output_becomes_chapters_in_canonical_order():
    out = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\nRev22:21 The grace. Amen.\n"
    assert G.bible_chapters(out) == [
        ("01-Ge/001", "In the beginning.\nAnd the earth."),
        ("01-Ge/002", "Thus the heavens."),
        ("02-Rev/022", "The grace. Amen."),
    ]


def test_jargon_entries_split_on_indented_headwords():
    text = "   :foo: n.\n\n   A metasyntactic variable.\n\n   :bar: n.\n\n   See {foo}.\n"
    assert [e.split(":")[1] for e in G.split_jargon(text)] == ["foo", "bar"]


def test_overlap_share_of_shared_shingles():
    train = " ".join(f"w{k}" for k in range(100))
    copied = " ".join(f"w{k}" for k in range(50, 75))  # 25 words: 13 shingles, every one in train
    fresh = " ".join(f"v{k}" for k in range(25))  # 13 shingles, none in train
    r = G.overlap_report([train], {"copy": [copied], "mixed": [copied + " " + fresh], "fresh": [fresh]}, limit=0.3)
    assert r["domains"]["copy"] == {"shingles": 13, "shared": 13, "share": 1.0, "flagged": True}
    assert r["domains"]["fresh"]["share"] == 0.0
    mixed = r["domains"]["mixed"]  # 50 words: 38 shingles, 13 of them copied
    assert (mixed["shingles"], mixed["shared"]) == (38, 13)
    assert r["flagged"] == ["copy", "mixed"]
    assert G.shingles("Too few words here") == set()


def test_build_reports_overlap_between_training_mix_and_evaluation_genres(tmp_path):
    summary = _build(tmp_path)
    ov = summary["overlap"]
    assert ov["training_mix"] == ["fortunes"] and set(ov["domains"]) == {"legal", "history"}
    assert json.loads((tmp_path / "out" / "build.json").read_text())["overlap"] == ov


def test_script_builds_from_unpacked_trees_and_fails_over_the_overlap_limit(tmp_path, capsys):
    script = load_script("scripts/build_genre_corpora.py")
    root = _trees(tmp_path)
    # an evaluation genre copied from the training text: fortunes' cookies as the history
    hist = root / "debian-history_2.28" / "usr/share/doc/debian-history/docs/project-history.en.txt.gz"
    copied = " ".join(f"Cookie number {k}: every cloud has a silver lining, said person {k}." for k in range(40))
    hist.write_bytes(gzip.compress(copied.encode()))
    args = ["--from-dir", str(root), "--out", str(tmp_path / "g"), "--tokenizer", "none"]
    assert script.main([*args, "--genres", "fortunes,history"]) == 1
    assert "history" in capsys.readouterr().err
    assert script.main([*args, "--genres", "fortunes,history", "--allow-overlap"]) == 0


def _teacher_genre(tmp_path: Path, out: Path) -> dict:
    samples = tmp_path / "samples.jsonl.xz"
    with lzma.open(samples, "wt") as f:
        for k in range(100):
            f.write(json.dumps({"id": k, "text": f"sampled text {k}"}) + "\n")
    m = G.build_genre(G.genre("teacher"), {}, out, samples_file=samples)
    assert m["sources"][0]["sha256"] == hashlib.sha256(samples.read_bytes()).hexdigest()
    return m


def test_teacher_samples_are_a_genre(tmp_path):
    m = _teacher_genre(tmp_path, tmp_path / "g")
    files = m["sources"][0]["files"]
    assert files["train"]["documents"] + files["heldout"]["documents"] == 100
    assert 0 < files["heldout"]["documents"] < 30


def test_genre_sources_resolve_and_refuse_what_they_must(tmp_path, monkeypatch):
    from linearard_ray.data.sources import DataError, iter_documents, resolve_source
    from linearard_ray.evaluation.texts import TextsError, check_source, load_documents

    monkeypatch.setenv("LINEARARD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"not been built.*build_genre_corpora.py \(every genre at once"):
        resolve_source(0, "genre:legal", field="train.eval_sources")
    with pytest.raises(TextsError, match=r"build_genre_corpora.py \(every genre at once"):
        check_source("genre:history")
    _build(tmp_path, "cache/genres")
    _teacher_genre(tmp_path, tmp_path / "cache/genres")
    items = resolve_source(0, "genre:teacher")
    assert {it.source for it in items} == {"genre:teacher"} and all("/train/" in it.uri for it in items)
    texts = [d.text for it in items for d in iter_documents(it)]
    heldout = load_documents(["genre:teacher/heldout"]).documents
    assert heldout and len(texts) + len(heldout) == 100
    assert not {d.text for d in heldout} & set(texts)  # the held-out part is not in genre:teacher
    with pytest.raises(DataError, match="held-out evaluation genre"):
        resolve_source(0, "genre:legal", field="data.sources")
    assert len(load_documents(["genre:legal"]).documents) == 3
    with pytest.raises(DataError, match="has parts train, heldout"):
        resolve_source(0, "genre:fortunes/eval")
    with pytest.raises(DataError, match="unknown genre"):
        resolve_source(0, "genre:novels")


def test_registry_keeps_training_and_evaluation_packages_apart():
    assert not G.training_packages() & G.evaluation_packages()
    assert len([g for g in G.GENRES.values() if g.role == "eval"]) >= 3


# The corpora and tokenizer of this machine's set-up, read at collection: the cache_dir fixture later
# points LINEARARD_CACHE at a temporary cache for the whole session.
BUILT_GENRES = G.genres_root()
MODEL_CACHE = default_cache_dir()


def _study_tokenizer():
    """The SmolLM2-135M tokenizer if it is in this machine's model cache (tests never download)."""
    model_dir = MODEL_CACHE / "models" / "smollm2-135m"
    if not (model_dir / COMPLETE_MARKER).exists():
        pytest.skip(f"smollm2-135m is not in {MODEL_CACHE}: the study preset's windows cannot be counted")
    return load_tokenizer(str(model_dir))


def test_every_study_domain_holds_the_windows_the_study_preset_asks_for():
    study = EVAL_PRESETS["study"]
    genres = [G.parse_genre(s)[0] for sources in study["domains"].values() for s in sources]
    assert genres and all(g.role == "eval" for g in genres)  # the study judges text no recipe trains on
    missing = [g.name for g in genres if not (BUILT_GENRES / g.name / "manifest.json").is_file()]
    if missing:
        pytest.skip(f"genres {', '.join(missing)} not built under {BUILT_GENRES}: {G.BUILD_COMMAND}")
    tok = _study_tokenizer()
    for domain, sources in study["domains"].items():
        docs = [d for s in sources for d in G.iter_genre_documents(s, BUILT_GENRES)]
        token_docs = [np.asarray(tok(d["text"], add_special_tokens=False)["input_ids"]) for d in docs]
        ids = [d["id"] for d in docs]
        for length, wanted in study["windows_by_length"].items():
            ws = make_windows(token_docs, ids, length, wanted, 0, bos_prefix(tok), tok.eos_token_id)
            assert ws.n == wanted, f"{domain}: {ws.n} windows of {length} tokens, the study preset asks for {wanted}"
