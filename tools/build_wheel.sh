#!/usr/bin/env bash
# Build the wheel that `pip install` takes: target/wheels/msm4sr-VERSION-py3-none-PLATFORM.whl,
# carrying the release binary (maturin, `bindings = "bin"` in pyproject.toml). Installing it needs
# no Rust toolchain:  pip install target/wheels/msm4sr-*.whl && msm4sr quickstart
#
# The wheel is for the platform it was built on (here: Linux x86-64 with the glibc of this machine,
# and a CPU with AVX2 + FMA, see .cargo/config.toml); build it in a manylinux container for a wheel
# that installs on older Linux distributions.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
env="$(bash tools/python_env.sh)"
rm -f target/wheels/msm4sr-*.whl
"$env/bin/maturin" build --release --out target/wheels
ls target/wheels/msm4sr-*.whl
