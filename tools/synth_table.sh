#!/usr/bin/env bash
# The README's synthetic-data table: SASRec, MSM4SR and MSM4SR w/o pre-training, three training
# seeds each, on the default `synth` dataset, CPU backend.
#
#   bash tools/synth_table.sh                 # all nine runs, one after another
#   MODELS="msm4sr" SEEDS="1 2" bash tools/synth_table.sh
#
# Outputs: runs/table/<model>-s<seed>.{json,log,safetensors}; then the Markdown table via
#   python3 tools/results_table.py runs/table/sasrec-s*.json -- runs/table/msm4sr-s*.json -- runs/table/nopre-s*.json
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/msm4sr}
OUT=${OUT:-runs/table}
MODELS=${MODELS:-"sasrec msm4sr nopre"}
SEEDS=${SEEDS:-"1 2 3"}
[ -x "$BIN" ] || cargo build --release
[ -f runs/synth/synth.inter ] || "$BIN" synth --out runs/synth
mkdir -p "$OUT"
for seed in $SEEDS; do
  for m in $MODELS; do
    case $m in
      sasrec) extra=(--model sasrec) ;;
      msm4sr) extra=(--model msm4sr) ;;
      nopre) extra=(--model msm4sr --no-pretrain) ;;
      *) echo "unknown model $m" >&2; exit 2 ;;
    esac
    # Defaults everywhere (pre-training batch 1024, patience 20; fine-tuning patience 10) except the
    # fine-tuning batch: 256, the smallest of the paper's grid, suits a dataset this small.
    "$BIN" --device cpu train --data runs/synth --batch 256 --seed "$seed" "${extra[@]}" \
      --out "$OUT/$m-s$seed.safetensors" --json > "$OUT/$m-s$seed.json" 2> "$OUT/$m-s$seed.log"
    echo "$(date -u +%FT%TZ) $m seed $seed: $(grep -o '"recall@20": [0-9.]*' "$OUT/$m-s$seed.json" | tail -1)"
  done
done
