#!/usr/bin/env bash
# Everything measured on a GPU machine in one run of a few minutes: the adapter, every kernel's
# gradient check, the kernel benchmarks (GFLOP/s; every matmul variant and the autotune's pick),
# dispatches, copies and submits per training step and the
# step times, and the PyTorch peer (tools/torch_step.py: the same steps in eager PyTorch and under
# torch.compile, and torch.matmul as the cuBLAS reference, TF32 off). Output: $OUT (default
# gpu-check/) with one file per part and summary.txt.
#
#   BIN=target/release/msm4sr bash tools/gpu_check.sh
#
# On a machine without a Vulkan loader, carry the loader packages in .gl/ (see benches/RESULTS.md
# for how they were fetched); they are unpacked here first. VK_DRIVER_FILES points at the NVIDIA ICD
# when the loader finds no driver on its own.
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/msm4sr}
OUT=${OUT:-gpu-check}
PY=${PY:-python3}
DATA=${DATA:-../shared/data/pantry}
mkdir -p "$OUT"
# The matmul autotune's picks (and every variant's time per shape) land in $OUT/cache/matmul_tune.json.
export MSM4SR_CACHE_DIR=${MSM4SR_CACHE_DIR:-$OUT/cache}
if ls .gl/*.deb >/dev/null 2>&1 && ! ldconfig -p | grep -q libvulkan; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
part() { # name, then the command; its output to $OUT/name.txt, and the time it took
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" >> "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
{ date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; } >> "$OUT/summary.txt"
part info "$BIN" --device gpu info
part gradcheck "$BIN" --device gpu gradcheck
part bench "$BIN" --device gpu bench --secs 0.5 --matmul-variants
part bench_json "$BIN" --device gpu bench --secs 0.5 --matmul-variants --json
part torch_step timeout 300 "$PY" tools/torch_step.py --data "$DATA" --steps 20 --matmul --compile
grep -E "passed|failed" "$OUT/gradcheck.txt" | tail -1 >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
echo "--- bench"; cat "$OUT/bench.txt"
echo "--- torch"; cat "$OUT/torch_step.txt"
