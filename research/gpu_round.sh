#!/usr/bin/env bash
# One restoration-study round on a lent GPU host, as a detached chain that outlives a single
# device call (each call is capped at 10 minutes; the host keeps /tmp while it stays held).
#
#   start:  bash research/gpu_round.sh start WORK "VARIANTS" [EVAL_JOBS_SEED]
#   wait:   bash research/gpu_round.sh wait WORK SECONDS      (prints the log's tail; rc 0 once done)
#   fetch:  bash research/gpu_round.sh fetch WORK             (copies the round's files to $OUT)
#
# `start` expects the Ray bundle under /tmp/site and the SmolLM2 GGUF under /tmp/stage (see
# ../shared/GPU.md); it takes the teacher corpus from research/data (drawn in round 11 with round
# 5's settings: 1,849 samples, 2,687,381 tokens, the same counts as round 5), else samples it,
# trains VARIANTS all at once (sharing the GPUs), then evaluates them as round 10 did. EVAL_JOBS_SEED, an earlier
# round's jobs.jsonl with the same windows and prompts, lets the teacher's jobs be reused.
# LONG_LENGTHS / PASSKEY_LENGTHS (environment, JSON lists) change the evaluated lengths from round 10's
# [16384,32768] / [8192,16384,30000]; jobs at lengths the seed file has are still reused, and
# EVAL_ONLY (comma list, default VARIANTS) can add the untrained baselines (PI×4, YaRN×4) for new lengths.
# EVAL_SETS (space-separated key=value, no spaces inside) adds evaluate.py overrides, e.g. eval.preset=study;
# built genre corpora in .gpu-genres (carried) replace the host's cache. LONG_ONLY (comma list) splits the
# evaluation in two so that a short hold still brings back every model's short text: first short text
# alone for EVAL_ONLY, then long context and passkey only for LONG_ONLY.
#   genres: bash research/gpu_round.sh genres                  (installs a carried .gpu-genres alone)
#   sweep:  bash research/gpu_round.sh sweep WORK CONFIG [TRIALS_PER_GPU] [k=v ...]
#           a pipelines/tune.py sweep (with these --set overrides) detached the same way, on the shipped
#           teacher corpus (research/sweep_on_shipped_samples.py) instead of sampling it, TRIALS_PER_GPU
#           trials (default 4) sharing each card; `wait` and `fetch` as above (fetch adds the sweep's
#           tables, plot and best config).
set -uo pipefail
phase=$1 work=${2:-}
log="$work/driver.log"
install_genres() {  # built here at set-up (scripts/build_genre_corpora.py): the host cannot reach Debian
  [ -d .gpu-genres ] || return 0
  mkdir -p "$HOME/.cache/linearard_ray"
  rm -rf "$HOME/.cache/linearard_ray/genres"
  cp -r .gpu-genres "$HOME/.cache/linearard_ray/genres"
}
prepare() {  # the staged GGUF, the carried genres and the shipped teacher corpus where the jobs look
  mkdir -p "$work/eval" "$HOME/.cache/linearard_ray/downloads/smollm2-135m"
  cp -n /tmp/stage/*.gguf "$HOME/.cache/linearard_ray/downloads/smollm2-135m/"
  install_genres
  local samples=research/data/smollm2_teacher_samples.jsonl.xz
  [ -s "$work/teacher_samples.jsonl" ] || { [ -f "$samples" ] && xz -dc "$samples" >"$work/teacher_samples.jsonl"; }
}
site="/tmp/site:$PWD"  # the Ray bundle first: the host's own Python may lack the package's dependencies
detach() {  # WORK/chain.sh = the host's environment, then the steps on stdin; run so that it outlives
  # this call, DONE getting its exit code
  { cat <<EOF
set -x
cd $PWD
export PYTHONPATH=$site PATH=/tmp/site/bin:\$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
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
  variants=$3 seed_jobs=${4:-}
  long=${LONG_LENGTHS:-[16384,32768]} passkey=${PASSKEY_LENGTHS:-[8192,16384,30000]} only=${EVAL_ONLY:-$3}
  long_only=${LONG_ONLY:-}
  eval_sets=""; for e in ${EVAL_SETS:-}; do eval_sets="$eval_sets --set '$e'"; done
  prepare
  [ -n "$seed_jobs" ] && cp "$seed_jobs" "$work/eval/jobs.jsonl"
  n=$(tr ',' '\n' <<<"$variants" | grep -c .)
  gpus=$(nvidia-smi -L | grep -c GPU)
  detach <<EOF
[ -s $work/teacher_samples.jsonl ] || python3 research/restoration_study.py sample --work $work --samples 2080 --sample-batch 1040 || exit 11
date +%s > $work/t_sampled
python3 research/restoration_study.py train --budget 4250000 --parallel $n --work $work --variants $variants || exit 12
date +%s > $work/t_trained
evaluate() {  # models, long lengths, passkey lengths, report folder
  python3 research/restoration_study.py eval --work $work --parallel $((6 * gpus)) --only "\$1" \\
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
  config=$3 share=${4:-4}
  sets=""; for e in "${@:5}"; do sets="$sets --set '$e'"; done
  prepare
  PYTHONPATH="$site" python3 research/sweep_on_shipped_samples.py --config "$config" --samples "$work/teacher_samples.jsonl" \
    --out "$work/sweep.yaml" || exit 2
  detach <<EOF
python3 pipelines/tune.py --config $work/sweep.yaml --set train.gpus_per_worker=$(awk "BEGIN {print 1 / $share}") \\
  --set tune.storage_path=$work/tune --set train.output_dir=$work/students $sets || exit 15
date +%s > $work/t_swept
EOF
  ;;
wait)
  limit=$3 t0=$(date +%s)
  while [ ! -f "$work/DONE" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 10; done
  tail -c 6000 "$log"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  if [ -f "$work/DONE" ]; then echo "chain exit $(cat "$work/DONE")"; exit 0; fi
  echo "still running after ${limit}s"; exit 3
  ;;
fetch)
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
