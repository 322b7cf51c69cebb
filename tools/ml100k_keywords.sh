#!/usr/bin/env bash
# Keyword sentences standing in for an image modality on MovieLens 100K: per item one line with the
# title's words and one with its genres (the `--image-keywords` format of `msm4sr featurize`:
# ITEM<TAB>words, one line per "image").
#   bash tools/ml100k_keywords.sh ../shared/data/ml-100k/ml-100k.item > runs/ml-100k.keywords.tsv
set -euo pipefail
awk -F'\t' 'NR > 1 && $1 != "" {
    gsub(/[(),.:!?"]/, " ", $2); n = split($2, w, " "); t = ""
    for (i = 1; i <= n; i++) if (w[i] != "") t = t (t == "" ? "" : " ") tolower(w[i])
    if (t != "") print $1 "\t" t
    if ($4 != "" && $4 != "unknown") print $1 "\t" tolower($4)
}' "${1:?usage: ml100k_keywords.sh ML-100K.item}"
