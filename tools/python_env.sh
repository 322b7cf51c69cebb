#!/usr/bin/env bash
# A Python environment for the wheel and the README's Python section: maturin (builds the `pip
# install msm4sr` wheel) and pandas, numpy and safetensors (read the run files). Made with the
# machine's python3 (3.8 or later) and packages from PyPI.
#
# Usage: tools/python_env.sh [DIR]     (default: target/pyenv in the repository); prints DIR.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/target/pyenv}"
if [[ ! -x "$dest/bin/python" ]]; then
    python3 -m venv "$dest"
fi
"$dest/bin/python" -m pip install --quiet --disable-pip-version-check "maturin>=1.5,<2" pandas numpy safetensors
echo "$dest"
