#!/usr/bin/env bash
# Amazon Office from the files its owners publish to a ready dataset directory with features, in
# one command: `msm4sr import amazon` (reviews + metadata -> office.inter, office.item), then
# experiments/office/features.sh (Sentence-BERT text features and the keyword image stand-in).
#
#   bash experiments/office/from_raw.sh REVIEWS META [OUT_DIR]
#     REVIEWS  reviews_Office_Products_5.json.gz   (Amazon review data 2014, "5-core" file)
#     META     meta_Office_Products.json.gz        (the same category's metadata)
#     OUT_DIR  default runs/office-raw; the imported files go to OUT_DIR/source
#   Both files: https://jmcauley.ucsd.edu/data/amazon/ (McAuley et al., SIGIR 2015; research use).
#   BIN=path/to/msm4sr (default target/release/msm4sr, else msm4sr on PATH); DEVICE as features.sh.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN=${BIN:-target/release/msm4sr}
[[ -x "$BIN" ]] || BIN=msm4sr
OUT=${3:-runs/office-raw}
"$BIN" import amazon --reviews "$1" --meta "$2" --out "$OUT/source" --name office
BIN="$BIN" bash "$here/features.sh" "$OUT/source/office.item" "$OUT"
