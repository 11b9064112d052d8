#!/usr/bin/env bash
# ATTEMPT benchmark on a 2-core CPU with the default model (issue 5): train source prompts, then compare
# ATTEMPT, ATTEMPT-m, SPoT and the PET methods on four target tasks with 16 and 32 training examples per
# task (few-shot; 32 is also the CPU-sized main setting, where the beyond-paper ATTEMPT options run:
# token-level attention, deep instance prompts, MLP reparameterisation). KS="16 32 64" adds settings.
# Resumable; needs ../shared/data. Output: runs/bench/attempt/{sources,k16,k32}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/data/CL_Benchmark ] || { echo "needs ../shared/data/CL_Benchmark (the benchmark data)"; exit 2; }
OUT="${OUT:-runs/bench/attempt}"
SRC="$OUT/sources"
.venv/bin/petmix sources train --config benchmarks/configs/attempt_sources_cpu.yaml --out "$SRC"
# Learning rates: raw prompts (and ATTEMPT's G, trained with its prompt as in the paper) 3e-2; prompt
# encoders, LoRA and BitFit 1e-3; all weights 5e-5.
PET="prompt-tuning,prefix-tuning=prefix-tuning:lr=1e-3,p-tuning=p-tuning:lr=1e-3,p-tuning-v2,bitfit=bitfit:lr=1e-3,lora=lora:lr=1e-3,full-ft=full-ft:lr=5e-5"
TRANSFER="spot,attempt=attempt:prompt_init=mnli,attempt-m=attempt-m:prompt_init=mnli"
BEYOND="attempt-token=attempt:prompt_init=mnli:attempt_token_level=true,attempt-deep=attempt:prompt_init=mnli:prompt_depth=deep,attempt-mlp=attempt:prompt_init=mnli:prompt_encoder=mlp:lr=1e-3"
for k in ${KS:-32 16}; do
  # 12 optimiser steps per task whatever k is (batch 8): a CPU budget
  epochs=$(python3 -c "print(96 / $k)")
  methods="$TRANSFER,$PET"
  [ "$k" = 32 ] && methods="$methods,$BEYOND"
  .venv/bin/petmix compare --config benchmarks/configs/attempt_cpu.yaml --sources "$SRC" --max-train "$k" \
    --epochs "$epochs" --out "$OUT/k$k" --methods "$methods"
done
