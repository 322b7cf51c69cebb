#!/usr/bin/env bash
# Amazon Office item features, as the paper builds them, with one msm4sr command:
#   text  — the item's sentences through Sentence-BERT: the title; "Brand: ..."; "Categories: ...";
#           then the description split into sentences; at most 10 per item;
#   image — the data has no images, so a STAND-IN: one keyword sentence per item (the distinct title
#           words longer than 3 characters, then the brand) through the same Sentence-BERT. It is
#           text, not image content; results that use it say so.
#
#   bash experiments/office/features.sh [ITEM_FILE] [OUT_DIR] [more featurize flags]
#     ITEM_FILE  default ../shared/data/office/office.item (office.inter beside it is copied to OUT_DIR)
#     OUT_DIR    default runs/office
#   BIN=path/to/msm4sr (default target/release/msm4sr); DEVICE=auto|cpu|gpu (default auto).
#   Needs the Sentence-BERT model: bash tools/get_minilm.sh (or pass --model-dir DIR).
set -euo pipefail
BIN=${BIN:-target/release/msm4sr}
ITEMS=${1:-../shared/data/office/office.item}
OUT=${2:-runs/office}
shift $(( $# < 2 ? $# : 2 ))
exec "$BIN" --device "${DEVICE:-auto}" featurize --items "$ITEMS" --out "$OUT" \
    --text-fields 'title={}' --text-fields 'brand=Brand: {}.' --text-fields 'categories=Categories: {}.' \
    --text-fields description --max-sentences 10 \
    --image-words-from 'title>3,brand' "$@"
