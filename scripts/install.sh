#!/usr/bin/env bash
# Install lightning-sae and everything its tests and default example need into a virtualenv.
#   bash scripts/install.sh [VENV_DIR]   (default: .venv)
# Order matters: the CPU build of torch 2.13.0 goes in first, so the project's `torch>=2.4`
# range is already satisfied and pip never pulls a multi-GB CUDA build.
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet -e ".[dev]"
