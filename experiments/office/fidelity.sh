#!/usr/bin/env bash
# msm4sr beside the authors' released code at equal epochs on Amazon Office, several seeds:
# ../shared/peers/mp4sr/fidelity.sh (SASRec 20 epochs; MSM4SR without heads, 4 pre-training + 5
# fine-tuning epochs; the authors' published settings) once per seed, then one table of the means.
#
#   bash experiments/office/fidelity.sh [DATA] [OUT]      (defaults runs/office, runs/fidelity)
#   SEEDS="1 2 3" BIN=target/release/msm4sr; the peer installed once by ../shared/peers/mp4sr/setup.sh
#
# Equal timestamps: the authors' code sorts the interactions by time with pandas' default (unstable)
# sort before removing duplicates, so within one user's equal timestamps its order is arbitrary; on
# Office that changes the validation or test target of 1,100 of 4,905 users (665 test targets)
# against the file order, which msm4sr (and the data's README) keep. Both programs therefore get a
# copy of the data whose timestamps are made distinct within each user in file order (+1 s per
# earlier row with the same user and time; Office times are whole days), which gives msm4sr exactly
# the split of the original file (the run's data fingerprint says so) and the authors' code the same.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
DATA=${1:-runs/office}; OUT=${2:-runs/fidelity}
BIN=${BIN:-target/release/msm4sr}; SEEDS=${SEEDS:-1 2 3}
PEER=${PEER:-$repo/../shared/peers/mp4sr}
mkdir -p "$OUT/data"
name=$(basename "$(ls "$DATA"/*.inter | head -1)" .inter)
python3 - "$DATA/$name.inter" "$OUT/data/$name.inter" <<'PY'
import sys
src, dst = sys.argv[1], sys.argv[2]
lines = open(src, encoding="utf-8").read().splitlines()
head = [h.split(":")[0] for h in lines[0].split("\t")]
u, t = head.index("user_id"), head.index("timestamp")
seen, moved = {}, 0
with open(dst + ".tmp", "w") as f:
    f.write(lines[0] + "\n")
    for line in lines[1:]:
        if not line.strip():
            continue
        c = line.split("\t")
        k = (c[u], c[t])
        n = seen.get(k, 0)
        seen[k] = n + 1
        if n:
            c[t] = str(int(float(c[t])) + n)
            moved += 1
        f.write("\t".join(c) + "\n")
import os
os.replace(dst + ".tmp", dst)
print(f"{dst}: {moved} timestamps moved by whole seconds to keep the file order within a user")
PY
for f in "$DATA/$name.features.safetensors" "$DATA/$name.items.txt"; do cp -f "$f" "$OUT/data/"; done
for s in $SEEDS; do
    if [ -s "$OUT/seed$s/table.txt" ]; then echo "seed $s: done ($OUT/seed$s/table.txt)"; continue; fi
    rm -rf "$OUT/seed$s"; mkdir -p "$OUT/seed$s"
    echo "seed $s: $(date -u +%FT%TZ)"
    logs=$(realpath -m "$OUT/seed$s/logs"); data=$(realpath "$OUT/data")
    OUT="$logs" BIN="$BIN" DATA="$data" SEED=$s bash "$PEER/fidelity.sh" > "$OUT/seed$s/table.tmp"
    mv "$OUT/seed$s/table.tmp" "$OUT/seed$s/table.txt"
    cat "$OUT/seed$s/table.txt"
done
python3 "$here/fidelity_summary.py" "$OUT" $SEEDS
