#!/usr/bin/env python
r"""The SmolLM2-135M restoration study, driven through the real pipelines.

Each variant is one `pipelines/distill.py` job (Ray Train, one worker) with `--set` overrides on
`configs/smollm2-135m-x4.yaml` (`--recipe` picks another); one `pipelines/evaluate.py` job then
evaluates the teacher, the untrained PI×4 and YaRN×4 students and every trained student together,
so all numbers share the same windows and passkey prompts.

    python research/restoration_study.py train --variants linearard,logits,cpt --work /tmp/study
    python research/restoration_study.py sample --work /tmp/study   # teacher samples for tsample-*
    # or, instead of `sample`, the shipped draw (research/README.md says how it was drawn):
    xz -dc research/data/smollm2_teacher_samples.jsonl.xz > /tmp/study/teacher_samples.jsonl
    python research/restoration_study.py train --variants all --parallel 4 --work /tmp/study
    python research/restoration_study.py train --variants tsample-vmix-ce22,cpt --seeds 0-3 --parallel 8 \
        --work /tmp/study
    python research/restoration_study.py eval --work /tmp/study --out $OUT
    python research/restoration_study.py table --work /tmp/study      # markdown for research/LOG.md
    python research/restoration_study.py table --jobs /tmp/study/eval/jobs.jsonl  # from raw jobs

`--parallel N` (N > 1) shares the GPUs between N jobs: the script starts one local Ray head
(`ray start --head --block` on 127.0.0.1, free ports, its own --temp-dir), runs up to N variants
at once as subprocesses with RAY_ADDRESS=127.0.0.1:<port> and, when the head has GPUs,
`--set train.gpus_per_worker=1/ceil(N/GPUs)`, and stops that head at the end (also on Ctrl-C, SIGTERM or an
error) by signalling the `ray start --block` process it started, which shuts its own Ray processes
down; `ray stop` is not used because it stops every Ray instance of the user on the machine.
Ray resolves 127.0.0.1 to the node's own IP on both sides, so the jobs find the head; the head
and the jobs get one explicit RAY_AUTH_MODE (token when an auth token exists, as `ray start` would
choose). With N = 1 every job starts its own local Ray, as before. A short check on a CPU box:

    python research/restoration_study.py train --variants logits-only,logits-all --parallel 2 \
        --recipe configs/default.yaml --budget 2048 --work /tmp/study-cpu

Per-run logs (<work>/<variant>.log), wall time and throughput land in <work>/runs.jsonl (written
by this process only); `eval` copies the report, plots and that file to --out. `--dry-run` prints
the commands (after validating each variant's configuration) without running anything.
`eval --only a,b` evaluates just those models and the teacher, the reference of every recovery and
relation KL (the untrained baselines' long-context figures do not change between rounds).
`table --jobs` reads evaluate.py's resumable job logs: what is left when a machine is taken back
before the report is written, or several rounds on the same windows. Its last tables put each
recipe trained more than once (variants that differ by -s<seed>) against YaRN×4 on the passkey
prompts and against CPT's trainings on the long-context windows, each prompt and window averaged
over each side's trainings first (linearard_ray.evaluation.paired_stats.pooled_passkey / pooled_windows).
Later files win where two hold the same model's job; `--apart` keeps a model that a later round
trained again as a training of its own ("<model> (r13)"), so a retrained seed adds to its recipe:

    python research/restoration_study.py table --apart \
        --jobs research/results/{yarn4-restore,attention-map,attention-map-seeds,pi4-restore-long}/jobs.jsonl

With the held-out genres (eval.preset=study), `--plot-unseen PNG` also draws each recipe's recovery
on them with evaluate's unseen_recovery plot.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "configs/smollm2-135m-x4.yaml"

# All the modules of a Llama-family decoder layer (SmolLM2 is a LlamaForCausalLM).
ALL_LINEAR = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
# Full fine-tuning keeps fp32 master weights (compute stays under the recipe's bf16 autocast): with
# bf16 weights most AdamW updates at lr 5e-5..1e-4 are below half a bf16 ulp and round away. (The
# relation loss casts the mixed fp32 q/k / bf16 v captures this gives to one dtype since 16e6cdf.)
FULL_FP32 = ["model.dtype=float32"]
# The weights are spelled out although `--set objective.name=...` now brings its recipe's weights
# (config.select_named_objective): the commands then say exactly what each run trained.
LOGITS = ["objective.name=linearard+logits", "objective.logits.weight=1.0"]
V_HEAVY = "objective.relation.weights={q: 0.1, k: 0.1, v: 1.0}"
TEACHER_SAMPLES = "{work}/teacher_samples.jsonl"  # {work} is replaced by --work
BLOCKS_8K = ["data.ctx_len=8192", "train.micro_batch_size=1"]
SOTU_AND_SAMPLES = f"data.sources=[builtin:sotu/train, {TEACHER_SAMPLES}]"
UNIXDOCS = "{work}/unixdocs.jsonl.xz"  # built by scripts/build_unixdocs_corpus.py, copied into --work
SOTU_SAMPLES_UNIX = f"data.sources=[builtin:sotu/train, {TEACHER_SAMPLES}, {UNIXDOCS}]"
# How to make each corpus a variant reads from --work.
MAKE_INPUT = {
    TEACHER_SAMPLES: "draw it with the `sample` phase, or unpack research/data/smollm2_teacher_samples.jsonl.xz",
    UNIXDOCS: "build it with scripts/build_unixdocs_corpus.py and copy it there",
}


def _next_token_variant(weight: str, sources: list[str], data: str) -> tuple[list[str], str]:
    """The next-token study's objective (round 5): the V-heavy relation KL + logit KL + a next-token
    term at ``weight`` on the same 2K blocks (no extra stream, so no tokens taken from the KL terms),
    lr 1e-3."""
    return (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            f"objective.next_token.weight={weight}",
            V_HEAVY,
            "train.lr=1e-3",
            *sources,
        ],
        f"relation KL (q/k/v 0.1/0.1/1) + logit KL + next-token (weight {float(weight):g}) on the same 2K blocks, "
        f"lr 1e-3, {data}, PI×4",
    )


def _seeded(variant: tuple[list[str], str], seed: int) -> tuple[list[str], str]:
    """The same run with another LoRA init and block order."""
    overrides, description = variant
    return [*overrides, f"train.seed={seed}", f"data.seed={seed}"], f"{description}, seed {seed}"


# name -> (overrides, description). Budgets are tokens of SOTU 1790-1989. The recipe gives LoRA
# r=128/alpha=256 on q/k/v, lr 3e-4, bf16 on GPU.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "linearard": ([], "LinearARD relation KL (Q/K/V, all layers), PI×4"),
    "logits": ([*LOGITS], "relation KL + output-logit KL (weight 1), PI×4"),
    "cpt": (
        [
            "objective.name=cpt",
            "objective.relation.weight=0",
            "objective.next_token.weight=1.0",
            "data.lm_ctx_len=8192",
        ],
        "plain next-token training on 8K blocks (continual pre-training baseline), PI×4",
    ),
    "yarn-linearard": (["rope.type=yarn"], "LinearARD on the YaRN×4 student"),
    "q-only": (["objective.relation.weights={q: 1.0, k: 0.0, v: 0.0}"], "ablation: Q/Q only"),
    "k-only": (["objective.relation.weights={q: 0.0, k: 1.0, v: 0.0}"], "ablation: K/K only"),
    "v-only": (["objective.relation.weights={q: 0.0, k: 0.0, v: 1.0}"], "ablation: V/V only"),
    "last-third": (["objective.relation.layers=last:10"], "ablation: last third of the layers (10 of 30)"),
    # objectives and settings (research/LOG.md#objectives)
    "logits-only": (
        ["objective.name=custom", "objective.relation.weight=0", "objective.logits.weight=1.0"],
        "output-logit KL only (no relation term), LoRA q/k/v, PI×4",
    ),
    "logits-full": (
        [*LOGITS, "lora.enabled=false", "train.lr=1e-4", *FULL_FP32],
        "relation KL + logit KL, full fine-tuning of q/k/v (no LoRA), lr 1e-4, fp32 master weights, PI×4",
    ),
    "logits-all": (
        [*LOGITS, f"lora.target_modules={ALL_LINEAR}"],
        "relation KL + logit KL, LoRA r=128 on q/k/v/o and the MLP (gate/up/down), lr 3e-4, PI×4",
    ),
    "logits-full-all": (
        [*LOGITS, "lora.enabled=false", f"lora.target_modules={ALL_LINEAR}", "train.lr=5e-5", *FULL_FP32],
        "relation KL + logit KL, full fine-tuning of q/k/v/o and the MLP (no LoRA; embeddings, "
        "norms and head frozen), lr 5e-5, fp32 master weights, PI×4",
    ),
    "logits-hilr": ([*LOGITS, "train.lr=1e-3"], "relation KL + logit KL, LoRA q/k/v, lr 1e-3, PI×4"),
    # round 3: V/V carried the ablation, logit KL and lr 1e-3 the capacity round;
    # 8K blocks (the teacher's whole window) and a long next-token stream aim at long context.
    "vlogits-hilr": (
        [*LOGITS, V_HEAVY, "train.lr=1e-3"],
        "relation KL weighted q/k/v 0.1/0.1/1 + logit KL, LoRA q/k/v, lr 1e-3, PI×4",
    ),
    "vlogits-8k": (
        [*LOGITS, V_HEAVY, "train.lr=1e-3", *BLOCKS_8K],
        "relation KL weighted q/k/v 0.1/0.1/1 + logit KL on 8K blocks, lr 1e-3, PI×4",
    ),
    "logits-only-8k": (
        ["objective.name=custom", "objective.relation.weight=0", "objective.logits.weight=1.0", *BLOCKS_8K],
        "output-logit KL only on 8K blocks (the teacher's window), lr 3e-4, PI×4",
    ),
    "vlogits-mix": (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            "objective.next_token.weight=0.25",
            "data.lm_ctx_len=8192",
            V_HEAVY,
            "train.lr=1e-3",
        ],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL on 2K blocks, + next-token (weight 0.25) on its "
        "own 8K blocks, lr 1e-3, PI×4",
    ),
    "logits-t2": (
        [*LOGITS, "objective.logits.temperature=2.0", "train.lr=1e-3"],
        "relation KL + logit KL at temperature 2, lr 1e-3, PI×4",
    ),
    # Teacher samples (pipelines/sample_teacher.py, written to <work>/teacher_samples.jsonl by the
    # `sample` phase) as the KL terms' data: alone (data-free) or next to SOTU.
    "tsample-logits": (
        [*LOGITS, "train.lr=1e-3", f"data.sources=[{TEACHER_SAMPLES}]"],
        "relation KL + logit KL, lr 1e-3, on teacher samples only (no SOTU), PI×4",
    ),
    "tsample-mix": (
        [*LOGITS, "train.lr=1e-3", SOTU_AND_SAMPLES],
        "relation KL + logit KL, lr 1e-3, on SOTU 1790-1989 + teacher samples, PI×4",
    ),
    # round 4 (the unseen domain): round 3's best weighting (V-heavy) on teacher samples,
    # alone, next to SOTU, at a higher lr, and with a weak next-token term on SOTU 8K blocks
    # (long context).
    "tsample-vlogits": (
        [*LOGITS, V_HEAVY, "train.lr=1e-3", f"data.sources=[{TEACHER_SAMPLES}]"],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL, lr 1e-3, on teacher samples only, PI×4",
    ),
    "tsample-vmix": (
        [*LOGITS, V_HEAVY, "train.lr=1e-3", SOTU_AND_SAMPLES],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL, lr 1e-3, on SOTU 1790-1989 + teacher samples, PI×4",
    ),
    "tsample-vmix-2e3": (
        [*LOGITS, V_HEAVY, "train.lr=2e-3", SOTU_AND_SAMPLES],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL, lr 2e-3, on SOTU 1790-1989 + teacher samples, PI×4",
    ),
    "tsample-vmix-lm": (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            "objective.next_token.weight=0.1",
            V_HEAVY,
            "train.lr=1e-3",
            SOTU_AND_SAMPLES,
            "data.lm_sources=[builtin:sotu/train]",
            "data.lm_ctx_len=8192",
        ],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL on SOTU + teacher samples (2K blocks), + next-token "
        "(weight 0.1) on SOTU 8K blocks, lr 1e-3, PI×4",
    ),
    # round 5: the round-4 winner on 8K blocks (the teacher's window; samples packed with EOS
    # between them) for long context, and at half the lr for the unseen domain.
    "tsample-vmix-8k": (
        [*LOGITS, V_HEAVY, "train.lr=1e-3", SOTU_AND_SAMPLES, *BLOCKS_8K],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL on 8K blocks, lr 1e-3, SOTU + teacher samples, PI×4",
    ),
    "tsample-vlogits-8k": (
        [*LOGITS, V_HEAVY, "train.lr=1e-3", f"data.sources=[{TEACHER_SAMPLES}]", *BLOCKS_8K],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL on 8K blocks, lr 1e-3, teacher samples only, PI×4",
    ),
    "tsample-vmix-5e4": (
        [*LOGITS, V_HEAVY, "train.lr=5e-4", SOTU_AND_SAMPLES],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL, lr 5e-4, on SOTU 1790-1989 + teacher samples, PI×4",
    ),
    # An upper bound, not a recipe: the round-3/4 objective distilled on pydocs itself (the
    # evaluation's own documents included). If this stays below 95% on pydocs, the
    # unseen-domain target is beyond what LoRA q/k/v can give PI×4 at this budget, whatever the data.
    "pydocs-oracle": (
        [*LOGITS, V_HEAVY, "train.lr=1e-3", "data.sources=[builtin:pydocs]"],
        "upper bound: relation KL (q/k/v 0.1/0.1/1) + logit KL, lr 1e-3, on pydocs itself "
        "(evaluation documents included), PI×4",
    ),
    # round 5: a next-token term on the KL terms' own blocks (no extra tokens; the
    # in-domain fit that gives CPT its SOTU long-context lead), and Q/K left out.
    "tsample-vmix-ce2": _next_token_variant("0.2", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    "tsample-vmix-ce5": _next_token_variant("0.5", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    "tsample-vmix-ce10": _next_token_variant("1.0", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    # further along round 5's trend for SOTU long context (ce20 ran in round 6; the
    # SOTU-only run was taken at weight 2, vlogits-ce20 below, instead of vlogits-ce10)
    "tsample-vmix-ce20": _next_token_variant("2.0", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    "vlogits-ce10": _next_token_variant("1.0", [], "SOTU only"),
    "vlogits-ce20": _next_token_variant("2.0", [], "SOTU only"),
    # round 6: the unseen domain as a question of genre. unixdocs
    # (scripts/build_unixdocs_corpus.py: rendered man pages and C headers, nothing named after or
    # about Python) is technical text like pydocs without being it; CPT gets the same text, so the
    # long-context comparison on pydocs stays fair.
    "unix-vmix-ce2": _next_token_variant("0.2", [SOTU_SAMPLES_UNIX], "SOTU + teacher samples + unixdocs"),
    "unix-ce2": _next_token_variant("0.2", [f"data.sources=[builtin:sotu/train, {UNIXDOCS}]"], "SOTU + unixdocs"),
    "cpt-unix": (
        [
            "objective.name=cpt",
            "objective.relation.weight=0",
            "objective.next_token.weight=1.0",
            "data.lm_ctx_len=8192",
            f"data.sources=[builtin:sotu/train, {UNIXDOCS}]",
        ],
        "plain next-token training on 8K blocks of SOTU + unixdocs (the CPT baseline on round 6's text), PI×4",
    ),
    # next (defined, not run): round 6 left SOTU 32K at 20.69 vs CPT's 20.61 (weight 2 on
    # SOTU + samples) and the unseen domain short of CPT at pydocs 32K (unixdocs hurt it). With
    # data.pack=false a document shorter than one 2K block is dropped (counted in the preprocessing
    # report): the samples runs used ~420 of 1,849 samples, the unixdocs runs ~390 of 1,429
    # documents. Packing keeps them all.
    "tsample-vmix-ce40": _next_token_variant("4.0", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    # round 7a: ce40 won SOTU 32K (20.30) but lost passkey (18 of 72); between 2 and 4
    "tsample-vmix-ce30": _next_token_variant("3.0", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    "tsample-vmix-ce20-pack": _next_token_variant(
        "2.0", [SOTU_AND_SAMPLES, "data.pack=true"], "SOTU + teacher samples, packed (no document dropped)"
    ),
    "unix-vmix-ce2-pack": _next_token_variant(
        "0.2", [SOTU_SAMPLES_UNIX, "data.pack=true"], "SOTU + teacher samples + unixdocs, packed (no document dropped)"
    ),
    "unix-vmix-ce20": _next_token_variant("2.0", [SOTU_SAMPLES_UNIX], "SOTU + teacher samples + unixdocs"),
    # the split the unseen-domain target suggested: KL terms on 2K blocks, the next-token term on its own 8K blocks
    # (what gives cpt-unix its pydocs 32K), drawn every 6th step so the KL terms keep 60% of the budget
    "unix-vmix-lm8k": (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            "objective.next_token.weight=1.0",
            V_HEAVY,
            "train.lr=1e-3",
            SOTU_SAMPLES_UNIX,
            f"data.lm_sources=[builtin:sotu/train, {UNIXDOCS}]",
            "data.lm_ctx_len=8192",
            "data.lm_every=6",
        ],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL on 2K blocks of SOTU + samples + unixdocs, + "
        "next-token (weight 1) on its own 8K blocks of SOTU + unixdocs every 6th step, lr 1e-3, PI×4",
    ),
    # round 7, second GPU: the weight between 2 and 3, and packing at weight 3 (long context);
    # more of the 8K next-token stream, lm8k packed, and the KL terms themselves on 8K blocks (the
    # teacher's whole window, which the PI×4 student stretches to 32K; the unseen-domain target allows it)
    "tsample-vmix-ce25": _next_token_variant("2.5", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    "tsample-vmix-ce30-pack": _next_token_variant(
        "3.0", [SOTU_AND_SAMPLES, "data.pack=true"], "SOTU + teacher samples, packed (no document dropped)"
    ),
    "unix-vmix-lm8k-e3": (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            "objective.next_token.weight=1.0",
            V_HEAVY,
            "train.lr=1e-3",
            SOTU_SAMPLES_UNIX,
            f"data.lm_sources=[builtin:sotu/train, {UNIXDOCS}]",
            "data.lm_ctx_len=8192",
            "data.lm_every=3",
        ],
        "as unix-vmix-lm8k, with the 8K next-token blocks every 3rd step",
    ),
    "unix-vmix-lm8k-pack": (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            "objective.next_token.weight=1.0",
            V_HEAVY,
            "train.lr=1e-3",
            SOTU_SAMPLES_UNIX,
            f"data.lm_sources=[builtin:sotu/train, {UNIXDOCS}]",
            "data.lm_ctx_len=8192",
            "data.lm_every=6",
            "data.pack=true",
        ],
        "as unix-vmix-lm8k, packed (no document dropped)",
    ),
    "unix-vmix-ce2-8k": _next_token_variant(
        "0.2",
        [SOTU_SAMPLES_UNIX, *BLOCKS_8K, "data.pack=true"],
        "SOTU + teacher samples + unixdocs on packed 8K blocks",
    ),
    # round 8: round 7 read the weight sweep on SOTU + samples as 2 → 49, 2.5 → 27, 3 → 26 of 72
    # passkey prompts; other seeds of the LoRA init and the block order test whether weight 2's 49 is
    # the rule (it was not: 19-49), and a second seed of the docs recipe whether its 98.5% SOTU holds.
    "tsample-vmix-ce20-s1": _seeded(_next_token_variant("2.0", [SOTU_AND_SAMPLES], "SOTU + teacher samples"), 1),
    "tsample-vmix-ce20-s2": _seeded(_next_token_variant("2.0", [SOTU_AND_SAMPLES], "SOTU + teacher samples"), 2),
    "tsample-vmix-ce22": _next_token_variant("2.2", [SOTU_AND_SAMPLES], "SOTU + teacher samples"),
    # the next-token term on SOTU alone (its own 2K stream, every 2nd step), the KL terms on SOTU +
    # samples: the in-domain fit that wins SOTU 32K without fitting the samples' text as well
    "tsample-vmix-lmsotu20": (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            "objective.next_token.weight=2.0",
            V_HEAVY,
            "train.lr=1e-3",
            SOTU_AND_SAMPLES,
            "data.lm_sources=[builtin:sotu/train]",
            "data.lm_ctx_len=2048",
            "data.lm_every=2",
        ],
        "relation KL (q/k/v 0.1/0.1/1) + logit KL on 2K blocks of SOTU + samples, + next-token "
        "(weight 2) on its own 2K blocks of SOTU every 2nd step, lr 1e-3, PI×4",
    ),
    # round 8: the same at weight 3, the weight that won 32K in-block (20.36) but cost passkey
    "tsample-vmix-lmsotu30": (
        [
            "objective.name=custom",
            "objective.relation.weight=1.0",
            "objective.logits.weight=1.0",
            "objective.next_token.weight=3.0",
            V_HEAVY,
            "train.lr=1e-3",
            SOTU_AND_SAMPLES,
            "data.lm_sources=[builtin:sotu/train]",
            "data.lm_ctx_len=2048",
            "data.lm_every=2",
        ],
        "as tsample-vmix-lmsotu20, next-token weight 3",
    ),
    "tsample-vmix-ce20-s3": _seeded(_next_token_variant("2.0", [SOTU_AND_SAMPLES], "SOTU + teacher samples"), 3),
    "unix-vmix-ce2-8k-s1": _seeded(
        _next_token_variant(
            "0.2",
            [SOTU_SAMPLES_UNIX, *BLOCKS_8K, "data.pack=true"],
            "SOTU + teacher samples + unixdocs on packed 8K blocks",
        ),
        1,
    ),
    "tsample-vonly": (
        [*LOGITS, "objective.relation.weights={q: 0.0, k: 0.0, v: 1.0}", "train.lr=1e-3", SOTU_AND_SAMPLES],
        "relation KL V/V only + logit KL, lr 1e-3, SOTU + teacher samples, PI×4",
    ),
    "logits-full-lolr": (
        [*LOGITS, "lora.enabled=false", "train.lr=1e-5", *FULL_FP32],
        "relation KL + logit KL, full fine-tuning of q/k/v, lr 1e-5, fp32 master weights, PI×4",
    ),
}

# round 9: round 8 found one training of a recipe to be one draw (weight 2: 19-49 of 72 passkey
# prompts over five trainings), so a recipe is compared with CPT over several trainings of each
# (weight 2.2: seeds 0-5; CPT: seeds 0-3), scored with the forced choice as well
VARIANTS.update(
    {
        f"{name}-s{seed}": _seeded(VARIANTS[name], seed)
        for name, seeds in (("tsample-vmix-ce22", (1, 2, 3, 4, 5)), ("cpt", (1, 2, 3)))
        for seed in seeds
    }
)
# round 10: round 9 traced the passkey gap to YaRN×4 to PI×4's compressed positions (doubled digits
# written once, lower key log-probability). The same recipe on the YaRN×4 student, which keeps the
# high-frequency RoPE dimensions, tests that (seeds 0-2, against ce22 seeds 0-2 and cpt, cpt-s1,
# scored with one-digit distractors): it never drops a digit, and its 16K/32K are the study's best.
_ce22, _ce22_text = VARIANTS["tsample-vmix-ce22"]
VARIANTS["tsample-vmix-ce22-yarn"] = ([*_ce22, "rope.type=yarn"], _ce22_text.replace("PI×4", "YaRN×4 student"))
# next (defined, not run): round 10 left the PI×4 student behind untrained YaRN×4 on passkey and
# losing digits where the YaRN×4 student does not. The self-relations say where a head looks only
# indirectly; the attention map (Q·Kᵀ, objective.relation.weights.qk) says it directly, so these
# add it to the PI×4 recipe at V/V's weight and at 3 (ahead on key log-probability in a CPU check,
# research/LOG.md).
for _w in (1, 3):
    VARIANTS[f"tsample-vmix-ce22-qk{'' if _w == 1 else _w}"] = (
        [*_ce22, f"objective.relation.weights.qk={_w:.1f}"],
        _ce22_text.replace("q/k/v 0.1/0.1/1)", f"q/k/v 0.1/0.1/1, attention map {_w})"),
    )

# next: the held-out genres (eval.preset=study: legal, standards, history, built by
# scripts/build_genre_corpora.py) judge restoration on text no recipe trains on. The training side
# widens from SOTU + teacher samples to a general mix of public-domain genres (scripture, fortunes,
# lexicon), packed so that the short documents of fortunes and lexicon are kept; CPT gets the same
# text. The objective is the long-context restorer's (configs/smollm2-135m-x4-restore-long.yaml).
GENRE_MIX = f"data.sources=[builtin:sotu/train, {TEACHER_SAMPLES}, genre:scripture, genre:fortunes, genre:lexicon]"
_restore_long, _restore_long_text = VARIANTS["tsample-vmix-ce22-qk"]
VARIANTS["genre-long"] = (
    [*_restore_long, GENRE_MIX, "data.pack=true"],
    _restore_long_text.replace("SOTU + teacher samples", "SOTU + teacher samples + scripture/fortunes/lexicon, packed"),
)
VARIANTS["genre-long-yarn"] = (
    [*VARIANTS["genre-long"][0], "rope.type=yarn"],
    VARIANTS["genre-long"][1].replace("PI×4", "YaRN×4 student"),
)
# next: packing cuts the concatenated stream, so the general mix's tokens see about two thirds of
# the own-document context that -restore-long's per-document blocks give (research/block_context.py,
# LOG.md#packing-context), and -restore-long's per-document cut keeps only the 447 teacher samples
# that fill a whole block. data.pack=best_fit keeps every document shorter than a block whole.
VARIANTS["genre-long-fit"] = (
    [*_restore_long, GENRE_MIX, "data.pack=best_fit"],
    _restore_long_text.replace(
        "SOTU + teacher samples", "SOTU + teacher samples + scripture/fortunes/lexicon, best-fit packed"
    ),
)
VARIANTS["tsample-vmix-ce22-qk-fit"] = (
    [*_restore_long, "data.pack=best_fit"],
    _restore_long_text.replace("SOTU + teacher samples", "SOTU + every teacher sample, best-fit packed"),
)
VARIANTS["cpt-genre"] = (
    [*VARIANTS["cpt"][0], GENRE_MIX, "data.pack=true"],
    "plain next-token training on 8K blocks of SOTU + teacher samples + scripture/fortunes/lexicon, packed "
    "(the CPT baseline on the general mix), PI×4",
)

# --------------------------------------------------------------------------- recipes as variants

# What a recipe or a sweep sets for its own runs rather than for what is trained: the study sets
# these itself (run name, storage, budget, GPU share, tracking, its own evaluation job).
PLUMBING_SECTIONS = ("tune", "tracking", "eval", "export")
PLUMBING_FIELDS = {
    "model.cache_dir",
    "data.output_dir",
    "data.preprocessed",
    "data.teacher_samples",
    "train.log_every",
    "train.keep_checkpoints",
    "train.run_name",
    "train.seed",
    "train.budget_tokens",
    "train.max_steps",
    "train.num_workers",
    "train.gpus_per_worker",
    "train.storage_path",
    "train.output_dir",
    "train.checkpoint_every",
    "train.max_failures",
    "train.fail_at_step",
    "train.takeover",
    "train.evaluate_at_end",
    "train.eval_every",
    "train.eval_texts",
    "train.eval_long_len",
    "train.eval_sources",
}


def flatten(d: dict, prefix: str = "") -> dict:
    """Dotted leaf paths of a nested dict; lists and scalars are leaves."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_plumbing(key: str) -> bool:
    return key.split(".", 1)[0] in PLUMBING_SECTIONS or any(
        key == f or key.startswith(f + ".") for f in PLUMBING_FIELDS
    )


def dotted_get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def training_changes(config: dict, base: dict) -> dict:
    """The training fields (dotted) where one full config dump differs from another. Where the
    config's dict lacks an entry the base's has (relation weights without ``qk``), the whole dict
    is the change, so that setting the changes on the base leaves no entry of the base behind."""
    flat, base_flat = flatten(config), flatten(base)
    missing = object()
    changes = {k: v for k, v in flat.items() if not is_plumbing(k) and base_flat.get(k, missing) != v}
    for k in base_flat:
        if k not in flat and not is_plumbing(k):
            parent = k.rsplit(".", 1)[0]
            changes = {c: v for c, v in changes.items() if not c.startswith(parent + ".")}
            changes[parent] = dotted_get(config, parent)
    return changes


def recipe_path(recipe: str) -> Path:
    """A --recipe as given, relative to the repository when not absolute (jobs run from its root)."""
    return Path(recipe) if Path(recipe).is_absolute() else ROOT / recipe


def define_recipe_variant(name: str, path: str, base_recipe: str = RECIPE) -> str:
    """Variant ``name``: the recipe config at ``path`` as overrides on ``base_recipe`` (--recipe), its
    teacher text read from the study's corpus where the job would sample it (after the recipe's
    sources), its budget the recipe's unless --budget says otherwise. So a candidate recipe
    (research/recipe_from_sweep.py) trains in a round beside the others."""
    from linearard_ray.config import load_config

    if name in VARIANTS:
        raise SystemExit(f"restoration_study.py: --recipe-variant {name!r} is already a variant")
    if not Path(path).is_file():
        raise SystemExit(f"restoration_study.py: --recipe-variant {name}: no recipe at {path}")
    recipe = load_config(path).model_dump(mode="json")
    if recipe["data"]["teacher_samples"]:
        recipe["data"]["sources"] = [*recipe["data"]["sources"], TEACHER_SAMPLES]
    base = load_config(recipe_path(base_recipe)).model_dump(mode="json")
    changes = training_changes(recipe, base)
    if recipe["train"]["budget_tokens"] != base["train"]["budget_tokens"]:
        changes["train.budget_tokens"] = recipe["train"]["budget_tokens"]  # --budget comes later and wins
    overrides = [f"{k}={json.dumps(v)}" for k, v in changes.items()]
    VARIANTS[name] = (overrides, f"the recipe {path}")
    return name


HEAD_LOG = "ray-head.log"


# --------------------------------------------------------------------------- commands


def variant_sets(name: str, work: Path, budget: int | None, extra: list[str], gpu_fraction: float | None) -> list[str]:
    overrides, _ = VARIANTS[name]
    sets = [
        f"train.run_name=study-{name}",
        f"train.storage_path={work}/ray",
        f"train.output_dir={work}/students",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        *(o.replace("{work}", str(work)) for o in overrides),
        *extra,
    ]
    if budget:
        sets.append(f"train.budget_tokens={budget}")
    if gpu_fraction is not None:
        sets.append(f"train.gpus_per_worker={gpu_fraction:g}")
    return sets


def distill_cmd(recipe: str, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "pipelines/distill.py", "--config", recipe]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def validate(recipe: str, sets: list[str]):
    """The variant's Config (pydantic), so a bad override fails before anything starts; None when
    the package cannot be imported here."""
    try:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from linearard_ray.config import load_config
    except ImportError as e:  # pragma: no cover - a host without pydantic/yaml
        print(f"   (configuration not validated: {e})", flush=True)
        return None
    return load_config(recipe_path(recipe), sets)


def _quote(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


# --------------------------------------------------------------------------- local Ray head


def detect_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except Exception:
        return 0


def gpu_share(gpus: int, jobs: int) -> float:
    """The GPU share of each of ``jobs`` concurrent runs on ``gpus`` GPUs. Ray fills one GPU with
    fractional shares before it opens the next, so a share of 1/jobs would stack every run on GPU 0;
    1/ceil(jobs/GPUs) (rounded down to Ray's 1e-4 resolution) lets each GPU take its even part of
    the runs, and no share straddles two GPUs."""
    return int(10000 / -(-jobs // gpus)) / 10000


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (the session this script gave the head it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) == sid and (d / "stat").read_text().split(") ")[-1][:1] != "Z":
                pids.append(int(d.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def _auth_token_available() -> bool:
    """Whether Ray would find an auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return bool(Path(path).read_text().strip())
    except OSError:
        return False


class RayHead:
    """One `ray start --head --block` process in a session of its own; `stop()` ends that session."""

    def __init__(self, gpus: int, cpus: int, work: Path):
        self.gpus, self.cpus, self.work = gpus, cpus, work
        self.port, client_port, agent_port = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        # Short path: Ray puts unix sockets under it (108-byte limit); its own dir, so this head
        # does not replace /tmp/ray/ray_current_cluster, which ray.init() without an address reads.
        self.temp_dir = f"/tmp/rstudy-{self.port}"
        self.cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ray-client-server-port",
            str(client_port),
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--num-gpus",
            str(gpus),
            "--num-cpus",
            str(cpus),
            "--include-dashboard=false",
            "--temp-dir",
            self.temp_dir,
            "--disable-usage-stats",
        ]
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """What the head (and so every Ray worker it starts) and the jobs run with: this checkout
        importable, and one explicit RAY_AUTH_MODE. Left unset, `ray start` turns token auth on
        when a token exists (~/.ray/auth_token), while a driver given RAY_ADDRESS never does and
        is refused; so the mode `ray start` would pick is set for both sides."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("RAY_AUTH_MODE", "token" if _auth_token_available() else "disabled")
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.work / HEAD_LOG, "w")
        print(f"== ray head: {_quote(self.cmd)}", flush=True)
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {self.proc.returncode}; see {self.work / HEAD_LOG}:\n"
                    + (self.work / HEAD_LOG).read_text(errors="replace")[-3000:]
                )
            if "Ray runtime started" in (self.work / HEAD_LOG).read_text(errors="replace"):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                        print(
                            f"   ray head up at {self.address} ({self.gpus} GPU, {self.cpus} CPU) "
                            f"in {time.time() - t0:.0f}s; RAY_AUTH_MODE={self.env()['RAY_AUTH_MODE']}; "
                            f"temp dir {self.temp_dir}",
                            flush=True,
                        )
                        return
                except OSError:
                    pass
            time.sleep(1)
        raise RuntimeError(f"ray head not up after {timeout:.0f}s; see {self.work / HEAD_LOG}")

    def stop(self) -> None:
        if self.proc is None:
            return
        sid = self.proc.pid  # start_new_session: the head's session id is its pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block shuts its processes down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.time() + 30
        left = _session_pids(sid)
        while left and time.time() < deadline:
            time.sleep(1)
            left = _session_pids(sid)
        for pid in left:  # stragglers of this head only (same session), by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(
            f"== ray head {self.address} stopped (rc {self.proc.returncode}"
            f"{f', {len(left)} leftover processes killed' if left else ''})",
            flush=True,
        )
        self.proc = None


# --------------------------------------------------------------------------- running variants


class _Stop(Exception):
    """SIGTERM or SIGINT, raised in the main thread so the cleanup runs."""


def _on_signal(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _tok_s(text: str) -> tuple[float | None, float | None]:
    tps = [float(x) for x in re.findall(r"([0-9.]+) tok/s", text)]
    if not tps:
        return None, None
    steady = tps[len(tps) // 10 :]  # drop the first 10% (warm-up, compilation)
    return tps[-1], round(statistics.median(steady), 1)


def _planned_tokens(text: str) -> int | None:
    m = re.search(r"\[distill\] run \S+: (\d+) steps × (\d+) tokens", text)
    return int(m.group(1)) * int(m.group(2)) if m else None


def _stamp(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


class Job:
    def __init__(self, name: str, cmd: list[str], sets: list[str], work: Path):
        self.name, self.cmd, self.sets, self.work = name, cmd, sets, work
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0

    def start(self, env: dict[str, str]) -> None:
        print(f"== {self.name}: {VARIANTS[self.name][1]}\n   {' '.join(self.cmd)}", flush=True)
        self.t0 = time.time()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session/process group (start_new_session)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def record(self, parallel: int, interrupted: bool = False) -> dict:
        t1 = time.time()
        wall = t1 - self.t0
        rc = self.proc.returncode
        text = self.log.read_text(errors="replace")
        last, median = _tok_s(text)
        tokens = _planned_tokens(text)
        rec = {
            "variant": self.name,
            "description": VARIANTS[self.name][1],
            "overrides": self.sets,
            "returncode": rc,
            "wall_s": round(wall, 1),
            "tokens_per_s_last": last,
            "tokens_per_s_median": median,
            "tokens_planned": tokens,
            "parallel": parallel,
            "started": _stamp(self.t0),
            "finished": _stamp(t1),
            "student": str(self.work / "students" / f"study-{self.name}" / "merged"),
        }
        if interrupted:
            rec["interrupted"] = True
        print(
            f"   {self.name}: rc={rc} wall={wall:.0f}s tok/s(last)={last} tok/s(median)={median}"
            f"{' (interrupted)' if interrupted else ''}",
            flush=True,
        )
        # Without the dashboard (State API) Ray Train's PlacementGroupCleaner warns every few
        # seconds; keep those lines in the log file but out of the summary.
        lines = [x for x in text.splitlines() if "State API may be temporarily unavailable" not in x]
        if rc != 0 and not interrupted:
            print("\n".join(lines)[-3000:], flush=True)
        print("\n".join(lines[-6:]), flush=True)
        with open(self.work / "runs.jsonl", "a") as f:  # only this process writes it
            f.write(json.dumps(rec) + "\n")
        return rec


def _last_step(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if "[distill] step" in x]
    except OSError:
        return ""
    return lines[-1].split("[distill] ", 1)[-1] if lines else "(starting)"


def parse_seeds(text: str) -> list[int]:
    """'0-5' or '0,2,7' (or a mix: '0-2,9') -> the seeds in order, each once."""
    out: list[int] = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            rng = range(int(lo), int(hi) + 1) if hi else [int(lo)]
        except ValueError:
            raise SystemExit(f"restoration_study.py: --seeds {text!r}: give seeds as '0-5' or '0,2,7'") from None
        if hi and int(hi) < int(lo):
            raise SystemExit(f"restoration_study.py: --seeds {text!r}: range {part} runs backwards")
        out += [k for k in rng if k not in out]
    if not out or min(out) < 0:
        raise SystemExit(f"restoration_study.py: --seeds {text!r}: need one or more seeds >= 0")
    return out


def expand_seeds(names: list[str], seeds: list[int]) -> list[str]:
    """Each variant trained once per seed: seed 0 is the variant as defined, seed k its '-s<k>'
    twin (another LoRA init and block order), defined here when the table has none. A recipe is
    compared over its trainings (the study's recipe table groups the '-s<k>' names); one training
    is one draw."""
    out = []
    for name in names:
        base = SEED_SUFFIX.sub("", name)
        base = base if base in VARIANTS else name
        for k in seeds:
            twin = base if k == 0 else seeded_twin(f"{base}-s{k}")
            if twin not in out:
                out.append(twin)
    return out


def seeded_twin(name: str) -> str:
    """``name`` itself, defining it first when it is '<variant>-s<k>' of a known variant: one
    --variants list can then give each recipe its own seeds (cpt,cpt-s1 beside three of another)."""
    m = SEED_SUFFIX.search(name)
    if name not in VARIANTS and m and name[: m.start()] in VARIANTS:
        VARIANTS[name] = _seeded(VARIANTS[name[: m.start()]], int(m.group(0)[2:]))
    return name


def _variant_names(a) -> list[str]:
    """The variants --variants and --seeds name, each defined (seeded twins included) or refused."""
    names = list(VARIANTS) if a.variants == "all" else [seeded_twin(v) for v in a.variants.split(",")]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"restoration_study.py: unknown variants {bad}; choose from {list(VARIANTS)} or 'all'")
    return expand_seeds(names, parse_seeds(a.seeds)) if a.seeds else names


def _shared_head(a, n: int, work: Path) -> tuple[RayHead | None, float | None]:
    """The Ray head that ``n`` > 1 concurrent runs share, and each run's GPU share (None: serial runs
    each start their own local Ray, or the head has no GPU)."""
    if n <= 1:
        return None, None
    gpus = a.gpus if a.gpus is not None else detect_gpus()
    # Each concurrent run holds 1 CPU for its Train worker and needs more for Ray Data reading.
    cpus = a.ray_cpus or max(os.cpu_count() or 1, 2 * n + 2)
    return RayHead(gpus, cpus, work), (gpu_share(gpus, n) if gpus > 0 else None)


def _variant_summary(cfg) -> str:
    t, lo = cfg.train, cfg.lora
    return (
        f"rope {cfg.rope.type}×{cfg.rope.factor:g}; "
        f"objective {cfg.objective.name} (relation {cfg.objective.relation.weight:g}, "
        f"logits {cfg.objective.logits.weight:g}, next-token {cfg.objective.next_token.weight:g}); "
        f"{'LoRA r=' + str(lo.r) if lo.enabled else 'full fine-tuning'} on {','.join(lo.target_modules)}; "
        f"lr {t.lr:g}; dtype {cfg.model.dtype}, precision {t.precision}; budget {t.budget_tokens} tokens; "
        f"GPU share {t.gpus_per_worker:g}"
    )


def _missing_inputs(sets: list[str], work: Path) -> list[str]:
    """Each file under --work that a variant's overrides read (the teacher corpus, unixdocs) and
    that is not there yet, with how to make it."""
    paths = {t.format(work=work): how for t, how in MAKE_INPUT.items()}
    return [f"{p} ({how})" for p, how in paths.items() if any(p in s for s in sets) and not Path(p).exists()]


def _validated_jobs(a, names: list[str], work: Path, gpu_fraction: float | None) -> list[Job]:
    """One Job per variant, its configuration and input files checked first so that a bad override
    or a missing corpus stops the study before anything starts (a dry run names what is missing
    and prints what each variant trains)."""
    jobs = []
    for name in names:
        sets = variant_sets(name, work, a.budget, a.extra, gpu_fraction)
        try:
            cfg = validate(a.recipe, sets)
        except ValueError as e:  # ConfigError
            raise SystemExit(f"restoration_study.py: variant {name}: {e}") from None
        missing = "; ".join(_missing_inputs(sets, work))
        if missing and not a.dry_run:
            raise SystemExit(f"restoration_study.py: variant {name} reads what is not there: {missing}")
        if missing:
            print(f"   {name}: needs {missing}", flush=True)
        jobs.append(Job(name, distill_cmd(a.recipe, sets), sets, work))
        if cfg is not None and a.dry_run:
            print(f"   {name}: {_variant_summary(cfg)}", flush=True)
    return jobs


def _print_train_plan(jobs: list[Job], head: RayHead | None, n: int) -> None:
    if head is not None:
        print(
            f"== dry run, --parallel {n}: would start the Ray head (env PYTHONPATH={ROOT}:..., "
            f"RAY_AUTH_MODE={head.env()['RAY_AUTH_MODE']})\n   {_quote(head.cmd)}\n"
            f"   then run these with RAY_ADDRESS={head.address}, at most {n} at a time, and stop the head:",
            flush=True,
        )
    else:
        print("== dry run, serial: would run these one after the other, each starting its own local Ray:", flush=True)
    for j in jobs:
        print(f"   [{j.name}] {_quote(j.cmd)}", flush=True)


def _poll_jobs(jobs: list[Job], env: dict, n: int, status_every: float, running: list[Job], rcs: list[int]) -> None:
    """Run ``jobs``, at most ``n`` at a time, until all have ended. ``running`` and ``rcs`` are the
    caller's, so that an interruption knows which jobs to stop and what has already ended."""
    queue = list(jobs)
    last_status = time.time()
    while queue or running:
        while queue and len(running) < n:
            job = queue.pop(0)
            job.start(env)
            running.append(job)
        time.sleep(2 if n > 1 else 1)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            rcs.append(job.record(n)["returncode"])
        if n > 1 and running and time.time() - last_status > status_every:
            last_status = time.time()
            for job in running:
                print(f"   .. {job.name} ({time.time() - job.t0:.0f}s): {_last_step(job.log)}", flush=True)


def _stop_running(running: list[Job], n: int, interrupted: str | None, rcs: list[int]) -> None:
    if running:
        print(
            f"== {'interrupted (' + interrupted + ')' if interrupted else 'error'}; "
            f"stopping {len(running)} running job(s)",
            flush=True,
        )
    for job in running:
        job.kill()
        if interrupted:
            rcs.append(job.record(n, interrupted=True)["returncode"])
    if interrupted:
        rcs.append(130)


def _run_jobs(jobs: list[Job], head: RayHead | None, n: int, a) -> list[int]:
    """Every job's return code; on SIGINT/SIGTERM or an error the running jobs and the head are
    stopped, and an interruption adds 130."""
    # SIGINT too: a shell starts background jobs with SIGINT ignored, where Python would never
    # raise KeyboardInterrupt.
    old_handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    running: list[Job] = []
    rcs: list[int] = []
    interrupted = None
    try:
        env = dict(os.environ)
        if head is not None:
            head.start()
            env = head.env()
            env["RAY_ADDRESS"] = head.address
            _init_tracking(jobs, a.recipe)
        _poll_jobs(jobs, env, n, a.status_every, running, rcs)
    except (KeyboardInterrupt, _Stop) as e:
        interrupted = str(e) or type(e).__name__
    finally:
        for sig in old_handlers:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        _stop_running(running, n, interrupted, rcs)
        if head is not None:
            head.stop()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    return rcs


def _archive_logs(work: Path, out: Path) -> None:
    """<work>/*.log as one logs.tar.gz in ``out``."""
    logs = sorted(work.glob("*.log"))
    if logs:
        subprocess.run(["tar", "-czf", str(out / "logs.tar.gz"), "-C", str(work), *[x.name for x in logs]])


def run_train(a, work: Path) -> int:
    names = _variant_names(a)
    n = max(1, a.parallel)
    head, gpu_fraction = _shared_head(a, n, work)
    jobs = _validated_jobs(a, names, work, gpu_fraction)
    if a.dry_run:
        _print_train_plan(jobs, head, n)
        return 0
    rcs = _run_jobs(jobs, head, n, a)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        if (work / "runs.jsonl").exists():
            shutil.copy(work / "runs.jsonl", Path(a.out) / "runs.jsonl")
        _archive_logs(work, Path(a.out))
    bad_rcs = [r for r in rcs if r != 0]
    return (max(bad_rcs) if max(bad_rcs) > 0 else 1) if bad_rcs else 0


def _init_tracking(jobs: list[Job], recipe: str) -> None:
    """Create the MLflow store and experiment once, before several jobs open it at the same time."""
    done = set()
    for job in jobs:
        try:
            cfg = validate(recipe, job.sets)
            if cfg is None or not cfg.tracking.enabled:
                continue
            key = (cfg.tracking.resolved_uri(), cfg.tracking.experiment)
            if key in done:
                continue
            from linearard_ray.tracking import ensure_experiment

            ensure_experiment(*key)
            done.add(key)
        except Exception as e:  # the jobs still try themselves
            print(f"   (could not initialise MLflow for {job.name}: {type(e).__name__}: {e})", flush=True)


# --------------------------------------------------------------------------- eval


UNTRAINED_MODELS = [
    {"name": "teacher", "path": "smollm2-135m"},
    {"name": "PI×4", "path": "smollm2-135m", "rope": {"type": "linear", "factor": 4.0}},
    {"name": "YaRN×4", "path": "smollm2-135m", "rope": {"type": "yarn", "factor": 4.0}},
]


def _warn_unrecorded(work: Path, runs: list[dict]) -> None:
    """A variant with a log but no record is still training or exporting (or was killed): say so,
    or the report silently lacks it."""
    recorded = {r["variant"] for r in runs}
    pending = sorted(
        p.stem for p in work.glob("*.log") if SEED_SUFFIX.sub("", p.stem) in VARIANTS and p.stem not in recorded
    )  # --seeds twins too
    if pending:
        print(
            f"== eval: WARNING no finished record for {pending} (still running, or killed); "
            "they are not in this report",
            flush=True,
        )


def _eval_models(runs: list[dict], only: list[str] | None) -> list[dict]:
    """The untrained references and the latest finished student of each variant, or those --only names."""
    models = [dict(m) for m in UNTRAINED_MODELS]
    seen = set()
    for r in reversed(runs):  # latest run of each variant
        if r["returncode"] == 0 and r["variant"] not in seen and Path(r["student"]).exists():
            seen.add(r["variant"])
            models.append({"name": r["variant"], "path": r["student"]})
    if not only:
        return models
    # Long-context jobs dominate the wall time; the untrained baselines' long figures do not
    # change between rounds (same windows, seeds and prompts), so a round may skip them.
    unknown = sorted(set(only) - {m["name"] for m in models})
    if unknown:
        raise SystemExit(
            f"restoration_study.py: --only names {unknown} that are not among the models {[m['name'] for m in models]}"
        )
    # evaluate.py measures recovery and relation KL against the model named "teacher" (else the
    # first one), so the teacher stays whatever --only says; its jobs are the cheap ones.
    return [m for m in models if m["name"] in only or m["name"] == "teacher"]


def _eval_cmd(work: Path, models: list[dict], extra: list[str], recipe: str, jobs_per_gpu: int) -> list[str]:
    cmd = [
        sys.executable,
        "pipelines/evaluate.py",
        "--config",
        recipe,
        "--set",
        f"eval.models={json.dumps(models)}",
        "--set",
        f"eval.output_dir={work}/eval",
        "--set",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        *sum((["--set", e] for e in extra), []),
    ]
    if jobs_per_gpu > 1:  # 135M models leave the GPU mostly idle: several (model, length) jobs at once
        cmd += ["--jobs-per-gpu", str(jobs_per_gpu)]
    return cmd


def _archive_eval(work: Path, out: Path, rc: int) -> None:
    """The report, runs.jsonl, the plots and logs (as archives) and, after a clean run, tables.md."""
    out.mkdir(parents=True, exist_ok=True)
    for p in [work / "eval" / "report.md", work / "eval" / "report.json", work / "runs.jsonl"]:
        if p.exists():
            shutil.copy(p, out / p.name)
    pngs = sorted((work / "eval").glob("*.png"))
    if pngs:
        subprocess.run(["tar", "-czf", str(out / "plots.tar.gz"), "-C", str(work / "eval"), *[p.name for p in pngs]])
    _archive_logs(work, out)
    if rc == 0 and (work / "eval" / "report.json").exists():
        (out / "tables.md").write_text(
            render_tables(json.loads((work / "eval" / "report.json").read_text()), _read_runs(work / "runs.jsonl"))
        )


def run_eval(
    work: Path,
    out: Path | None,
    extra: list[str],
    recipe: str,
    dry_run: bool = False,
    jobs_per_gpu: int = 1,
    only: list[str] | None = None,
) -> int:
    runs = _read_runs(work / "runs.jsonl")
    _warn_unrecorded(work, runs)
    cmd = _eval_cmd(work, _eval_models(runs, only), extra, recipe, jobs_per_gpu)
    print("== eval:", _quote(cmd), flush=True)  # quoted: the models' JSON holds spaces
    if dry_run:
        return 0
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    print(f"   eval rc={rc} wall={time.time() - t0:.0f}s", flush=True)
    if out is not None:
        _archive_eval(work, out, rc)
    return rc


# --------------------------------------------------------------------------- table


def _read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _len_label(L: int | str) -> str:
    L = int(L)
    if L % 1024 == 0:
        return f"{L // 1024}K"
    if L % 1000 == 0:
        return f"{L // 1000}K"
    return str(L)


def _domain_label(info: dict) -> str:
    names = []
    for s in info.get("sources", []):
        base = s.split(":", 1)[-1] if s.startswith("builtin:") else Path(s).name
        base = base.split("/", 1)[0]
        names.append("SOTU" if base == "sotu" else base)
    return "+".join(names) or "?"


def _table_head(head: list[str]) -> list[str]:
    """A markdown table's header row and its separator."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _ppl4(v: float) -> str:
    """Short-text perplexity as research/LOG.md writes it: 26.97, 119.4."""
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def _ppl3(v: float) -> str:
    """Long-context perplexity, three significant digits: 6.98, 24.0, 283."""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _acc(v: float | None) -> str:
    return "–" if v is None else ("0" if v == 0 else f"{v:.2f}")


def _model_label(m: dict, report: dict) -> str:
    ref = report["reference"]
    if m["name"] == ref["teacher"]:
        return f"{m['name']} (native)"
    untrained = isinstance(m.get("rope"), dict) and m.get("path") == next(
        (x["path"] for x in report["models"] if x["name"] == ref["teacher"]), None
    )
    return f"{m['name']}, untrained" if untrained else m["name"]


def _short_text_table(report: dict, short: list[str], dlabel: dict[str, str]) -> list[str]:
    """Perplexity and recovery of every model at the short lengths, one column per domain and length."""
    teacher = report["reference"]["teacher"]
    cols = [(d, L) for d in report["domains"] for L in short]
    out = [
        "Perplexity (recovery = teacher ppl ÷ model ppl):",
        "",
        *_table_head(["model", *(f"{dlabel[d]} @{L}" for d, L in cols)]),
    ]
    for m in report["models"]:
        cells = []
        for d, L in cols:
            v = report["nll"].get(d, {}).get(m["name"], {}).get(L)
            if v is None:
                cells.append("–")
                continue
            r = report["restoration"].get(d, {}).get(m["name"], {}).get(L)
            cells.append(
                _ppl4(v["ppl"])
                if m["name"] == teacher or r is None
                else f"{_ppl4(v['ppl'])} ({r['recovery_pct']:.1f}%)"
            )
        out.append(f"| {_model_label(m, report)} | " + " | ".join(cells) + " |")
    return out


def _long_context_table(report: dict, long: list[str], dlabel: dict[str, str]) -> list[str]:
    """Long-context perplexity per domain and passkey accuracy per length; nothing when neither ran."""
    domains = report["domains"]
    pk_lengths = sorted({int(L) for pk in report.get("passkey", {}).values() for L in pk["lengths"]})
    head = [f"{dlabel[d]} {' / '.join(_len_label(L) for L in long)}" for d in domains] if long else []
    if pk_lengths:
        head.append(f"passkey {' / '.join(_len_label(L) for L in pk_lengths)}")
    if not head:
        return []
    out = [
        "",
        "Long context (perplexity) and passkey (accuracy over depths × trials per length):",
        "",
        *_table_head(["model", *head]),
    ]
    for m in report["models"]:
        cells = []
        for d in domains if long else []:
            by_len = report["nll"].get(d, {}).get(m["name"], {})
            cells.append(" / ".join(_ppl3(by_len[L]["ppl"]) if L in by_len else "–" for L in long))
        if pk_lengths:
            acc = (report.get("passkey", {}).get(m["name"]) or {}).get("accuracy_by_length", {})
            cells.append(" / ".join(_acc(acc.get(str(L))) for L in pk_lengths))
        out.append(f"| {_model_label(m, report)} | " + " | ".join(cells) + " |")
    return out


def _count(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _training_runs_table(runs: list[dict]) -> list[str]:
    """The latest record of each variant, in first-run order; nothing without runs."""
    if not runs:
        return []
    latest: dict[str, dict] = {}
    for r in runs:
        latest.pop(r["variant"], None)
        latest[r["variant"]] = r
    out = [
        "",
        "Training runs (latest of each variant; wall time includes Ray start, model load and export; "
        "tok/s from the step lines; --parallel = how many jobs could share the GPU):",
        "",
        *_table_head(["variant", "what", "rc", "wall s", "tok/s last", "tok/s median", "--parallel"]),
    ]
    for v in dict.fromkeys(r["variant"] for r in runs):
        r = latest[v]
        rc = f"{r['returncode']}{' (interrupted)' if r.get('interrupted') else ''}"
        out.append(
            f"| {v} | {r.get('description', '')} | {rc} | {r['wall_s']:.0f} | {_count(r.get('tokens_per_s_last'))} | "
            f"{_count(r.get('tokens_per_s_median'))} | {r.get('parallel', 1)} |"
        )
    return out


def render_tables(report: dict, runs: list[dict]) -> str:
    dlabel = {d: _domain_label(info) for d, info in report["domains"].items()}
    short = [str(L) for L in report["short_lengths"]]
    long = [str(L) for L in report["long_lengths"] if str(L) not in short]
    out = [
        *_short_text_table(report, short, dlabel),
        *_long_context_table(report, long, dlabel),
        *_training_runs_table(runs),
    ]
    return "\n".join(out) + "\n"


def read_job_records(paths: list[Path], apart: bool = False) -> list[dict]:
    """Finished evaluation jobs from `evaluate.py`'s <output_dir>/jobs.jsonl files, later files winning.

    These are what is left when a machine is taken back before the report is written, and they
    let rounds that share windows and seeds (every round of this study) be tabled together.

    With ``apart``, a model that a later file trained again (a name seen in an earlier file, other
    than the untrained references) keeps both trainings: the later one is named "<model> (r<round>)",
    the round taken from a "..._study<round>_jobs" file name or, for a study's jobs.jsonl under
    research/results/, from RESULTS_ROUND (the research log's round of that folder), else the file's
    place in ``paths``.
    A file seeded with an earlier file's records (so that the teacher's jobs are reused) carries
    those records unchanged: they are the same evaluations, not new trainings, and are kept once.
    The records do not name the checkpoint, so a trained model scored again in a later round on new
    jobs would count as a new training; in this study no trained model outlives its round.
    """
    if not apart:
        return list(_latest_per_job(paths).values())
    out: list[dict] = []
    seen: set[str] = set()
    for i, path in enumerate(paths, 1):
        m = re.search(r"study(\w+?)_jobs", Path(path).stem)
        tag = "r" + (m.group(1) if m else _results_round(Path(path)) or str(i))
        recs = []
        for r in _latest_per_job([path]).values():
            if (text := json.dumps(r, sort_keys=True)) not in seen:
                seen.add(text)
                recs.append(r)
        again = {r["model"] for r in out} & {r["model"] for r in recs} - UNTRAINED
        out += [dict(r, model=f"{r['model']} ({tag})") if r["model"] in again else r for r in recs]
    return out


# the same model, and so the same figures, in every round
UNTRAINED = {m["name"] for m in UNTRAINED_MODELS}
RESULTS = Path(__file__).resolve().parent / "results"
# research/results/<study>/jobs.jsonl: the round of research/LOG.md each folder holds, for the
# "(r<round>)" names that keep a retrained model apart (once taken from "smollm2_study<round>_jobs")
RESULTS_ROUND = {
    "next-token-weight": "5",
    "docs-genre": "6",
    "next-token-weight-4": "7a",
    "pi4-restore-docs": "7",
    "retraining-spread": "8",
    "pi4-ce22-seeds": "9",
    "yarn4-restore": "10",
    "attention-map": "11",
    "attention-map-seeds": "12",
    "pi4-restore-long": "13",
    "unseen-baselines": "u",  # untrained models only, on the study preset's windows (not a training round)
    "unseen-genre-round": "14",
    "yarn4-genre-round": "15",
    "pi4-general-long": "16",
}


def _results_round(path: Path) -> str | None:
    """The round of a study's jobs.jsonl under research/results/, else None."""
    path = path.resolve()
    if path.name != "jobs.jsonl" or path.parent.parent != RESULTS:
        return None
    return RESULTS_ROUND.get(path.parent.name)


ROUND_TAG = re.compile(r" \(r\w+\)$")


def _latest_per_job(paths: list[Path]) -> dict[tuple, dict]:
    from linearard_ray.evaluation.job_log import JobLog

    by_job: dict[tuple, dict] = {}
    for path in paths:
        for r in JobLog(path).results():  # torn lines skipped, the file left as it is
            if r.get("kind") == "nll":
                by_job[(r["model"], "nll", r["domain"], int(r["length"]))] = r
            elif r.get("kind") == "passkey":  # rounds with more trials per depth are kept apart
                by_job[(r["model"], "passkey", len(r["results"]), int(r["length"]))] = r
    return by_job


def job_figures(records: list[dict]) -> tuple[dict[tuple, float], dict[tuple, float]]:
    """From evaluation job records: perplexity per (model, domain, length) and passkey accuracy per
    (model, prompts per length, length)."""
    ppl: dict[tuple, float] = {}
    acc: dict[tuple, float] = {}
    for r in records:
        if r["kind"] == "nll":
            ppl[(r["model"], r["domain"], int(r["length"]))] = math.exp(r["nll_sum"] / r["tokens"])
        elif r["kind"] == "passkey":
            n = len(r["results"])
            acc[(r["model"], n, int(r["length"]))] = sum(bool(x["correct"]) for x in r["results"]) / n
    return ppl, acc


def render_job_tables(
    records: list[dict],
    domains: dict[str, str],
    teacher: str = "teacher",
    baseline: str = "YaRN×4",
    versus: str = "cpt",
) -> str:
    """Perplexity per (domain, length) and passkey accuracy per length, one row per model.

    Recovery (teacher ppl ÷ model ppl) is given where the teacher's figure at that length is among
    the records and the length is within the teacher's window; a dash marks a job that did not finish.
    Passkey adds each model's total and, where ``baseline`` answered the same prompts, the prompts
    only one of the two got right and the sign test's p (linearard_ray.evaluation.paired_stats). Where the records
    keep per-window NLL, a last table compares each model with ``versus`` window by window.
    """
    models = list(dict.fromkeys(r["model"] for r in records))
    ppl, acc = job_figures(records)
    # Recovery compares within the teacher's window only: past it the native teacher is not a reference
    window = max((r.get("max_position_embeddings") or 0 for r in records if r["model"] == teacher), default=0)
    doms = [d for d in domains if any(k[1] == d for k in ppl)] + sorted({k[1] for k in ppl} - set(domains))
    lengths = sorted({k[2] for k in ppl})
    pk_lengths = sorted({k[2] for k in acc})
    cols = [(d, L) for d in doms for L in lengths]
    out = [
        "Perplexity (recovery = teacher ppl ÷ model ppl where the teacher ran at that length):",
        "",
        *_table_head(["model", *(f"{domains.get(d, d)} @{_len_label(L)}" for d, L in cols)]),
    ]
    for m in models:
        cells = []
        for d, L in cols:
            v, t = ppl.get((m, d, L)), ppl.get((teacher, d, L)) if not window or L <= window else None
            cells.append(
                "–" if v is None else _ppl4(v) if t is None or m == teacher else f"{_ppl4(v)} ({100 * t / v:.1f}%)"
            )
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    trials: dict[tuple[str, int], dict[int, list[dict]]] = {}  # (model, prompts per length) -> length -> trials
    for r in records:
        if r["kind"] == "passkey":
            trials.setdefault((r["model"], len(r["results"])), {})[int(r["length"])] = r["results"]
    for n in sorted({k[1] for k in acc}):
        for field, title in (
            ("correct", f"Passkey (accuracy over {n} prompts per length: depths × trials):"),
            (
                "choice_correct",
                f"Passkey, forced choice (the true key scored above every distractor, "
                f"teacher-forced; {n} prompts per length):",
            ),
        ):
            out += _passkey_table(trials, n, field, title, models, pk_lengths, baseline)
        out += _logprob_table(trials, n, models, pk_lengths, baseline)
        out += _answers_table(trials, n, models)
    out += _recipe_table(models, ppl, trials, domains)
    out += _recipe_versus_table(models, records, trials, domains, baseline, versus)
    out += _unseen_tables(records, ppl, teacher, [baseline, versus])
    return "\n".join(out) + "\n" + _window_table(records, domains, versus)


KNOWN_DOMAINS = ("main", "other")  # SOTU and pydocs: the study's training genre and its first held-out one


def _unseen_tables(records: list[dict], ppl: dict[tuple, float], teacher: str, versus: list[str]) -> list[str]:
    """Recovery on the held-out genres (eval.preset=study's domains) per recipe, the mean over
    genres and the worst genre beside each, then each recipe against each of ``versus`` window by
    window. Recipes are compared over all their trainings (each window's NLL averaged over a side's
    trainings first); "all" pools the genres' windows, which weigh alike (the same count per genre)."""
    unseen, lengths, groups, win = _unseen_recipes(records, ppl, teacher)
    if not unseen or not lengths:
        return []
    head = ["recipe", "trainings"]
    for L in lengths:
        head += [*(f"{d} @{_len_label(L)}" for d in unseen), f"mean @{_len_label(L)}", f"worst @{_len_label(L)}"]
    head.append("lowest (any training, genre, length)")
    out = [
        "",
        "Recovery on the unseen genres (teacher ppl ÷ model ppl, %; recipes trained more than once: mean "
        "over trainings, range in brackets; worst: the genre whose mean is lowest; in square brackets the "
        "95% bootstrap interval over windows of the recipe's window NLLs averaged over its trainings):",
        "",
        *_table_head(head),
    ]
    for g, ms in groups.items():
        row = _unseen_row(ppl, win, teacher, ms, unseen, lengths)
        if row:
            out.append(f"| {g} | " + " | ".join(row) + " |")
    for other in versus:
        out += _unseen_versus_table(win, groups, unseen, lengths, other)
    return out


def _unseen_recipes(
    records: list[dict], ppl: dict[tuple, float], teacher: str
) -> tuple[list[str], list[int], dict[str, list[str]], dict[tuple, list[float]]]:
    """What the unseen-genre table and plot both start from: the held-out genres among the figures,
    the short lengths the teacher was scored at on them (within its own window: beyond it its
    perplexity explodes, and a ratio to it says nothing about restoration), each recipe's trainings
    (the teacher left out) and the per-window NLLs on those genres."""
    unseen = sorted({d for (_, d, _) in ppl if d not in KNOWN_DOMAINS})
    window = min(
        (r.get("max_position_embeddings") or 0 for r in records if r["model"] == teacher and r["kind"] == "nll"),
        default=0,
    )
    lengths = sorted({L for (m, d, L) in ppl if m == teacher and d in unseen and (not window or L <= window)})
    groups = _recipe_groups(list(dict.fromkeys(r["model"] for r in records)))
    groups.pop(teacher, None)
    return unseen, lengths, groups, _window_nlls(records, unseen)


def unseen_recovery_by_recipe(records: list[dict], teacher: str = "teacher") -> dict:
    """{recipe: {length: figures}} in the shape of evaluate's report["unseen_recovery"], each recipe
    as one model (its trainings' window NLLs averaged window by window, as the table's intervals
    are), so that the product's unseen_recovery plot draws the study's recipes."""
    unseen, lengths, groups, win = _unseen_recipes(records, job_figures(records)[0], teacher)
    out: dict = {}
    for recipe, models in groups.items():
        for L in lengths:
            figures = _pooled_recovery_ci(win, teacher, models, unseen, L)
            if figures:
                out.setdefault(recipe, {})[str(L)] = figures
    return out


def _window_nlls(records: list[dict], domains: list[str] | None = None) -> dict[tuple, list[float]]:
    """(model, domain, length) -> per-window NLLs, for the records that keep them (of ``domains``
    only, where given)."""
    return {
        (r["model"], r["domain"], int(r["length"])): r["window_nll"]
        for r in records
        if r["kind"] == "nll" and r.get("window_nll") and (domains is None or r["domain"] in domains)
    }


def _unseen_row(
    ppl: dict[tuple, float], win: dict, teacher: str, models: list[str], unseen: list[str], lengths: list[int]
) -> list[str] | None:
    """One recipe's cells after its name: trainings, then per length each genre, the mean and the
    worst genre, then the lowest single figure; None when no training has every genre's figure."""

    def recovery(m: str, d: str, L: int) -> float | None:
        v = ppl.get((m, d, L))
        return None if v is None else 100 * ppl[(teacher, d, L)] / v

    done = [m for m in models if all(recovery(m, d, L) is not None for d in unseen for L in lengths)]
    if not done:
        return None
    cells = [str(len(done))]
    for L in lengths:
        per_genre = {d: [recovery(m, d, L) for m in done] for d in unseen}
        worst = min(unseen, key=lambda d: sum(per_genre[d]))
        ci = _pooled_recovery_ci(win, teacher, done, unseen, L)
        mean = _one_or_spread([sum(recovery(m, d, L) for d in unseen) / len(unseen) for m in done])
        cells += [_one_or_spread(per_genre[d]) for d in unseen]
        cells.append(mean + (f" [{ci['mean']['ci'][0]:.1f}–{ci['mean']['ci'][1]:.1f}]" if ci else ""))
        cells.append(
            f"{worst} {sum(per_genre[worst]) / len(done):.1f}"
            + (f" [{ci['domains'][worst]['ci'][0]:.1f}–{ci['domains'][worst]['ci'][1]:.1f}]" if ci else "")
        )
    cells.append(f"{min(recovery(m, d, L) for m in done for d in unseen for L in lengths):.1f}")
    return cells


def _pooled_recovery_ci(win: dict, teacher: str, models: list[str], unseen: list[str], L: int) -> dict | None:
    """paired_stats.bootstrap_recovery over the unseen genres for the trainings' window NLLs
    averaged window by window (the recipe as one model); None where a window list is missing."""
    import numpy as np

    from linearard_ray.evaluation.paired_stats import bootstrap_recovery

    keys = [(m, d, L) for m in [teacher, *models] for d in unseen]
    if not all(k in win for k in keys):
        return None
    return bootstrap_recovery(
        {d: (win[(teacher, d, L)], np.mean([win[(m, d, L)] for m in models], axis=0)) for d in unseen}
    )


def _one_or_spread(xs: list[float]) -> str:
    return f"{xs[0]:.1f}" if len(xs) == 1 else spread(xs, "{:.1f}")


def _unseen_versus_table(
    win: dict, groups: dict[str, list[str]], unseen: list[str], lengths: list[int], versus: str
) -> list[str]:
    """Each recipe against ``versus``'s trainings on the unseen genres' windows (lower NLL is better)."""
    from linearard_ray.evaluation.paired_stats import pooled_windows

    base = groups.get(versus, [])
    cols = [(d, L) for L in lengths for d in (*unseen, "all")]

    def windows(m: str, d: str, L: int) -> list[float] | None:
        keys = [(m, g, L) for g in (unseen if d == "all" else [d])]
        return [x for k in keys for x in win[k]] if all(k in win for k in keys) else None

    def cell(ms: list[str], d: str, L: int) -> str:
        mine, theirs = [windows(m, d, L) for m in ms], [windows(m, d, L) for m in base]
        if not theirs or None in mine or None in theirs:
            return "–"
        v = pooled_windows(mine, theirs)
        return _window_diff_cell(v)

    rows = [(g, ms) for g, ms in groups.items() if g != versus and any(windows(m, "all", lengths[0]) for m in ms)]
    if not base or not rows:
        return []
    out = [
        "",
        f"Unseen genres against {versus} ({len(base)} training(s)), window by window: mean NLL difference in "
        "nats per token (negative: lower than it), windows better, sign-flip p; each side's trainings "
        "averaged per window first:",
        "",
        *_table_head(["recipe", "trainings", *(f"{d} @{_len_label(L)}" for d, L in cols)]),
    ]
    for g, ms in rows:
        out.append(f"| {g} | {len(ms)} | " + " | ".join(cell(ms, d, L) for d, L in cols) + " |")
    return out


def _window_diff_cell(v: dict | None) -> str:
    """A window-by-window comparison (paired_stats.paired_windows / pooled_windows) as a table cell:
    mean NLL difference, windows better, sign-flip p; a dash without one."""
    return "–" if v is None else f"{v['mean_diff']:+.4f} ({v['better']}/{v['windows']}, p {v['p_value']:.2g})"


SEED_SUFFIX = re.compile(r"-s\d+$")


def _recipe_table(
    models: list[str],
    ppl: dict[tuple, float],
    trials: dict[tuple[str, int], dict[int, list[dict]]],
    domains: dict[str, str],
) -> list[str]:
    """One row per recipe trained more than once (variants that differ only by a -s<seed> suffix):
    the mean and range over its trainings of the long-context perplexity on the first domain and of
    the passkey prompts answered (greedy, and forced choice where the trials have it). One training
    is one draw; this is the comparison a recipe claim needs. Empty when no recipe has two trainings."""
    groups = {g: ms for g, ms in _recipe_groups(models).items() if len(ms) > 1}
    if not groups:
        return []
    dom = next(iter(domains))
    longs = sorted({L for (_, d, L) in ppl if d == dom and L > 8192})
    most = {m: max((n for (mm, n) in trials if mm == m), default=None) for m in models}
    if not longs and not any(most[m] for ms in groups.values() for m in ms):
        return []  # a round of short text only: the unseen-genre table below is its recipe table

    def accuracy(ms: list[str], field: str) -> list[float]:
        out = []
        for m in ms:
            h = _hits(trials[(m, most[m])], field) if most[m] else None
            if h:
                out.append(h[0] / h[1])
        return out

    def logprob(ms: list[str]) -> list[float]:
        return [v for m in ms if most[m] and (v := _mean_field(trials[(m, most[m])], "key_logprob")) is not None]

    head = [
        "recipe",
        "trainings",
        *(f"{domains[dom]} @{_len_label(L)}" for L in longs),
        "passkey accuracy, greedy",
        "passkey accuracy, forced choice",
        "passkey mean log P(key)",
    ]
    lines = [
        "",
        "Recipes trained more than once (mean over trainings, range in brackets):",
        "",
        *_table_head(head),
    ]
    for g, ms in groups.items():
        cells = [
            g,
            str(len(ms)),
            *(spread([ppl[(m, dom, L)] for m in ms if (m, dom, L) in ppl]) for L in longs),
            spread(accuracy(ms, "correct")),
            spread(accuracy(ms, "choice_correct")),
            spread(logprob(ms)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """Mean of trainings' figures with their range in brackets; a dash without any."""
    return "–" if not xs else f"{fmt.format(sum(xs) / len(xs))} ({fmt.format(min(xs))} to {fmt.format(max(xs))})"


def _recipe_groups(models: list[str]) -> dict[str, list[str]]:
    """Recipe -> its trainings: the models that differ only by a -s<seed> suffix or by the round
    tag of a training repeated in a later round (read_job_records(..., apart=True))."""
    groups: dict[str, list[str]] = {}
    for m in models:
        groups.setdefault(recipe_of(m), []).append(m)
    return groups


def recipe_of(model: str) -> str:
    """The recipe a trained model is one training of: its name without the -s<seed> suffix and the
    round tag of a training repeated in a later round."""
    return SEED_SUFFIX.sub("", ROUND_TAG.sub("", model))


def _pooled_passkey_cell(ms: list[str], base_trials: list[dict], trials: dict, n: int | None, field: str) -> str:
    """A recipe's trainings ``ms`` against the baseline's on the passkey prompts, each prompt averaged
    over each side's trainings; a dash unless every training has the field scored."""
    from linearard_ray.evaluation.paired_stats import pooled_passkey

    mine = [trials[(m, n)] for m in ms if (m, n) in trials and _scored_trials(trials[(m, n)], field)]
    v = pooled_passkey(mine, base_trials, field) if len(mine) == len(ms) else None
    if v is None:
        return "–"
    return f"{v['recipe']:.2f} vs {v['baseline']:.2f} ({v['higher']}/{v['lower']}, p {v['p_value']:.2g})"


def _pooled_window_cell(ms: list[str], versus_ms: list[str], win: dict[tuple[str, int], list], L: int) -> str:
    """A recipe's trainings ``ms`` against ``versus_ms`` on the windows of length ``L``, each window
    averaged over each side's trainings; a dash unless every training has them."""
    from linearard_ray.evaluation.paired_stats import pooled_windows

    mine = [win[(m, L)] for m in ms if (m, L) in win]
    if len(mine) != len(ms):
        return _window_diff_cell(None)
    return _window_diff_cell(pooled_windows(mine, [win[(m, L)] for m in versus_ms if (m, L) in win]))


def _recipe_versus_table(
    models: list[str],
    records: list[dict],
    trials: dict[tuple[str, int], dict[int, list[dict]]],
    domains: dict[str, str],
    baseline: str,
    versus: str,
) -> list[str]:
    """One row per recipe trained more than once, against ``baseline``'s trainings on the passkey
    prompts and ``versus``'s on the long-context windows of the first domain. Each prompt's and each
    window's figure is averaged over each side's trainings before the sign-flip test
    (linearard_ray.evaluation.paired_stats.pooled_passkey / pooled_windows), so a recipe claim rests on every
    training, and the prompts, not the (training, prompt) pairs, are the draws."""
    groups = _recipe_groups(models)
    recipes = {g: ms for g, ms in groups.items() if len(ms) > 1 and g not in (baseline, versus)}
    if not recipes:
        return []
    dom = next(iter(domains))
    win = {
        (r["model"], int(r["length"])): r["window_nll"]
        for r in records
        if r["kind"] == "nll" and r["domain"] == dom and r.get("window_nll")
    }
    versus_ms = groups.get(versus, [])
    longs = sorted({L for (m, L) in win if L > 8192 and m in versus_ms})
    n = max((k[1] for k in trials if k[0] in groups.get(baseline, [])), default=None)
    base_trials = [trials[(m, n)] for m in groups.get(baseline, []) if (m, n) in trials]
    fields = [
        (f, t)
        for f, t in (("correct", "greedy"), ("choice_correct", "forced choice"), ("key_logprob", "log P(key)"))
        if base_trials and all(_scored_trials(t, f) for t in base_trials)
    ]
    if not fields and not longs:
        return []
    nb, nv = len(base_trials), len([m for m in versus_ms if any((m, L) in win for L in longs)])
    head = [
        "recipe",
        "trainings",
        *(f"passkey {t} vs {baseline} ({nb})" for _, t in fields),
        *(f"{domains[dom]} @{_len_label(L)} vs {versus} ({nv}): NLL diff" for L in longs),
    ]
    lines = [
        "",
        f"Recipes against the baselines, each prompt's and each window's figure averaged over each side's "
        f"trainings first (trainings in brackets; passkey: recipe vs {baseline}, prompts higher / lower; "
        "windows: mean NLL difference in nats per token, windows better; sign-flip p over prompts or windows):",
        "",
        *_table_head(head),
    ]
    for g, ms in recipes.items():
        cells = [
            g,
            str(len(ms)),
            *(_pooled_passkey_cell(ms, base_trials, trials, n, f) for f, _ in fields),
            *(_pooled_window_cell(ms, versus_ms, win, L) for L in longs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _scored_trials(by_len: dict[int, list[dict]], field: str) -> list[dict] | None:
    """A model's passkey trials over its lengths; None when one lacks ``field`` (a round from before
    it was scored)."""
    rows = [x for xs in by_len.values() for x in xs]
    return rows if all(field in x for x in rows) else None


def _mean_field(by_len: dict[int, list[dict]], field: str) -> float | None:
    """Mean of a numeric trial field over a model's passkey lengths; None when a trial lacks it."""
    rows = _scored_trials(by_len, field)
    return sum(float(x[field]) for x in rows) / len(rows) if rows else None


def _logprob_table(
    trials: dict[tuple[str, int], dict[int, list[dict]]], n: int, models: list[str], lengths: list[int], baseline: str
) -> list[str]:
    """Markdown lines: the true key's mean log-probability per length, and each model against
    ``baseline`` prompt by prompt (linearard_ray.evaluation.paired_stats.paired_logprob). It keeps ordering
    models once the forced choice saturates; none when no trial has the figure."""
    from linearard_ray.evaluation.paired_stats import paired_logprob

    have = {
        m: trials[(m, n)] for m in models if (m, n) in trials and _mean_field(trials[(m, n)], "key_logprob") is not None
    }
    if not have:
        return []
    base = have.get(baseline)
    out = [
        "",
        f"Passkey, the true key's log-probability after the question (teacher-forced, summed over the key's "
        f"tokens; mean over {n} prompts per length):",
        "",
        *_table_head(
            [
                "model",
                *(_len_label(L) for L in lengths),
                "all",
                *([f"vs {baseline}: higher / lower (mean diff)", "p"] if base else []),
            ]
        ),
    ]
    for m, mine in have.items():
        per_len = [_mean_field({L: mine[L]}, "key_logprob") if mine.get(L) else None for L in lengths]
        row = (
            f"| {m} | "
            + " | ".join("–" if v is None else f"{v:.2f}" for v in per_len)
            + f" | {_mean_field(mine, 'key_logprob'):.2f} |"
        )
        if base:
            v = None if m == baseline else paired_logprob(mine, base)
            row += f" {v['higher']} / {v['lower']} ({v['mean_diff']:+.2f}) | {v['p_value']:.2g} |" if v else " – | |"
        out.append(row)
    return out


def _answers_table(trials: dict[tuple[str, int], dict[int, list[dict]]], n: int, models: list[str]) -> list[str]:
    """Markdown lines: each model's greedy answers sorted into right / another number / no number
    (linearard_ray.evaluation.paired_stats.answer_kinds), and how many wrong numbers were the key with one
    doubled digit written once (PI's compressed positions blur neighbouring tokens)."""
    from linearard_ray.evaluation.paired_stats import answer_kinds

    out = [
        "",
        f"Passkey, greedy answers ({n} prompts per length, all lengths):",
        "",
        *_table_head(
            ["model", "right", "another number", "of which the key with a doubled digit written once", "no number"]
        ),
    ]
    for m in models:
        if (m, n) not in trials:
            continue
        rows = [x for xs in trials[(m, n)].values() for x in xs]
        k = answer_kinds(rows)
        dropped = sum(
            1 for x in rows if not x["correct"] and x.get("answer") and x["answer"] in _doubled_once(str(x["key"]))
        )
        out.append(f"| {m} | {k['right']} | {k['other_number']} | {dropped} | {k['no_number']} |")
    return out


def _doubled_once(key: str) -> set[str]:
    """The key with one run of a repeated digit written once less ('72933' -> {'7293'})."""
    return {key[:i] + key[i + 1 :] for i in range(1, len(key)) if key[i] == key[i - 1]}


def _hits(by_len: dict[int, list[dict]], field: str) -> tuple[int, int] | None:
    """(trials with ``field`` true, trials) over a model's passkey lengths; None when a trial lacks
    the field (a round from before it was scored)."""
    rows = _scored_trials(by_len, field)
    return None if rows is None else (sum(bool(x[field]) for x in rows), len(rows))


def _passkey_table(
    trials: dict[tuple[str, int], dict[int, list[dict]]],
    n: int,
    field: str,
    title: str,
    models: list[str],
    lengths: list[int],
    baseline: str,
) -> list[str]:
    """Markdown lines: per-length accuracy of ``field`` for the models whose n-prompt trials carry it,
    each paired with ``baseline`` prompt by prompt; none when no model has the field."""
    from linearard_ray.evaluation.paired_stats import paired_comparison

    have = {m: trials[(m, n)] for m in models if (m, n) in trials and _hits(trials[(m, n)], field)}
    if not have:
        return []
    base = have.get(baseline)
    out = [
        "",
        title,
        "",
        *_table_head(
            [
                "model",
                *(_len_label(L) for L in lengths),
                "correct / prompts",
                *([f"vs {baseline}: wins / losses (p)"] if base else []),
            ]
        ),
    ]
    for m, mine in have.items():
        per_len = [sum(bool(x[field]) for x in mine[L]) / len(mine[L]) if mine.get(L) else None for L in lengths]
        row = f"| {m} | " + " | ".join(_acc(a) for a in per_len) + " | {} / {} |".format(*_hits(mine, field))
        if base:
            v = None if m == baseline else paired_comparison(mine, base, field=field)
            row += f" {v['wins']} / {v['losses']} ({v['p_value']:.2g}) |" if v else " – |"
        out.append(row)
    return out


def _window_table(records: list[dict], domains: dict[str, str], versus: str) -> str:
    """Each model against ``versus`` on the same perplexity windows (records from evaluate.py runs that
    keep per-window NLL): mean NLL difference, windows won and the permutation p."""
    from linearard_ray.evaluation.paired_stats import paired_windows

    win = _window_nlls(records)
    cols = sorted({(d, L) for m, d, L in win if m == versus}, key=lambda c: (c[0] != "main", c[0], c[1]))
    models = [m for m in dict.fromkeys(k[0] for k in win) if m != versus]
    if not cols or not models:
        return ""
    out = [
        "",
        f"Against {versus}, window by window (mean NLL difference in nats per token, windows better, "
        "sign-flip permutation p):",
        "",
        *_table_head(["model", *(f"{domains.get(d, d)} @{_len_label(L)}" for d, L in cols)]),
    ]
    for m in models:
        cells = []
        for d, L in cols:
            v = paired_windows(win[(m, d, L)], win[(versus, d, L)]) if (m, d, L) in win else None
            cells.append(_window_diff_cell(v))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _plot_unseen(records: list[dict], path: str) -> int:
    from linearard_ray.evaluation.plots import plot_unseen

    unseen = unseen_recovery_by_recipe(records)
    if not unseen:
        print("restoration_study.py: --plot-unseen: the jobs hold no held-out genre's window NLLs", file=sys.stderr)
        return 2
    plot_unseen({"unseen_recovery": unseen}, Path(path))
    print(f"wrote {path}")
    return 0


def run_table(work: Path, report_path: str | None, runs_path: str | None) -> int:
    rp = Path(report_path) if report_path else work / "eval" / "report.json"
    if not rp.exists():
        print(f"restoration_study.py: no report at {rp} (run the eval phase, or pass --report)", file=sys.stderr)
        return 2
    report = json.loads(rp.read_text())
    runs = _read_runs(Path(runs_path) if runs_path else work / "runs.jsonl")
    print(render_tables(report, runs), end="")
    return 0


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_job_arguments(p)
    _add_run_arguments(p.add_argument_group("running (train, eval, sample)"))
    _add_table_arguments(p.add_argument_group("table"))
    return p


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The phase, the variants and what every job shares."""
    p.add_argument(
        "phase",
        choices=["sample", "train", "eval", "table"],
        help="sample: write <work>/teacher_samples.jsonl (pipelines/sample_teacher.py) for the tsample-* "
        "variants; train; eval; table",
    )
    p.add_argument("--variants", default="linearard", help=f"comma list of {', '.join(VARIANTS)}; or 'all'")
    p.add_argument(
        "--recipe-variant",
        action="append",
        default=[],
        metavar="NAME=CONFIG",
        help="define variant NAME as the recipe config CONFIG (its training fields on the study's base; "
        "teacher text from the study's corpus); repeatable, for train and eval alike",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="train: each variant once per seed, e.g. 0-5 or 0,2,7 (seed k > 0 runs as <variant>-s<k>: "
        "another LoRA init and block order); the table's recipe rows then average over them",
    )
    p.add_argument("--budget", type=int, default=None, help="token budget override for every variant")
    p.add_argument("--work", default="/tmp/study")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--recipe", default=RECIPE, help=f"base recipe of every job (default {RECIPE})")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every job")


def _add_run_arguments(p) -> None:
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="train: run up to N variants at once on one local Ray head (GPU share 1/N each); 1 = serial. "
        "eval: N (model, length) jobs at once per GPU (evaluate.py --jobs-per-gpu)",
    )
    p.add_argument("--gpus", type=int, default=None, help="GPUs the head offers (default: detected)")
    p.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="CPUs the head offers (default: max(cpu count, 2N+2): each job needs one for its worker "
        "and more for Ray Data reading)",
    )
    p.add_argument("--status-every", type=float, default=120.0, help="seconds between progress lines in parallel mode")
    p.add_argument(
        "--dry-run", action="store_true", help="print the commands (configurations validated) without running"
    )
    p.add_argument("--samples", type=int, default=1024, help="sample: teacher samples of 2048 tokens")
    p.add_argument(
        "--sample-batch",
        type=int,
        default=1024,
        help="sample: generation batch size (decoding is overhead-bound: a bigger batch is almost free per step; "
        "1024 × 2048 tokens of SmolLM2 KV cache is ~50 GB)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="eval: comma list of the models to evaluate (teacher, PI×4, YaRN×4 or variant names); default all",
    )


def _add_table_arguments(p) -> None:
    p.add_argument("--report", default=None, help="table: report.json to read (default <work>/eval/report.json)")
    p.add_argument(
        "--jobs",
        nargs="+",
        default=None,
        help="table: build the tables from evaluate.py's jobs.jsonl files instead of a report (for an "
        "evaluation cut short, or rounds on the same windows; later files win)",
    )
    p.add_argument(
        "--domains",
        default="main=SOTU,other=pydocs",
        help="table --jobs: names of the evaluation domains (default main=SOTU,other=pydocs)",
    )
    p.add_argument("--runs", default=None, help="table: runs.jsonl to read (default <work>/runs.jsonl)")
    p.add_argument(
        "--versus",
        default="cpt",
        help="table --jobs: the model every other is compared with window by window, where the jobs keep "
        "per-window NLL (default cpt, the continual pre-training baseline)",
    )
    p.add_argument(
        "--plot-unseen",
        default=None,
        metavar="PNG",
        help="table --jobs: also draw each recipe's recovery on the held-out genres (evaluate's "
        "unseen_recovery plot, a recipe's trainings averaged window by window) into PNG",
    )
    p.add_argument(
        "--apart",
        action="store_true",
        help="table --jobs: keep a model trained again in a later file as a training of its own, "
        "named '<model> (r<round>)', instead of letting the later file win",
    )


def run_job_tables(a) -> int:
    missing = [j for j in a.jobs if not Path(j).exists()]
    if missing:
        raise SystemExit(f"restoration_study.py: --jobs files not found: {missing}")
    domains = dict(x.split("=", 1) for x in a.domains.split(","))
    records = read_job_records([Path(j) for j in a.jobs], a.apart)
    print(render_job_tables(records, domains, versus=a.versus), end="")
    return _plot_unseen(records, a.plot_unseen) if a.plot_unseen else 0


def run_sample(a, work: Path) -> int:
    cmd = [
        sys.executable,
        "pipelines/sample_teacher.py",
        "--config",
        a.recipe,
        "--out",
        TEACHER_SAMPLES.format(work=work),
        "--samples",
        str(a.samples),
        "--tokens",
        "2048",
        "--batch-size",
        str(a.sample_batch),
        "--top-p",
        "0.95",
    ]  # a 135M model's far tail drifts off into noise
    print(" ".join(cmd), flush=True)
    return 0 if a.dry_run else subprocess.call(cmd, cwd=ROOT)


def main() -> int:
    a = _parser().parse_args()
    for spec in a.recipe_variant:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"restoration_study.py: --recipe-variant takes NAME=CONFIG, not {spec!r}")
        define_recipe_variant(name, path, a.recipe)
    work = Path(a.work).expanduser().resolve()  # absolute: Ray workers do not share this cwd
    if a.phase == "table":
        return run_job_tables(a) if a.jobs else run_table(work, a.report, a.runs)
    if not a.dry_run:
        work.mkdir(parents=True, exist_ok=True)
    if a.phase == "sample":
        return run_sample(a, work)
    if a.phase == "train":
        return run_train(a, work)
    return run_eval(
        work,
        Path(a.out) if a.out else None,
        a.extra,
        a.recipe,
        a.dry_run,
        max(1, a.parallel),
        a.only.split(",") if a.only else None,
    )


if __name__ == "__main__":
    sys.exit(main())
