#!/usr/bin/env bash
# The per-shape GEMM table of benches/RESULTS.md (fourth round), in one go on one core:
#   bash benches/gemm_shapes/run.sh [CORE] [PYTHON]     (PYTHON with torch: adds its column)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); core=${1:-0}; py=${2:-}
cd "$here"
cargo build --release -q --target-dir target/avx2
cargo build --release -q --features x86-v4 --target-dir target/v4
taskset -c "$core" target/v4/release/gemm_shapes
taskset -c "$core" target/avx2/release/gemm_shapes
if [ -n "$py" ]; then taskset -c "$core" "$py" torch_shapes.py; fi
