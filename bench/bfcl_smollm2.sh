#!/usr/bin/env bash
# BFCL (lmforge eval-bfcl) on SmolLM2-135M-Instruct, with and without constrained decoding; prints each results.md.
# Usage: bench/bfcl_smollm2.sh [LIMIT] [OUT]   (slow on a shared CPU: LIMIT 20 x 3 categories takes minutes per run)
set -euo pipefail
LIMIT=${1:-20}
OUT=${2:-/tmp/bfcl_smollm2}
MODEL=$(python -m lmforge.cli smollm2 | tail -1)
CATS="simple_python multiple irrelevance"
for flag in --constrained --no-constrained; do
  echo "== $flag; load: $(uptime | sed 's/.*load average: //')"
  /usr/bin/time -f "%e s wall" python -m lmforge.cli eval-bfcl --model "$MODEL" --categories $CATS --limit "$LIMIT" \
    --max-tokens 128 $flag --out "$OUT/${flag#--}" --force > "$OUT.${flag#--}.log" 2>&1
  cat "$OUT/${flag#--}/results.md"
  echo "load after: $(uptime | sed 's/.*load average: //')"
done
