#!/usr/bin/env python
"""The SmolLM2-135M restoration study (issues 9 and 10), driven through the real pipelines.

Each variant is one `pipelines/distill.py` job (Ray Train, one GPU worker) with `--set`
overrides on `configs/smollm2-135m-x4.yaml`; one `pipelines/evaluate.py` job then evaluates the
teacher, the untrained PI×4 and YaRN×4 students and every trained student together, so all
numbers share the same windows and passkey prompts.

    python benchmarks/restoration_study.py train --variants linearard,logits,cpt --work /tmp/study
    python benchmarks/restoration_study.py eval --work /tmp/study --out $OUT

Per-run logs, wall time and throughput land in <work>/runs.jsonl; `eval` copies the report,
plots and that file to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "configs/smollm2-135m-x4.yaml"

# name -> (overrides, description). Budgets are tokens of SOTU 1790-1989.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "linearard": ([], "LinearARD relation KL (Q/K/V, all layers), PI×4"),
    "logits": (["objective.name=linearard+logits"], "relation KL + output-logit KL (weight 1), PI×4"),
    "cpt": (["objective.name=cpt", "objective.relation.weight=0", "data.lm_ctx_len=8192"],
            "plain next-token training on 8K blocks (continual pre-training baseline), PI×4"),
    "yarn-linearard": (["rope.type=yarn"], "LinearARD on the YaRN×4 student"),
    "q-only": (["objective.relation.weights={q: 1.0, k: 0.0, v: 0.0}"], "ablation: Q/Q only"),
    "k-only": (["objective.relation.weights={q: 0.0, k: 1.0, v: 0.0}"], "ablation: K/K only"),
    "v-only": (["objective.relation.weights={q: 0.0, k: 0.0, v: 1.0}"], "ablation: V/V only"),
    "last-third": (["objective.relation.layers=last:10"], "ablation: last third of the layers (10 of 30)"),
}


def run_variant(name: str, work: Path, budget: int | None, extra: list[str]) -> dict:
    overrides, desc = VARIANTS[name]
    sets = [
        f"train.run_name=study-{name}",
        f"train.storage_path={work}/ray",
        f"train.output_dir={work}/students",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        *overrides, *extra,
    ]
    if budget:
        sets.append(f"train.budget_tokens={budget}")
    cmd = [sys.executable, "pipelines/distill.py", "--config", RECIPE]
    for s in sets:
        cmd += ["--set", s]
    log = work / f"{name}.log"
    print(f"== {name}: {desc}\n   {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    tps = [float(x) for x in re.findall(r"([0-9.]+) tok/s", text)]
    rec = {"variant": name, "description": desc, "overrides": sets, "returncode": proc.returncode,
           "wall_s": round(wall, 1), "tokens_per_s_last": tps[-1] if tps else None,
           "student": str(work / "students" / f"study-{name}" / "merged")}
    print(f"   rc={proc.returncode} wall={wall:.0f}s tok/s(last)={rec['tokens_per_s_last']}", flush=True)
    if proc.returncode != 0:
        print(text[-3000:], flush=True)
    print("\n".join(text.splitlines()[-6:]), flush=True)
    with open(work / "runs.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def run_eval(work: Path, out: Path | None, extra: list[str]) -> int:
    runs = [json.loads(x) for x in (work / "runs.jsonl").read_text().splitlines()] if (work / "runs.jsonl").exists() else []
    models = [
        {"name": "teacher", "path": "smollm2-135m"},
        {"name": "PI×4", "path": "smollm2-135m", "rope": {"type": "linear", "factor": 4.0}},
        {"name": "YaRN×4", "path": "smollm2-135m", "rope": {"type": "yarn", "factor": 4.0}},
    ]
    seen = set()
    for r in reversed(runs):  # latest run of each variant
        if r["returncode"] == 0 and r["variant"] not in seen and Path(r["student"]).exists():
            seen.add(r["variant"])
            models.append({"name": r["variant"], "path": r["student"]})
    cmd = [sys.executable, "pipelines/evaluate.py", "--config", RECIPE,
           "--set", f"eval.models={json.dumps(models)}",
           "--set", f"eval.output_dir={work}/eval",
           "--set", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", *sum((["--set", e] for e in extra), [])]
    print("== eval:", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    print(f"   eval rc={rc} wall={time.time() - t0:.0f}s", flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for p in [work / "eval" / "report.md", work / "eval" / "report.json", work / "runs.jsonl"]:
            if p.exists():
                shutil.copy(p, out / p.name)
        pngs = sorted((work / "eval").glob("*.png"))
        if pngs:
            subprocess.run(["tar", "-czf", str(out / "plots.tar.gz"), "-C", str(work / "eval"), *[p.name for p in pngs]])
        logs = sorted(work.glob("*.log"))
        if logs:
            subprocess.run(["tar", "-czf", str(out / "logs.tar.gz"), "-C", str(work), *[p.name for p in logs]])
    return rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["train", "eval"])
    p.add_argument("--variants", default="linearard", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--budget", type=int, default=None, help="token budget override for every variant")
    p.add_argument("--work", default="/tmp/study")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every job")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.phase == "train":
        bad = [v for v in a.variants.split(",") if v not in VARIANTS]
        if bad:
            p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
        rcs = [run_variant(v, work, a.budget, a.extra)["returncode"] for v in a.variants.split(",")]
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "runs.jsonl", Path(a.out) / "runs.jsonl")
            logs = sorted(work.glob("*.log"))
            subprocess.run(["tar", "-czf", str(Path(a.out) / "logs.tar.gz"), "-C", str(work), *[x.name for x in logs]])
        return max(rcs)
    return run_eval(work, Path(a.out) if a.out else None, a.extra)


if __name__ == "__main__":
    sys.exit(main())
