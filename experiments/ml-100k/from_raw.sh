#!/usr/bin/env bash
# MovieLens 100K from GroupLens' zip to a ready dataset directory with text features, in one
# command: `msm4sr import ml-100k` (u.data, u.item, u.genre -> ml-100k.inter, ml-100k.item as
# RecBole ships them), then `msm4sr featurize` with the README's three sentence templates.
#
#   bash experiments/ml-100k/from_raw.sh ML100K_DIR [OUT_DIR] [more featurize flags]
#     ML100K_DIR  the unpacked https://files.grouplens.org/datasets/movielens/ml-100k.zip (its
#                 README gives GroupLens' terms: research use, no redistribution, cite Harper &
#                 Konstan, ACM TiiS 2015)
#     OUT_DIR     default runs/ml-100k; the imported files go to OUT_DIR/source
#   BIN=path/to/msm4sr (default target/release/msm4sr, else msm4sr on PATH); DEVICE=auto|cpu|gpu.
#   Needs the Sentence-BERT model: bash tools/get_minilm.sh (or pass --model-dir DIR).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
BIN=${BIN:-target/release/msm4sr}
[[ -x "$BIN" ]] || BIN=msm4sr
RAW=$1
OUT=${2:-runs/ml-100k}
shift $(( $# < 2 ? $# : 2 ))
"$BIN" import ml-100k --dir "$RAW" --out "$OUT/source" --name ml-100k
exec "$BIN" --device "${DEVICE:-auto}" featurize --items "$OUT/source/ml-100k.item" --out "$OUT" \
    --text-fields 'movie_title={title}.' --text-fields 'release_year=Released in {year}.' --text-fields 'class=Genres: {list}.' "$@"
