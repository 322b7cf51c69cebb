#!/usr/bin/env bash
# Two builds of msm4sr, same results? Runs the fixed-epoch reference runs with each binary and
# compares, bit for bit, what a run computes: the best weights, every user's valid/test rank and the
# per-epoch losses and metrics (timings left out). Used to show that a change which should not
# alter behaviour (a refactor, a speed-up) does not.
#
#   bash tools/same_behaviour.sh OLD_BIN NEW_BIN [OUT] [OFFICE_DATA]
#
# The runs, on the CPU backend with one core each (the two binaries side by side; see CORES below):
#   synth  `msm4sr synth` at its defaults (1000 users, 2400 items used)
#   sasrec SASRec, 5 epochs (patience off), seed 1
#   msm4sr MSM4SR with projection heads, 3 pre-training + 3 fine-tuning epochs, batch 256, seed 1
#   office-sasrec / office-msm4sr (when OFFICE_DATA, a dataset directory such as the one
#          experiments/office/fidelity.sh gives both programs, is named): the equal-epoch runs of
#          ../shared/peers/mp4sr/fidelity.sh (SASRec 20 epochs; MSM4SR without heads, 4 + 5 epochs)
# CORES=0,1 (any taskset list) runs both binaries on those cores instead, one after the other: the
# thread count then exercises the kernels' parallel splits (their bits must not depend on it).
# Exit status 0 when every run agrees, 1 when one differs (the differing files are named).
set -euo pipefail
OLD=$(realpath "${1:?old binary}"); NEW=$(realpath "${2:?new binary}")
OUT=${3:-$(mktemp -d)}; OFFICE=${4:-}
mkdir -p "$OUT"

runs() { # $1 = binary, $2 = output directory, $3 = core
    local bin=$1 out=$2 core=$3
    run() { taskset -c "$core" "$bin" --device cpu "$@" > /dev/null 2>> "$out.log"; }
    rm -rf "$out" "$out.log"; mkdir -p "$out"
    run synth --out "$out/synth"
    run train --data "$out/synth" --model sasrec --epochs 5 --patience 1000 --seed 1 --run-dir "$out/sasrec"
    run train --data "$out/synth" --model msm4sr --pretrain-epochs 3 --pretrain-patience 1000 --epochs 3 \
        --patience 1000 --batch 256 --seed 1 --run-dir "$out/msm4sr"
    if [ -n "$OFFICE" ]; then
        run train --data "$OFFICE" --model sasrec --epochs 20 --patience 1000 --batch 2048 --dropout 0.5 --lr 1e-3 \
            --seed 1 --run-dir "$out/office-sasrec"
        run train --data "$OFFICE" --model msm4sr --no-heads --pretrain-epochs 4 --pretrain-patience 1000 \
            --pretrain-batch 1024 --pretrain-lr 1e-3 --epochs 5 --patience 1000 --lr 1e-4 --weight-decay 1e-3 \
            --batch 1024 --seed 1 --run-dir "$out/office-msm4sr"
    fi
}
if [ -n "${CORES:-}" ]; then
    # Both binaries on these cores (e.g. CORES=0,1: the multi-threaded CPU kernels), one after the other.
    runs "$OLD" "$OUT/old" "$CORES"
    runs "$NEW" "$OUT/new" "$CORES"
else
    runs "$OLD" "$OUT/old" 0 & a=$!
    runs "$NEW" "$OUT/new" 1 & b=$!
    wait $a; wait $b  # (a failed run stops the script here: see OUT/old.log, OUT/new.log)
fi

python3 - "$OUT/old" "$OUT/new" <<'PY'
import hashlib, json, os, struct, sys
old, new = sys.argv[1], sys.argv[2]
timing = {"samples_per_s", "train_seconds", "valid_seconds", "seconds"}
def digest(path):
    if path.endswith(".epochs.jsonl"):
        rows = [json.loads(l) for l in open(path)]
        text = json.dumps([{k: v for k, v in r.items() if k not in timing} for r in rows], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
    if path.endswith(".safetensors"):  # the tensors, in name order (metadata order is not fixed)
        b = open(path, "rb").read()
        n = struct.unpack("<Q", b[:8])[0]
        head = json.loads(b[8:8 + n])
        h = hashlib.sha256()
        for name in sorted(k for k in head if k != "__metadata__"):
            t = head[name]
            s, e = t["data_offsets"]
            h.update(json.dumps([name, t["dtype"], t["shape"]]).encode() + b[8 + n + s:8 + n + e])
        return h.hexdigest()
    return hashlib.sha256(open(path, "rb").read()).hexdigest()
bad = 0
for run in sorted(os.listdir(old)):
    if run == "synth":
        files = sorted(os.listdir(os.path.join(old, run)))
    else:
        files = [f for f in sorted(os.listdir(os.path.join(old, run)))
                 if f.endswith((".ranks.tsv", ".epochs.jsonl")) or f in ("model.safetensors", "model.pretrain.safetensors")]
    for f in files:
        a, b = os.path.join(old, run, f), os.path.join(new, run, f)
        same = os.path.exists(b) and digest(a) == digest(b)
        bad += not same
        print(f"{'same' if same else 'DIFFERENT':9} {run}/{f}")
print("every run agrees bit for bit" if not bad else f"{bad} file(s) differ")
# Where a run differs, how much: the per-epoch losses (largest relative difference), whether every
# per-epoch validation metric and the final test metrics are equal, and how many users' ranks moved.
for run in sorted(os.listdir(old)):
    ea, eb = (os.path.join(d, run, "model.epochs.jsonl") for d in (old, new))
    if run == "synth" or not os.path.exists(eb) or digest(ea) == digest(eb):
        continue
    ra, rb = ([json.loads(l) for l in open(e)] for e in (ea, eb))
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ra, rb))
    gap = max((abs(a["valid"][k] - b["valid"][k]) for a, b in zip(ra, rb) for k in a.get("valid") or {}), default=0.0)
    ka, kb = ([l.split("\t") for l in open(os.path.join(d, run, "model.ranks.tsv")).read().split("\n")[1:] if l]
              for d in (old, new))
    moved = sum(a != b for a, b in zip(ka, kb))
    ta, tb = (json.load(open(os.path.join(d, run, "model.result.json"))).get("test") for d in (old, new))
    print(f"  {run}: {len(ra)} epochs, losses within {rel:.1e} relative; per-epoch validation metrics "
          f"{'identical' if gap == 0 else f'within {gap:.1e}'}; ranks of {moved} of {len(ka)} users differ; "
          f"final test metrics {'identical' if ta == tb else f'differ: {ta} vs {tb}'}")
sys.exit(1 if bad else 0)
PY
