"""Build the named genre corpora (``linearard_ray.data.genres``) from Debian packages, at set-up.

    python scripts/build_genre_corpora.py                      # every package genre, with apt
    python scripts/build_genre_corpora.py --genres legal,history
    python scripts/build_genre_corpora.py --from-dir /tmp/unpacked   # trees already unpacked
    python scripts/build_genre_corpora.py --genres teacher --teacher-samples samples.jsonl.xz

With apt (root, Debian's archive reachable; run ``apt-get update`` once first) each package is
fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a temporary directory:
nothing is installed. ``--from-dir`` reads directories named ``<package>_<version>`` (the version
with ':' written '%3a', as in .deb names) instead, which is how tests and offline machines build.
The genres go to ``$LINEARARD_CACHE/genres`` (``--out`` to change it), one manifest per genre, and
``build.json`` beside them with every genre's counts and sha256s and the overlap of each evaluation
genre with the training mix. Exit status 1 when an evaluation genre's overlap is over the limit
(``--max-overlap``), unless ``--allow-overlap``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from linearard_ray.data import genres as G


def unpack_with_apt(packages: list[str], work: Path) -> dict[str, G.PackageTree]:
    """apt-get download + dpkg-deb -x of each package into ``work``; nothing is installed."""
    subprocess.run(["apt-get", "download", *packages], cwd=work, check=True, capture_output=True)
    trees = {}
    for deb in sorted(work.glob("*.deb")):
        fields = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Package", "Version"], check=True, capture_output=True, text=True
        ).stdout
        info = dict(line.split(": ", 1) for line in fields.strip().splitlines())
        root = work / deb.stem
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        trees[info["Package"]] = G.PackageTree(info["Package"], info["Version"], root)
    return trees


def load_tokenizer(name: str):
    if name == "none":
        return None
    from transformers import AutoTokenizer

    from linearard_ray.models.loading import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genres", default="packages", help="comma-separated names, or 'packages' (every package genre)")
    ap.add_argument("--from-dir", type=Path, help="unpacked trees <package>_<version>/ instead of apt")
    ap.add_argument("--teacher-samples", type=Path, help="JSONL (.xz) of teacher samples, for the 'teacher' genre")
    ap.add_argument("--out", type=Path, default=None, help="default: $LINEARARD_CACHE/genres")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="counts tokens with it; 'none': characters and words")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-overlap", type=float, default=G.MAX_OVERLAP)
    ap.add_argument("--allow-overlap", action="store_true")
    args = ap.parse_args(argv)

    names = [n for n, g in G.GENRES.items() if g.packages] if args.genres == "packages" else args.genres.split(",")
    if args.teacher_samples and "teacher" not in names:
        names.append("teacher")
    for n in names:
        G.genre(n)
    out = args.out or G.genres_root()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    packages = sorted({p for n in names for s in G.GENRES[n].packages for p in (s.package, *s.helpers)})
    with tempfile.TemporaryDirectory() as tmp:
        trees = (
            G.trees_from_dir(args.from_dir)
            if args.from_dir
            else unpack_with_apt(packages, Path(tmp))
            if packages
            else {}
        )
        summary = G.build_genres(
            names,
            trees,
            out,
            seed=args.seed,
            tokenizer=tokenizer,
            tokenizer_name=None if tokenizer is None else args.tokenizer,
            samples_file=args.teacher_samples,
            max_overlap=args.max_overlap,
        )
    print(json.dumps(summary, indent=1, sort_keys=True))
    flagged = (summary["overlap"] or {}).get("flagged") or []
    if flagged and not args.allow_overlap:
        print(f"evaluation genres over the overlap limit {args.max_overlap}: {', '.join(flagged)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
