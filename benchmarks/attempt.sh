#!/usr/bin/env bash
# ATTEMPT benchmark on a 2-core CPU with the default model (issues 5 and 15): train source prompts, then
# compare ATTEMPT, ATTEMPT-m, SPoT and the PET methods on four target tasks (RTE, CB, WiC, Amazon; none is
# a source task) with K training examples per task (few-shot, default 32):
#  1. `petmix sources train`: prompt tuning on MNLI, QQP, SST-2 and Quoref;
#  2. `petmix tune`: each method's learning rate (and prompt length where it has no source prompt to
#     match) on a validation split carved from the TRAIN split of RTE and CB (test is never read).
#     ATTEMPT and ATTEMPT-m start their target prompts from the MNLI source prompt, as in the paper;
#  3. `petmix compare --seeds 0,1,2 --tuned`: 100 test examples per task (all 56 of CB), mean ± std,
#     noise marks, the majority-label and zero-shot floors.
# Every method gets the same budget: EPOCHS (default 6) epochs of K examples in batches of 8, i.e. 24
# optimiser steps per task at K = 32 (ATTEMPT-m: one joint stage over the four tasks, the same steps).
# Resumable, and finished runs accumulate across clones (benchmarks/kept.sh). Needs ../shared/data.
# METHODS=... (a subset) or SEEDS=0 for a partial run. Output: runs/bench/attempt/{sources,k$K/{tune,compare}}.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/kept.sh
[ -d ../shared/data/CL_Benchmark ] || { echo "needs ../shared/data/CL_Benchmark (the benchmark data)"; exit 2; }
OUT="${OUT:-runs/bench/attempt}"
SRC="$OUT/sources"
K="${K:-32}"
EPOCHS="${EPOCHS:-6}"
# The source prompts are kept beside the runs (benchmarks/results/runs/attempt/sources, 212 KB): trained
# again elsewhere (another machine or thread count) they come out as other prompts, and every kept ATTEMPT
# run records the digests of the ones it read. A fresh clone copies them in instead of training.
KEPT_SRC="${ARCHIVE:-benchmarks/results/runs}/attempt/sources"
if [ ! -f "$SRC/index.json" ] && [ -f "$KEPT_SRC/index.json" ]; then mkdir -p "$SRC" && cp "$KEPT_SRC"/* "$SRC"/; fi
[ -f "$SRC/index.json" ] || .venv/bin/petmix sources train --config benchmarks/configs/attempt_sources_cpu.yaml --out "$SRC"
[ -f "$KEPT_SRC/index.json" ] || { mkdir -p "$KEPT_SRC" && cp "$SRC"/*.safetensors "$SRC"/*.json "$KEPT_SRC"/; }
COMMON=(--config benchmarks/configs/attempt_cpu.yaml --sources "$SRC" --max-train "$K" --epochs "$EPOCHS")
# Methods whose prompts start from random vocabulary embeddings (SPoT: from the source its probe picks) ...
PLAIN="${PLAIN:-prompt-tuning,prefix-tuning,p-tuning,p-tuning-v2,bitfit,lora,full-ft,spot}"
# ... and ATTEMPT's two, from the MNLI source prompt. Their tunings share one tuned.yaml.
FROM_MNLI="${FROM_MNLI:-attempt,attempt-m}"
[ -n "$PLAIN" ] && kept_tune "$OUT/k$K/tune" "${COMMON[@]}" --methods "$PLAIN" --tune-tasks 2 --val-max 50
[ -n "$FROM_MNLI" ] && kept_tune "$OUT/k$K/tune" "${COMMON[@]}" --prompt-init mnli --methods "$FROM_MNLI" \
  --tune-tasks 2 --val-max 50
# Beyond the paper (ablations at ATTEMPT's tuned rate; the MLP encoder keeps an encoder's rate):
BEYOND="attempt-token=attempt:prompt_init=mnli:attempt_token_level=true,attempt-deep=attempt:prompt_init=mnli:prompt_depth=deep,attempt-mlp=attempt:prompt_init=mnli:prompt_encoder=mlp:lr=1e-3"
kept_compare "$OUT/k$K/compare" "${COMMON[@]}" --max-test 100 --seeds "${SEEDS:-0,1,2}" --tuned "$OUT/k$K/tune/tuned.yaml" \
  --methods "${METHODS:-attempt=attempt:prompt_init=mnli,attempt-m=attempt-m:prompt_init=mnli,$PLAIN,$BEYOND}"
