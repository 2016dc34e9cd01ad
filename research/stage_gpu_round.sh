#!/usr/bin/env bash
# Stage a restoration-study round for the lent GPU host, whose calls each carry at most 64 MiB: the
# working tree travels with every call, so the SmolLM2 GGUF is cut into parts that fit beside it
# (shared/tools/gpu-stage's fixed 48 MiB parts no longer do), and the built genre corpora ride along.
# Run from the repository root:
#
#   bash research/stage_gpu_round.sh            # then make the calls it prints, back to back
#
# Writes .gpu-stage/1..n (parts; the last also holds manifest.sha256) and .gpu-genres (a copy of
# the genre cache), both ignored through .git/info/exclude. The genres ride with the Ray bundle
# (shared/tools/gpu-bundle's .gpu-bundle/site.tar.xz) where both fit, which saves a call, else with
# the last part. Environment: GGUF (the file to stage), GENRES (the built genres, default
# $LINEARARD_CACHE/genres), LIMIT_MIB (per-call limit, 64).
set -euo pipefail
cache=${LINEARARD_CACHE:-$HOME/.cache/linearard_ray}
gguf=${GGUF:-$cache/downloads/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}
genres=${GENRES:-$cache/genres}
limit=$(( ${LIMIT_MIB:-64} * 1024 * 1024 ))
[ -f "$gguf" ] || { echo "stage_gpu_round.sh: no GGUF at $gguf (set GGUF, or run a job that downloads it)" >&2; exit 2; }
[ -f "$genres/build.json" ] || { echo "stage_gpu_round.sh: no built genres under $genres: python scripts/build_genre_corpora.py" >&2; exit 2; }
for p in /.gpu-stage/ /.gpu-genres/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done

# what travels with every call: tracked files and untracked ones git does not ignore, counted as
# disk usage (a call of 16.5 MB of files and a 50.3 MB part was refused: the limit counts more than
# the files' bytes), with a margin
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -k -- 2>/dev/null | awk '{s += $1} END {print s * 1024}')
margin=$(( 1024 * 1024 ))
room=$(( limit - tree - margin ))
genres_size=$(( $(du -sk "$genres" | cut -f1) * 1024 ))
[ "$room" -gt "$genres_size" ] || { echo "stage_gpu_round.sh: the working tree ($tree bytes) leaves no room under the limit" >&2; exit 2; }

rm -rf .gpu-stage .gpu-genres
mkdir -p .gpu-stage
cp -r "$genres" .gpu-genres
name=$(basename "$gguf")
size=$(stat -c %s "$gguf")
bundle_kib=$( [ -f .gpu-bundle/site.tar.xz ] && du -sk .gpu-bundle | cut -f1 || echo 0)  # carried whole
bundle_size=$(( bundle_kib * 1024 ))
[ "$bundle_size" -gt 0 ] || echo "stage_gpu_round.sh: no .gpu-bundle/site.tar.xz yet: build it with ../shared/tools/gpu-bundle" >&2
with_bundle=$(( bundle_size > 0 && bundle_size + genres_size <= room ))
last_extra=$(( with_bundle ? 0 : genres_size ))
# equal parts, as few as fit, with room beside the last one for the genres unless the bundle has them
n=$(( (size + last_extra + room - 1) / room ))
while [ $(( (size + n - 1) / n + last_extra )) -gt "$room" ]; do n=$((n + 1)); done
split -n "$n" -d -a 3 "$gguf" ".gpu-stage/$name.part."
i=0
for part in .gpu-stage/"$name".part.*; do
  i=$((i + 1)); mkdir -p ".gpu-stage/$i"; mv "$part" ".gpu-stage/$i/"
done
(cd "$(dirname "$gguf")" && sha256sum "$name") > ".gpu-stage/$n/manifest.sha256"

unpack="mkdir -p /tmp/site && tar -xJf .gpu-bundle/site.tar.xz -C /tmp/site"
echo "staged $name in $n part(s) beside a working tree of $tree bytes. Make these calls back to back:"
if [ "$with_bundle" = 1 ]; then
  echo "  call 0: carry [\".gpu-bundle\", \".gpu-genres\"]  command: $unpack && bash research/gpu_round.sh genres"
else
  echo "  call 0: carry [\".gpu-bundle\"]  command: $unpack"
fi
last_carry="\".gpu-stage/$n\""
[ "$with_bundle" = 1 ] || last_carry="$last_carry, \".gpu-genres\""
for i in $(seq 1 "$n"); do
  if [ "$i" -lt "$n" ]; then
    echo "  call $i: carry [\".gpu-stage/$i\"]  command: mkdir -p /tmp/stage && cp .gpu-stage/$i/* /tmp/stage/"
  else
    echo "  call $i: carry [$last_carry]  command: mkdir -p /tmp/stage && cp .gpu-stage/$i/* /tmp/stage/ && (cd /tmp/stage && cat $name.part.* > $name && rm $name.part.* && sha256sum -c manifest.sha256) && bash research/gpu_round.sh start ..."
  fi
done
