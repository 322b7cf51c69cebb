#!/usr/bin/env bash
# Build the wheel that `pip install` takes: target/wheels/msm4sr-VERSION-py3-none-PLATFORM.whl,
# carrying the release binary (maturin, `bindings = "bin"` in pyproject.toml). Installing it needs
# no Rust toolchain:  pip install target/wheels/msm4sr-*.whl && msm4sr quickstart
#
#   bash tools/build_wheel.sh [--check]
#     --check  also install the wheel into a fresh virtual environment and run `msm4sr --version`
#              and `msm4sr info` from it (CI does; the test `package` then runs the quickstart)
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
wheel="$(ls target/wheels/msm4sr-*.whl)"
echo "wheel: $wheel ($(du -h "$wheel" | cut -f1))"
if [[ "${1:-}" == "--check" ]]; then
    venv="$(mktemp -d)/venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --no-index --disable-pip-version-check "$wheel"
    echo "installed into a fresh venv: $("$venv/bin/pip" show msm4sr | grep -E '^(Name|Version)' | tr '\n' ' ')"
    echo "\$ msm4sr --version"; "$venv/bin/msm4sr" --version
    echo "\$ msm4sr info"; "$venv/bin/msm4sr" info
    rm -rf "$(dirname "$venv")"
fi
