#!/usr/bin/env bash
# BFCL (lmforge eval-bfcl) on SmolLM2-135M-Instruct, with and without constrained decoding (the two runs side by side),
# then prints each results.md and the load.  Usage: bench/bfcl_smollm2.sh [LIMIT per category] [OUT folder]
# Slow on a shared CPU: about a minute per question at load ~12 on 2 cores.
set -euo pipefail
LIMIT=${1:-3}
OUT=${2:-/tmp/bfcl_smollm2}
MODEL=$(python -m lmforge.cli smollm2 | tail -1)
CATS="simple_python multiple irrelevance"
echo "load before: $(uptime | sed 's/.*load average: //')"
for flag in --constrained --no-constrained; do
  /usr/bin/time -f "${flag#--}: %e s wall" python -m lmforge.cli eval-bfcl --model "$MODEL" --categories $CATS \
    --limit "$LIMIT" --max-tokens 96 $flag --out "$OUT/${flag#--}" --force > "$OUT.${flag#--}.log" 2>&1 &
done
wait
echo "load after: $(uptime | sed 's/.*load average: //')"
for flag in constrained no-constrained; do echo "== $flag"; tail -1 "$OUT.$flag.log"; cat "$OUT/$flag/results.md"; done
