"""Named text genres built from Debian packages, for training mixes and for held-out evaluation.

A genre is read from one or more packages, unpacked (``dpkg-deb -x``) at set-up by
``scripts/build_genre_corpora.py``, and written to the cache reproducibly: documents sorted by id,
duplicates dropped, anything by or about Jane Austen left out (her novels are kept for checks
independent of this project), and a seeded split by document. Sources in configs name a built
genre as ``genre:<name>[/<part>]``.

Two disjoint sets of packages (``GENRES``, role ``train`` or ``eval``):

- training genres (scripture, fortunes, lexicon, and text sampled from the teacher) are split by
  document into ``train`` (what ``genre:<name>`` means) and ``heldout`` (``genre:<name>/heldout``);
- evaluation genres (legal, standards, history) are held out whole: every document is in part
  ``eval`` and no training source may name them (``data.sources`` refuses them).

The sides differ in register on purpose: the training side is archaic narrative, quips and
dialogue, glossary entries and the teacher's own prose; the evaluation side is modern expository
text (licences and a constitution, normative specifications, histories of a project and of
peoples) that none of the training packages holds. ``overlap_report`` measures how much of each
evaluation genre's text the training mix contains anyway (shared 13-word shingles).

Each evaluation genre must hold enough text for the ``study`` evaluation preset (24 windows of 2048
tokens need about 49K tokens; every genre has over 60K). A Brief History of Debian alone is 18K, so
``history`` adds the legends of Freeciv's nations: a few sentences each of a people's or state's
history in modern encyclopaedic prose, the only other narrative history found in Debian's main
archive. Both are past-tense accounts of events, unlike the normative and legal genres, and neither
shares a 13-word shingle with the training mix.

Layout: ``<root>/<name>/<part>/<package>_<version>.jsonl.xz`` (JSON lines ``{"id", "text"}``) and
``<root>/<name>/manifest.json`` (packages, versions, counts and sha256 of every file), where
``<root>`` is ``$LINEARARD_CACHE/genres`` (default ``~/.cache/linearard_ray/genres``).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

GENRE_PREFIX = "genre:"
BUILD_COMMAND = "python scripts/build_genre_corpora.py"
TRAIN_PARTS = ("train", "heldout")
EVAL_PARTS = ("eval",)
SHINGLE_WORDS = 13
# An evaluation genre whose distinct 13-word shingles are found in the training mix above this share
# is flagged: a model could have read that text in training, so it would not be unseen.
MAX_OVERLAP = 0.02

# Jane Austen's novels are reserved for checks independent of this project: any document that
# names her or one of her novels or best-known characters is left out of every genre.
AUSTEN = re.compile(
    r"\bAusten\b|Pride and Prejudice|Sense and Sensibility|Mansfield Park|Northanger Abbey|"
    r"\bElizabeth Bennet\b|\bFitzwilliam Darcy\b|\bMr\.? Darcy\b",
    re.IGNORECASE,
)


class GenreError(ValueError):
    """An unknown genre or part, or a genre that has not been built yet."""


Reader = Callable[[Path, dict[str, Path]], Iterator[tuple[str, str]]]


@dataclass(frozen=True)
class PackageSource:
    """A package whose unpacked tree ``reader`` turns into (id, text) documents; ``helpers`` are
    packages it needs to read it (unpacked beside it, handed to the reader by name)."""

    package: str
    reader: Reader
    helpers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Genre:
    name: str
    role: str  # "train" or "eval"
    description: str
    packages: tuple[PackageSource, ...] = ()
    from_file: bool = False  # built from a JSONL file given at build time (teacher samples)
    chunk_chars: int = 0  # > 0: consecutive short documents of one group are joined up to this size
    heldout_share: float = 0.1

    @property
    def parts(self) -> tuple[str, ...]:
        return TRAIN_PARTS if self.role == "train" else EVAL_PARTS

    @property
    def default_part(self) -> str:
        return self.parts[0]


# --------------------------------------------------------------------------- package readers


def read_text_file(path: Path) -> str:
    """A text file, gunzipped when it ends in .gz; invalid UTF-8 replaced."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", "replace")


def _files(root: Path, pattern: str) -> list[Path]:
    # Debian trees hold symlinks for aliases (common-licenses/GPL -> GPL-3): read each text once.
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())


def _file_reader(*patterns: str) -> Reader:
    """Each matching file (sorted) is one document, named by its path inside the package."""

    def read(root: Path, helpers: dict[str, Path]) -> Iterator[tuple[str, str]]:
        for pattern in patterns:
            for p in _files(root, pattern):
                yield str(p.relative_to(root)), read_text_file(p)

    return read


FORTUNE_DIR = "usr/share/games/fortunes"


def split_cookies(text: str) -> list[str]:
    """The cookies of a fortune file: blocks between lines holding a lone '%'."""
    return [c.strip("\n") for c in re.split(r"^%\s*$", text, flags=re.MULTILINE) if c.strip()]


def read_fortunes(root: Path, helpers: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """One document per cookie, named <file>/<k>; the UTF-8 copy (<file>.u8) where there is one."""
    d = root / FORTUNE_DIR
    files = [p for p in _files(d, "**/*") if p.suffix not in (".dat", ".u8")]
    for p in files:
        u8 = p.with_name(p.name + ".u8")
        text = read_text_file(u8 if u8.is_file() else p)
        for k, cookie in enumerate(split_cookies(text)):
            yield f"{p.relative_to(d)}/{k:05d}", cookie


def split_jargon(text: str) -> list[str]:
    """The entries of the Jargon File's plain text: each starts with a line ':Term: ...' (indented
    in the Debian text)."""
    entries = re.split(r"(?m)^(?=[ \t]*:[^:\n]+:)", text)
    return [e.strip() for e in entries if e.strip()]


def read_jargon(root: Path, helpers: dict[str, Path]) -> Iterator[tuple[str, str]]:
    for p in _files(root, "usr/share/doc/jargon-text/jargon.txt*"):
        for k, entry in enumerate(split_jargon(read_text_file(p))):
            yield f"jargon/{k:05d}", entry


BIBLE_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def bible_chapters(rendered: str) -> list[tuple[str, str]]:
    """(id, text) per chapter from the `bible` program's output, one verse a line
    ("Ruth1:2 And the name ..."); ids keep canonical order: <book number>-<book>/<chapter>."""
    chapters: dict[tuple[int, str, int], list[str]] = {}
    books: dict[str, int] = {}
    for line in rendered.splitlines():
        m = BIBLE_VERSE.match(line.strip())
        if not m:
            continue
        book, chapter, verse = m.group(1), int(m.group(2)), m.group(4)
        n = books.setdefault(book, len(books) + 1)
        chapters.setdefault((n, book, chapter), []).append(verse)
    return [(f"{n:02d}-{b}/{c:03d}", "\n".join(v)) for (n, b, c), v in sorted(chapters.items())]


def read_kjv(root: Path, helpers: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """bible-kjv-text ships the King James Version compressed in its own format; the `bible`
    program of the bible-kjv package (an unpacked helper, not installed) prints it verse by verse."""
    program = helpers["bible-kjv"] / "usr/bin/bible"
    out = subprocess.run(
        [str(program), "-p", str(root / "usr/lib"), "-f", "gen1:1-rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=300,
    )
    yield from bible_chapters(out.stdout.decode("utf-8", "replace"))


NATION_DIR = "usr/share/games/freeciv/nation"
RULESET_LEGEND = re.compile(r'^legend\s*=\s*_\("((?:[^"\\]|\\.)*)"\)', re.MULTILINE | re.DOTALL)


def ruleset_legend(text: str) -> str | None:
    """The legend of a Freeciv nation ruleset (``legend=_("...")``), its escapes undone: a backslash
    at the end of a line continues the string, ``\\n`` is a newline, ``\\"`` a quote."""
    m = RULESET_LEGEND.search(text)
    if not m:
        return None
    escapes = {"\n": "", "n": "\n"}
    return re.sub(r"\\(.)", lambda e: escapes.get(e.group(1), e.group(1)), m.group(1), flags=re.DOTALL).strip()


# Nations that are not history: the barbarian, pirate and animal players (game devices) and the
# "Imaginary" group (myths, jokes and fiction: "h4xx0r r0xx0rz!", Martians, the land of Oz).
NOT_HISTORY = re.compile(r'^barbarian_type\s*=|^groups\s*=.*"Imaginary"', re.MULTILINE)


def read_nation_legends(root: Path, helpers: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """One document per real nation of Freeciv's nation rulesets: its legend, a few sentences of the
    people's or state's history, named nation/<ruleset>."""
    for p in _files(root, f"{NATION_DIR}/*.ruleset"):
        text = read_text_file(p)
        legend = ruleset_legend(text)
        if legend and not NOT_HISTORY.search(text):
            yield f"nation/{p.stem}", legend


# --------------------------------------------------------------------------- the registry


GENRES: dict[str, Genre] = {
    g.name: g
    for g in (
        Genre(
            "scripture",
            "train",
            "the King James Bible (1611; public domain), one document per chapter",
            (PackageSource("bible-kjv-text", read_kjv, helpers=("bible-kjv",)),),
        ),
        Genre(
            "fortunes",
            "train",
            "fortune cookies: aphorisms, jokes, dialogue, short poems and quotations (BSD fortune "
            "files), consecutive cookies of a file joined into documents of about 4,000 characters",
            (PackageSource("fortunes", read_fortunes), PackageSource("fortunes-min", read_fortunes)),
            chunk_chars=4000,
        ),
        Genre(
            "lexicon",
            "train",
            "the Jargon File 4.4.7 (public domain): glossary entries with anecdotes, joined into "
            "documents of about 4,000 characters",
            (PackageSource("jargon-text", read_jargon),),
            chunk_chars=4000,
        ),
        Genre(
            "teacher",
            "train",
            "text sampled from the teacher (data.teacher_samples or the sample_teacher command's JSONL)",
            from_file=True,
        ),
        Genre(
            "legal",
            "eval",
            "software licences (Debian's common-licenses: GPL, LGPL, Apache, MPL, GFDL, Artistic, BSD) "
            "and the Debian Constitution and Social Contract",
            (
                PackageSource("base-files", _file_reader("usr/share/common-licenses/*")),
                PackageSource(
                    "doc-debian",
                    _file_reader(
                        "usr/share/doc/debian/constitution.txt.gz", "usr/share/doc/debian/social-contract.txt.gz"
                    ),
                ),
            ),
        ),
        Genre(
            "standards",
            "eval",
            "normative specifications: the Debian Policy Manual with its sub-policies and the GNU "
            "Coding Standards and maintainer information",
            (
                PackageSource("debian-policy", _file_reader("usr/share/doc/debian-policy/*.txt.gz")),
                PackageSource("gnu-standards", _file_reader("usr/share/doc/gnu-standards/*.text.gz")),
            ),
        ),
        Genre(
            "history",
            "eval",
            "narrative history: A Brief History of Debian (English) and the histories of 535 peoples "
            "and states from Freeciv's nation legends, consecutive legends joined into documents of "
            "about 4,000 characters",
            (
                PackageSource(
                    "debian-history", _file_reader("usr/share/doc/debian-history/docs/project-history.en.txt*")
                ),
                PackageSource("freeciv-data", read_nation_legends),
            ),
            chunk_chars=4000,
        ),
    )
}


def genre(name: str) -> Genre:
    if name not in GENRES:
        raise GenreError(f"unknown genre {name!r}; known: {', '.join(sorted(GENRES))}")
    return GENRES[name]


def training_packages() -> set[str]:
    return {p.package for g in GENRES.values() if g.role == "train" for p in g.packages}


def evaluation_packages() -> set[str]:
    return {p.package for g in GENRES.values() if g.role == "eval" for p in g.packages}


# --------------------------------------------------------------------------- sources


def genres_root() -> Path:
    base = os.environ.get("LINEARARD_CACHE") or str(Path.home() / ".cache" / "linearard_ray")
    return Path(base) / "genres"


def is_genre(source: str) -> bool:
    return source.startswith(GENRE_PREFIX)


def parse_genre(source: str) -> tuple[Genre, str]:
    """(genre, part) of ``genre:<name>[/<part>]``; the part defaults to the genre's first (``train``
    for a training genre, so its held-out documents are never trained on by accident)."""
    name, _, part = source[len(GENRE_PREFIX) :].partition("/")
    g = genre(name)
    part = part or g.default_part
    if part not in g.parts:
        raise GenreError(f"{source!r}: genre {name!r} has parts {', '.join(g.parts)}, not {part!r}")
    return g, part


def genre_files(source: str, root: Path | None = None) -> list[Path]:
    """The built files of a genre source; GenreError naming the build command when not built."""
    g, part = parse_genre(source)
    root = root or genres_root()
    files = sorted((root / g.name / part).glob("*.jsonl.xz"))
    if not (root / g.name / "manifest.json").is_file() or not files:
        # every package genre in one call: the overlap check of evaluation against training text
        # (build.json) covers only the genres built together
        how = (
            f"{BUILD_COMMAND} --genres {g.name} --teacher-samples <samples.jsonl[.xz]>"
            if g.from_file
            else f"{BUILD_COMMAND} (every genre at once, with the overlap check)"
        )
        raise GenreError(f"{source!r}: genre {g.name!r} has not been built under {root}; build it with: {how}")
    return files


def read_documents(path: Path) -> Iterator[dict]:
    """The {"id", "text"} records of one built file."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def iter_genre_documents(source: str, root: Path | None = None) -> Iterator[dict]:
    for path in genre_files(source, root):
        yield from read_documents(path)


def source_family(source: str) -> str:
    """What makes two sources the same text for in-domain/held-out labels: the corpus of a
    ``builtin:`` or ``genre:`` source (any split or part), else the absolute path."""
    if is_genre(source):
        return GENRE_PREFIX + source[len(GENRE_PREFIX) :].partition("/")[0]
    if source.startswith("builtin:"):
        return source.partition("/")[0]
    return os.path.abspath(os.path.expanduser(source))


# --------------------------------------------------------------------------- building


@dataclass
class PackageTree:
    """An unpacked package: its name, version and the directory ``dpkg-deb -x`` wrote."""

    package: str
    version: str
    root: Path


@dataclass
class BuildStats:
    read: int = 0
    austen: int = 0
    duplicates: int = 0
    empty: int = 0
    seen: set = field(default_factory=set)


def _keep(text: str, stats: BuildStats) -> bool:
    """Counts and drops empty documents, Austen, and text already kept (by its sha256)."""
    stats.read += 1
    if not text.strip():
        stats.empty += 1
        return False
    if AUSTEN.search(text):
        stats.austen += 1
        return False
    digest = hashlib.sha256(" ".join(text.split()).encode()).digest()
    if digest in stats.seen:
        stats.duplicates += 1
        return False
    stats.seen.add(digest)
    return True


def chunk_documents(docs: Iterable[tuple[str, str]], max_chars: int) -> list[tuple[str, str]]:
    """Consecutive documents of one group (id up to its last '/') joined with blank lines into
    documents of at most about ``max_chars`` characters, named <group>/<first id's last part>."""
    out: list[tuple[str, str]] = []
    group, ids, texts, size = None, [], [], 0
    for doc_id, text in docs:
        g = doc_id.rpartition("/")[0]
        if texts and (g != group or size + len(text) > max_chars):
            out.append((ids[0], "\n\n".join(texts)))
            ids, texts, size = [], [], 0
        group = g
        ids.append(doc_id)
        texts.append(text)
        size += len(text) + 2
    if texts:
        out.append((ids[0], "\n\n".join(texts)))
    return out


def split_part(doc_id: str, seed: int, heldout_share: float) -> str:
    """'heldout' or 'train' for a document of a training genre: a seeded hash of its id, so the split
    does not depend on the order or number of the other documents."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return "heldout" if int.from_bytes(h[:8], "big") / 2**64 < heldout_share else "train"


def _version_in_name(version: str) -> str:
    return version.replace(":", "%3a")  # as apt names .deb files: no ':' in file names


def write_documents(path: Path, docs: list[tuple[str, str]]) -> str:
    """JSON lines {"id", "text"} compressed with xz; returns the file's sha256. Same documents, same
    bytes: xz writes no time stamps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8", preset=6) as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count_text(docs: list[tuple[str, str]], tokenizer=None) -> dict:
    counts = {
        "documents": len(docs),
        "characters": sum(len(t) for _, t in docs),
        "words": sum(len(t.split()) for _, t in docs),
    }
    if tokenizer is not None:
        counts["tokens"] = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in docs)
    return counts


def _source_documents(g: Genre, docs: Iterable[tuple[str, str]], stats: BuildStats) -> list[tuple[str, str]]:
    kept = sorted((i, t) for i, t in docs if _keep(t, stats))
    return chunk_documents(kept, g.chunk_chars) if g.chunk_chars else kept


def _write_parts(g: Genre, stem: str, docs: list[tuple[str, str]], out: Path, seed: int, tokenizer) -> dict[str, dict]:
    by_part: dict[str, list] = {p: [] for p in g.parts}
    for doc_id, text in docs:
        part = split_part(doc_id, seed, g.heldout_share) if g.role == "train" else "eval"
        by_part[part].append((doc_id, text))
    files = {}
    for part, part_docs in by_part.items():
        path = out / part / f"{stem}.jsonl.xz"
        sha = write_documents(path, part_docs)
        files[part] = {"path": str(path.relative_to(out)), "sha256": sha, **count_text(part_docs, tokenizer)}
    return files


def _build_from_file(g: Genre, samples_file: Path | None, out: Path, seed: int, tokenizer, stats: BuildStats) -> dict:
    """The genre's part files from a JSONL file (teacher samples), named by the file's hash."""
    if samples_file is None:
        raise GenreError(f"genre {g.name!r} is built from a file: give --teacher-samples <samples.jsonl[.xz]>")
    docs = _source_documents(g, _jsonl_documents(samples_file), stats)
    sha = hashlib.sha256(samples_file.read_bytes()).hexdigest()
    files = _write_parts(g, f"{samples_file.name.split('.')[0]}_{sha[:12]}", docs, out, seed, tokenizer)
    return {"file": str(samples_file), "sha256": sha, "files": files}


def _build_from_package(
    g: Genre, src: PackageSource, trees: dict[str, PackageTree], out: Path, seed: int, tokenizer, stats: BuildStats
) -> dict:
    """The genre's part files from one unpacked package (read with its helper packages), named by
    the package and its version."""
    missing = [p for p in (src.package, *src.helpers) if p not in trees]
    if missing:
        raise GenreError(f"genre {g.name!r}: package(s) {', '.join(missing)} not unpacked")
    tree = trees[src.package]
    helpers = {h: trees[h].root for h in src.helpers}
    read_before = stats.read
    docs = _source_documents(g, src.reader(tree.root, helpers), stats)
    if stats.read == read_before:  # all dropped as duplicates of an earlier package is fine
        raise GenreError(f"genre {g.name!r}: package {src.package} {tree.version} holds no document to read")
    files = _write_parts(g, f"{src.package}_{_version_in_name(tree.version)}", docs, out, seed, tokenizer)
    entry = {"package": src.package, "version": tree.version, "files": files}
    if helpers:
        entry["read_with"] = {h: trees[h].version for h in src.helpers}
    return entry


def build_genre(
    g: Genre,
    trees: dict[str, PackageTree],
    out_root: Path,
    *,
    seed: int = 0,
    tokenizer=None,
    tokenizer_name: str | None = None,
    samples_file: Path | None = None,
) -> dict:
    """Build one genre from unpacked packages (``trees`` by package name, helpers included) or, for
    a genre read from a file, from ``samples_file``; writes its files and manifest and returns the
    manifest."""
    out = out_root / g.name
    for part in g.parts:
        for old in (out / part).glob("*.jsonl.xz"):
            old.unlink()  # a rebuild with another version must not leave the old file readable
    stats = BuildStats()
    sources = []
    if g.from_file:
        sources.append(_build_from_file(g, samples_file, out, seed, tokenizer, stats))
    for src in g.packages:
        sources.append(_build_from_package(g, src, trees, out, seed, tokenizer, stats))
    manifest = {
        "genre": g.name,
        "role": g.role,
        "description": g.description,
        "parts": list(g.parts),
        "seed": seed,
        "heldout_share": g.heldout_share if g.role == "train" else None,
        "count_unit": f"tokens of {tokenizer_name}" if tokenizer is not None else "characters and words",
        "sources": sources,
        "totals": _totals(sources, g.parts),
        "dropped": {"austen": stats.austen, "duplicates": stats.duplicates, "empty": stats.empty},
        "documents_read": stats.read,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _totals(sources: list[dict], parts: tuple[str, ...]) -> dict:
    totals: dict = {p: collections.Counter() for p in parts}
    for s in sources:
        for part, f in s["files"].items():
            totals[part].update({k: v for k, v in f.items() if isinstance(v, int)})
    return {p: dict(c) for p, c in totals.items()}


def _jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                yield str(row.get("id", i)), row.get("text") or ""


# --------------------------------------------------------------------------- all genres


def trees_from_dir(directory: Path) -> dict[str, PackageTree]:
    """Unpacked trees named <package>_<version> under ``directory``."""
    trees = {}
    for d in sorted(p for p in directory.iterdir() if p.is_dir()):
        package, sep, version = d.name.partition("_")
        if sep:
            trees[package] = PackageTree(package, version.replace("%3a", ":"), d)
    return trees


def _genre_texts(manifest: dict, out: Path, parts: tuple[str, ...]) -> list[str]:
    texts = []
    for s in manifest["sources"]:
        for part, f in s["files"].items():
            if part in parts:
                texts += [d["text"] for d in read_documents(out / manifest["genre"] / f["path"])]
    return texts


def build_genres(
    names: list[str], trees: dict[str, PackageTree], out: Path, *, max_overlap: float = MAX_OVERLAP, **options
) -> dict:
    """Build ``names`` (``options``: the keywords of ``build_genre``) and report their overlap;
    returns what build.json holds."""
    manifests = {n: build_genre(genre(n), trees, out, **options) for n in names}
    train = [n for n in names if GENRES[n].role == "train"]
    evals = [n for n in names if GENRES[n].role == "eval"]
    overlap = None
    if train and evals:
        # what a recipe trains on: the train part of every training genre built
        train_texts = [t for n in train for t in _genre_texts(manifests[n], out, ("train",))]
        eval_texts = {n: _genre_texts(manifests[n], out, ("eval",)) for n in evals}
        overlap = {"training_mix": train, **overlap_report(train_texts, eval_texts, limit=max_overlap)}
    summary = {
        "genres": {
            n: {k: m[k] for k in ("role", "sources", "totals", "dropped", "count_unit")} for n, m in manifests.items()
        },
        "overlap": overlap,
    }
    (out / "build.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


# --------------------------------------------------------------------------- overlap


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[int]:
    """The distinct n-word shingles of a text (lower-cased words, punctuation dropped), hashed to
    64 bits (collisions are negligible at these sizes)."""
    words = re.findall(r"\w+", text.lower())
    out = set()
    for i in range(len(words) - n + 1):
        h = hashlib.blake2b(" ".join(words[i : i + n]).encode(), digest_size=8).digest()
        out.add(int.from_bytes(h, "big"))
    return out


def _all_shingles(texts: Iterable[str], n: int) -> set[int]:
    out: set[int] = set()
    for t in texts:
        out |= shingles(t, n)
    return out


def overlap_share(eval_texts: Iterable[str], train_shingles: set[int], n: int = SHINGLE_WORDS) -> dict:
    """How much of an evaluation text the training text holds: the share of its distinct n-word
    shingles that also occur in ``train_shingles``."""
    mine = _all_shingles(eval_texts, n)
    shared = len(mine & train_shingles)
    return {"shingles": len(mine), "shared": shared, "share": shared / len(mine) if mine else 0.0}


def overlap_report(
    train_texts: Iterable[str], eval_genres: dict[str, list[str]], *, n: int = SHINGLE_WORDS, limit: float = MAX_OVERLAP
) -> dict:
    """Per evaluation genre, the share of its n-word shingles found in the training texts, flagged
    above ``limit``."""
    train = _all_shingles(train_texts, n)
    out = {"shingle_words": n, "limit": limit, "training_shingles": len(train), "domains": {}}
    for name, texts in eval_genres.items():
        r = overlap_share(texts, train, n)
        out["domains"][name] = {**r, "flagged": r["share"] > limit}
    out["flagged"] = sorted(k for k, v in out["domains"].items() if v["flagged"])
    return out
