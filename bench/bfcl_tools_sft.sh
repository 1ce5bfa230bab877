#!/usr/bin/env bash
# BFCL (lmforge eval-bfcl) on one model folder with and without constrained decoding, the two runs side by side
# (greedy, int4 weights, tool_choice auto, 96 new tokens, 4 questions in flight each); loads go to OUT/loads.txt.
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
echo "$NAME: load before $(uptime | sed 's/.*load average: //')" >> "$OUT/loads.txt"
for flag in --no-constrained --constrained; do
  run=$NAME-${flag#--}
  /usr/bin/time -f "$run: %e s wall" python -m lmforge.cli eval-bfcl --model "$MODEL" --categories $CATS \
    --limit "$LIMIT" --max-tokens 96 --quantize int4 --concurrency 4 $flag --out "$OUT/$run" > "$OUT/$run.log" 2>&1 &
done
wait
for flag in no-constrained constrained; do tail -1 "$OUT/$NAME-$flag.log" >> "$OUT/loads.txt"; done
echo "$NAME: load after $(uptime | sed 's/.*load average: //')" >> "$OUT/loads.txt"
cat "$OUT/loads.txt"
