#!/usr/bin/env bash
# BFCL (lmforge eval-bfcl) on one model folder with and without constrained decoding, the two runs side by side
# (greedy, tool_choice auto; env QUANTIZE=int4 (or int8, none), MAX_TOKENS=96, CONCURRENCY=4, MAX_MODEL_LEN=4096; SEQUENTIAL=1 runs
# them one after the other, one engine in memory); loads go to OUT/loads.txt.
# Before/after tool-use SFT (recipes/smollm2_tools.yaml), then the table with 95 % Wilson intervals:
#   bench/bfcl_tools_sft.sh "$(lmforge smollm2)" base 6 OUT
#   bench/bfcl_tools_sft.sh WORKSPACE/merged tuned 6 OUT
#   python bench/bfcl_table.py OUT/base-no-constrained OUT/base-constrained OUT/tuned-no-constrained OUT/tuned-constrained
# Usage: bench/bfcl_tools_sft.sh MODEL_DIR NAME [LIMIT per category] [OUT folder] [categories...]
set -euo pipefail
MODEL=$1
NAME=$2
LIMIT=${3:-6}
OUT=${4:-/tmp/bfcl_tools_sft}
shift 4 || shift $#
CATS=${*:-simple_python multiple parallel irrelevance live_simple}
mkdir -p "$OUT"
Q="--quantize ${QUANTIZE:-int4}"; [ "${QUANTIZE:-int4}" = none ] && Q=""
echo "$NAME: load before $(uptime | sed 's/.*load average: //')" >> "$OUT/loads.txt"
for flag in --no-constrained --constrained; do
  run=$NAME-${flag#--}
  /usr/bin/time -f "$run: %e s wall" python -m lmforge.cli eval-bfcl --model "$MODEL" --categories $CATS \
    --limit "$LIMIT" --max-tokens "${MAX_TOKENS:-96}" $Q --concurrency "${CONCURRENCY:-4}" \
    --max-model-len "${MAX_MODEL_LEN:-4096}" $flag --out "$OUT/$run" > "$OUT/$run.log" 2>&1 &
  [ -n "${SEQUENTIAL:-}" ] && wait
done
wait
for flag in no-constrained constrained; do tail -1 "$OUT/$NAME-$flag.log" >> "$OUT/loads.txt"; done
echo "$NAME: load after $(uptime | sed 's/.*load average: //')" >> "$OUT/loads.txt"
cat "$OUT/loads.txt"
