#!/usr/bin/env bash
# One batch, two programs: msm4sr's training steps and a plain PyTorch step (tools/torch_step.py,
# written from SPEC.md: eager, one thread, sequences padded to the batch's longest or bucketed by
# length) on the identical batch, features and initial weights, side by side on one core each.
#
#   BIN=target/release/msm4sr PY=/tmp/peer-mp4sr/venv/bin/python bash tools/same_batch.sh DATA [OUT]
#
# DATA: a dataset directory (e.g. ../shared/data/pantry: its training prefixes, 4,926 items).
# msm4sr exports the batch (1024 of the training prefixes, seed 0), random paper-size features
# (10 x 768 per item and modality) and its initial weights to OUT/batch.safetensors; then msm4sr
# runs on core 0 and PyTorch on core 1 at the same time, REPS (5) repetitions of STEPS (3) steps of
# each stage (SASRec, MSM4SR pre-training, fine-tuning); with RUNS > 1 the two programs swap cores
# from one run to the next, so that neither always gets the busier core. Prints, per stage, the median ms per step
# with min and max, the ratio msm4sr / PyTorch bucketed (and padded), and the loss of the batch at
# the initial weights without dropout or mixup in each program (they must agree to ~1e-4
# relative). Then msm4sr alone on both cores (0,1; SCALING=0 skips it) with `bench --scaling`: each
# repetition's steps on one thread and on two, moments apart, for its scaling from one core to two
# (the median of the repetitions' ratios), and the fraction of the GEMM peak (one thread's, and two
# threads') each step reaches (matrix-product FLOPs counted from their shapes). OUT (default a new
# temporary directory) keeps all the JSON.
# RUNS=N (default 1) repeats all of it N times (OUT/run1 ..) and ends with each stage's ratio and
# scaling over the runs, median [min-max]: on a shared host one pair of medians can mislead.
set -euo pipefail
DATA=${1:?dataset directory}
OUT=${2:-$(mktemp -d)}
BIN=$(realpath "${BIN:-target/release/msm4sr}")
PY=${PY:-python3}
REPS=${REPS:-5}
STEPS=${STEPS:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
if [ ! -e "$OUT/batch.safetensors" ]; then
    "$BIN" --device cpu bench --steps-from "$DATA" --export "$OUT/batch.safetensors" --reps 1 --steps 1 > /dev/null
fi
RUNS=${RUNS:-1}
for run in $(seq "$RUNS"); do
    D="$OUT"; [ "$RUNS" -gt 1 ] && D="$OUT/run$run" && mkdir -p "$D"
    # Odd runs: msm4sr on core 0, PyTorch on core 1; even runs the other way round.
    OURS=$(( (run + 1) % 2 )); THEIRS=$(( run % 2 ))
    taskset -c "$OURS" "$BIN" --device cpu bench --steps-from "$DATA" --reps "$REPS" --steps "$STEPS" --json > "$D/msm4sr.json" &
    a=$!
    taskset -c "$THEIRS" "$PY" "$HERE/torch_step.py" --device cpu --threads 1 --from "$OUT/batch.safetensors" --reps "$REPS" --steps "$STEPS" \
        --json > "$D/torch.jsonl" &
    b=$!
    wait $a
    wait $b
    if [ "${SCALING:-1}" != 0 ]; then
        taskset -c 0,1 "$BIN" --device cpu bench --steps-from "$DATA" --reps "$REPS" --steps "$STEPS" --scaling --json > "$D/msm4sr-scaling.json"
    fi
    [ "$RUNS" -gt 1 ] && echo "== run $run of $RUNS ($D)"
    "$PY" - "$D" "$OURS" "$THEIRS" <<'PY'
import json, os, sys
out, core_ours, core_theirs = sys.argv[1:4]
ours = {r["stage"]: r for r in json.load(open(f"{out}/msm4sr.json"))["same_batch"]}
rows = [json.loads(l) for l in open(f"{out}/torch.jsonl")]
theirs = {(r["step"], r["layout"]): r for r in rows if "step" in r}
checks = {r["check_loss"]: r["loss"] for r in rows if "check_loss" in r}
info = next(r["info"] for r in rows if "info" in r)
print(f"{info}; msm4sr on core {core_ours}, PyTorch (eager, 1 thread) on core {core_theirs}, median of {len(next(iter(ours.values()))['ms'])} repetitions")
print(f"{'stage':<10} {'msm4sr ms':>18} {'torch bucketed ms':>22} {'ratio':>6} {'torch padded ms':>20} {'ratio':>6}   loss msm4sr / torch (rel. diff)")
for st in ("sasrec", "pretrain", "finetune"):
    m, tb, tp = ours[st], theirs[(st, "eager bucketed")], theirs[(st, "eager padded")]
    span = lambda r, k="median_ms": f"{r[k]:.0f} [{r['min_ms']:.0f}-{r['max_ms']:.0f}]"
    tspan = lambda r: f"{r['ms']:.0f} [{r['min_ms']:.0f}-{r['max_ms']:.0f}]"
    lm, lt = m["check_loss"], checks[st]
    print(f"{st:<10} {span(m):>18} {tspan(tb):>22} {m['median_ms'] / tb['ms']:>6.2f} {tspan(tp):>20} {m['median_ms'] / tp['ms']:>6.2f}"
          f"   {lm:.6f} / {lt:.6f} ({abs(lm - lt) / abs(lt):.1e})")
scal = f"{out}/msm4sr-scaling.json"
if os.path.exists(scal):
    both = {r["stage"]: r for r in json.load(open(scal))["same_batch"]}
    print()
    print("msm4sr alone on cores 0,1: each repetition on one thread and on two, moments apart; matrix-product GFLOP per step and the fraction of the GEMM peak")
    print(f"{'stage':<10} {'1 thread ms':>12} {'2 threads ms':>13} {'scaling':>8} {'GEMM GFLOP':>11} {'1 thread: of peak':>18} {'2 threads: of peak':>19}")
    for st in ("sasrec", "pretrain", "finetune"):
        t = both[st]
        print(f"{st:<10} {t['median_ms_one_thread']:>12.0f} {t['median_ms']:>13.0f} {t['scaling']:>7.2f}x {t['gemm_gflop_per_step']:>11.2f}"
              f" {100 * t['peak_fraction_one_thread']:>17.0f}% {100 * t['peak_fraction']:>18.0f}%")
    print(f"GEMM peak: {both['sasrec']['peak_gflops_one_thread']:.1f} GFLOP/s on one thread, {both['sasrec']['peak_gflops']:.1f} on two"
          " (scaling: the median of the repetitions' one-thread / two-thread ratios)")
PY
done
if [ "$RUNS" -gt 1 ]; then
    "$PY" - "$OUT" "$RUNS" <<'PY'
import json, os, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
print(f"\nover {runs} runs (each run's own ratio; the host's load moves both programs; the cores alternate): median [min-max]")
print(f"{'stage':<10} {'msm4sr / torch bucketed':>26} {'1 -> 2 cores':>22} {'1 thread: of GEMM peak':>24}")
for st in ("sasrec", "pretrain", "finetune"):
    ratio, scale, frac = [], [], []
    for i in range(1, runs + 1):
        d = f"{out}/run{i}"
        ours = {r["stage"]: r for r in json.load(open(f"{d}/msm4sr.json"))["same_batch"]}
        rows = [json.loads(l) for l in open(f"{d}/torch.jsonl")]
        tb = next(r for r in rows if r.get("step") == st and r.get("layout") == "eager bucketed")
        ratio.append(ours[st]["median_ms"] / tb["ms"])
        if os.path.exists(f"{d}/msm4sr-scaling.json"):
            both = {r["stage"]: r for r in json.load(open(f"{d}/msm4sr-scaling.json"))["same_batch"]}
            scale.append(both[st]["scaling"])
            frac.append(100 * both[st]["peak_fraction_one_thread"])
    span = lambda v, f: f"{f(statistics.median(v))} [{f(min(v))}-{f(max(v))}]" if v else "-"
    print(f"{st:<10} {span(ratio, lambda x: f'{x:.2f}'):>26} {span(scale, lambda x: f'{x:.2f}x'):>22} {span(frac, lambda x: f'{x:.1f}%'):>24}")
PY
fi
