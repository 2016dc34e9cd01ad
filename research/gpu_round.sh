#!/usr/bin/env bash
# One restoration-study round on a lent GPU host, as a detached chain that outlives a single
# device call (each call is capped at 10 minutes; the host keeps /tmp while it stays held). A
# round is one such chain: train some variants, evaluate them, bring the files back.
#
#   start:  bash research/gpu_round.sh start WORK VARIANTS [EVAL_JOBS_SEED[,SEED2...]]
#   sweep:  bash research/gpu_round.sh sweep WORK CONFIG [TRIALS_PER_GPU] [k=v ...]
#   wait:   bash research/gpu_round.sh wait WORK SECONDS      (prints the log's tail; rc 0 once done)
#   fetch:  bash research/gpu_round.sh fetch WORK             (copies the round's files to $OUT, the
#                                                             device call's output folder)
#   genres: bash research/gpu_round.sh genres                 (installs a carried .gpu-genres alone)
#
# `start` and `sweep` expect the Ray bundle unpacked under /tmp/site (SITE_DIR) and the SmolLM2
# GGUF under /tmp/stage (STAGE_DIR): research/README.md says how both are staged. `start` takes the
# teacher corpus from research/data (the study's shipped draw: 1,849 samples, 2,687,381 tokens),
# else samples it, trains VARIANTS (comma list) all at once sharing the GPUs, then evaluates them
# on the study's windows and passkey prompts. EVAL_JOBS_SEED, earlier jobs.jsonl files (comma
# list) with the same windows and prompts, lets the teacher's and baselines' jobs be reused.
# LONG_LENGTHS / PASSKEY_LENGTHS (environment, JSON lists) change the evaluated lengths from
# [16384,32768] / [8192,16384,30000]; jobs at lengths the seed files have are still reused, and
# EVAL_ONLY (comma list, default VARIANTS) can add the untrained baselines (PI×4, YaRN×4) for new lengths.
# EVAL_SETS (space-separated key=value, no spaces inside) adds evaluate.py overrides, e.g. eval.preset=study;
# built genre corpora in .gpu-genres (carried) replace the host's cache. LONG_ONLY (comma list) splits the
# evaluation in two so that a short hold still brings back every model's short text: first short text
# alone for EVAL_ONLY, then long context and passkey only for LONG_ONLY. RECIPE_VARIANTS
# (space-separated NAME=CONFIG) defines variants from recipe configs (restoration_study.py
# --recipe-variant), e.g. a searched recipe from research/recipe_from_sweep.py, trained as NAME-s0,...
# `sweep` runs pipelines/tune.py (with these --set overrides) detached the same way, on the shipped
# teacher corpus (research/sweep_on_shipped_samples.py) instead of sampling it, TRIALS_PER_GPU
# trials (default 4) sharing each card; `wait` and `fetch` as above (fetch adds the sweep's tables,
# plot and best config).
set -uo pipefail
usage() { sed -n '2,/^set -uo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "gpu_round.sh: $*" >&2; exit 2; }
phase=${1:-} work=${2:-}
case "$phase" in
genres) ;;
start | sweep | wait | fetch) [ -n "$work" ] || die "$phase needs WORK (see: bash research/gpu_round.sh --help)" ;;
-h | --help | help) usage; exit 0 ;;
*) usage >&2; [ -z "$phase" ] || die "unknown phase '$phase'"; exit 2 ;;
esac
log="$work/driver.log"
site_dir=${SITE_DIR:-/tmp/site} stage_dir=${STAGE_DIR:-/tmp/stage}
install_genres() {  # built here at set-up (scripts/build_genre_corpora.py): the host cannot reach Debian
  [ -d .gpu-genres ] || return 0
  mkdir -p "$HOME/.cache/linearard_ray"
  rm -rf "$HOME/.cache/linearard_ray/genres"
  cp -r .gpu-genres "$HOME/.cache/linearard_ray/genres"
}
prepare() {  # the staged GGUF, the carried genres and the shipped teacher corpus where the jobs look;
  # refused here, before anything detaches, when the bundle or the model is missing (the host has no
  # network, so a chain without them would only fail later, out of sight). $1 = "model optional"
  # for a sweep whose teacher is a tiny random model.
  [ -d "$site_dir" ] || die "no Ray bundle at $site_dir: unpack .gpu-bundle/site.tar.xz there first (research/README.md)"
  local models="$HOME/.cache/linearard_ray/downloads/smollm2-135m"
  mkdir -p "$work/eval" "$models"
  cp -n "$stage_dir"/*.gguf "$models/" 2>/dev/null
  if ! ls "$models"/*.gguf >/dev/null 2>&1; then
    [ "${1:-}" = "model optional" ] || die "no SmolLM2 GGUF in $stage_dir or $models: stage it (bash research/stage_gpu_round.sh)"
    echo "gpu_round.sh: no SmolLM2 GGUF staged; fine for this tiny teacher" >&2
  fi
  install_genres
  local samples=research/data/smollm2_teacher_samples.jsonl.xz
  [ -s "$work/teacher_samples.jsonl" ] || { [ -f "$samples" ] && xz -dc "$samples" >"$work/teacher_samples.jsonl"; }
}
tiny_teacher() {  # CONFIG [k=v ...]: whether the teacher is a tiny random model (no download, no GGUF)
  local config=$1 e; shift
  for e in "$@"; do case "$e" in model.teacher=tiny:*) return 0 ;; model.teacher=*) return 1 ;; esac; done
  grep -Eq "^[[:space:]]*teacher:[[:space:]]*[\"']?tiny:" "$config"
}
site="$site_dir:$PWD"  # the Ray bundle first: the host's own Python may lack the package's dependencies
detach() {  # WORK/chain.sh = the host's environment, then the steps on stdin; run so that it outlives
  # this call, DONE getting its exit code
  { cat <<EOF
set -x
cd $PWD
export PYTHONPATH='$site' PATH='$site_dir/bin':\$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name --format=csv,noheader
date +%s > $work/t_start
EOF
    cat; } >"$work/chain.sh"
  setsid nohup bash -c "bash $work/chain.sh; echo \$? > $work/DONE" >"$log" 2>&1 < /dev/null &
  echo "started chain in $work (pid $!)"
}
case "$phase" in
genres)
  install_genres
  ;;
start)
  [ $# -ge 3 ] || die "start needs WORK and VARIANTS (comma list)"
  variants=$3 seed_jobs=${4:-}
  long=${LONG_LENGTHS:-[16384,32768]} passkey=${PASSKEY_LENGTHS:-[8192,16384,30000]} only=${EVAL_ONLY:-$3}
  long_only=${LONG_ONLY:-}
  eval_sets=""; for e in ${EVAL_SETS:-}; do eval_sets="$eval_sets --set '$e'"; done
  recipes=""; for e in ${RECIPE_VARIANTS:-}; do recipes="$recipes --recipe-variant '$e'"; done
  for f in ${seed_jobs//,/ }; do [ -f "$f" ] || die "no seed jobs file $f"; done
  for e in ${RECIPE_VARIANTS:-}; do
    [[ "$e" == ?*=?* ]] || die "RECIPE_VARIANTS takes NAME=CONFIG entries, not '$e'"
    [ -f "${e#*=}" ] || die "RECIPE_VARIANTS: no recipe config ${e#*=}"
  done
  prepare
  [ -z "$seed_jobs" ] || for f in ${seed_jobs//,/ }; do cat "$f"; done >"$work/eval/jobs.jsonl"
  n=$(tr ',' '\n' <<<"$variants" | grep -c .)
  gpus=$(nvidia-smi -L | grep -c GPU)
  detach <<EOF
[ -s $work/teacher_samples.jsonl ] || python3 research/restoration_study.py sample --work $work --samples 2080 --sample-batch 1040 || exit 11
date +%s > $work/t_sampled
python3 research/restoration_study.py train --budget 4250000 --parallel $n --work $work --variants $variants$recipes || exit 12
date +%s > $work/t_trained
evaluate() {  # models, long lengths, passkey lengths, report folder
  python3 research/restoration_study.py eval --work $work --parallel $((6 * gpus)) --only "\$1"$recipes \\
    --set "eval.long_lengths=\$2" --set "eval.passkey_lengths=\$3" --set eval.passkey_trials=8 \\
    --set eval.passkey_distractors=one_digit --set eval.passkey_choices=45 $eval_sets --out "\$4"
}
if [ -n '$long_only' ]; then
  evaluate '$only' '[]' '[]' $work/out-short || exit 13
  date +%s > $work/t_evaluated_short
  evaluate '$long_only' '$long' '$passkey' $work/out || exit 14
else
  evaluate '$only' '$long' '$passkey' $work/out || exit 13
fi
date +%s > $work/t_evaluated
EOF
  ;;
sweep)
  [ $# -ge 3 ] || die "sweep needs WORK and CONFIG"
  [ -f "$3" ] || die "no sweep config $3"
  config=$3 share=${4:-4}
  sets=""; for e in "${@:5}"; do sets="$sets --set '$e'"; done
  if tiny_teacher "$config" "${@:5}"; then prepare "model optional"; else prepare; fi
  PYTHONPATH="$site" python3 research/sweep_on_shipped_samples.py --config "$config" --samples "$work/teacher_samples.jsonl" \
    --out "$work/sweep.yaml" || exit 2
  detach <<EOF
python3 pipelines/tune.py --config $work/sweep.yaml --set train.gpus_per_worker=$(awk "BEGIN {print 1 / $share}") \\
  --set tune.storage_path=$work/tune --set train.output_dir=$work/students $sets || exit 15
date +%s > $work/t_swept
EOF
  ;;
wait)
  [ $# -ge 3 ] || die "wait needs WORK and SECONDS"
  limit=$3 t0=$(date +%s)
  while [ ! -f "$work/DONE" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 10; done
  tail -c 6000 "$log"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  if [ -f "$work/DONE" ]; then echo "chain exit $(cat "$work/DONE")"; exit 0; fi
  echo "still running after ${limit}s"; exit 3
  ;;
fetch)
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] || die "fetch copies to \$OUT, the device call's output folder: set it to a folder"
  # eval --out leaves the report, tables, plots, runs and logs in WORK/out once it ends; before
  # that, the live job records and the logs are what there is to bring back. Few files come back
  # from a device call, so everything but the job records travels as one archive.
  cp "$work"/eval/jobs.jsonl "$work"/runs.jsonl "$log" "$OUT/" 2>/dev/null
  # a sweep's tables, plot and best config, without its trials' checkpoints and students
  tar -czf "$OUT/round.tar.gz" -C "$work" $(cd "$work" && ls -d out out-short *.log t_* sweep.yaml \
    tune/*/results.* tune/*/objective.png tune/*/best_config.yaml 2>/dev/null) 2>/dev/null
  ls -la "$OUT"
  ;;
esac
