#!/usr/bin/env bash
# Continual-learning comparison on a CPU-sized SuperNI stream with the default model (issue 15):
#  1. `petmix tune`: each method's learning rate (and its most sensitive option: kl_ratio for SAPT,
#     olora_lambda1 for O-LoRA, ewc_lambda for EWC, prompt_length for prompt methods) on a validation
#     split carved from the TRAIN split of the stream's first two tasks (test is never read);
#  2. `petmix compare --seeds 0,1,2 --tuned`: every entry once per seed (training sample, initialisation
#     and data order vary; one test set of up to 100 examples per task, all where a task has fewer),
#     mean ± std with differences within noise marked, and the majority-label and zero-shot floors.
# Hours on 2 CPU cores. Both steps are resumable and accumulate in their folders: stop it any time and
# start it again; the table shows which seeds are still missing. Needs ../shared/data.
# SEEDS=0 (one seed) or METHODS=... (a subset) for a partial run; JOBS=N trains N runs at once. Output: $OUT/{tune,compare}.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/kept.sh
[ -d ../shared/data/CL_Benchmark ] || { echo "needs ../shared/data/CL_Benchmark (the benchmark data)"; exit 2; }
OUT="${OUT:-runs/bench/superni5}"
CONFIG=benchmarks/configs/superni5_cpu.yaml
TUNE="${TUNE:-per-task-lora,sapt-lora,seq-lora,inc-lora,mtl-lora,sapt-prompt,seq-prompt,seq-ft,replay,ewc,lwf,o-lora,l2p,lfpt5,prog-prompt}"
kept_tune "$OUT/tune" --config "$CONFIG" --methods "$TUNE" --tune-tasks 2 --val-max 50 --jobs "${JOBS:-1}"
# Ablations keep their own setting over the tuned one (an entry's key=value wins); the rest are tuned.
kept_compare "$OUT/compare" --config "$CONFIG" --max-test 100 --seeds "${SEEDS:-0,1,2}" --jobs "${JOBS:-1}" --tuned "$OUT/tune/tuned.yaml" \
  --methods "${METHODS:-per-task-lora,sapt-lora,sapt-lora-no-arm=sapt-lora:kl_ratio=0,sapt-lora-arm-real=sapt-lora:replay_source=real,seq-lora,inc-lora,mtl-lora,sapt-prompt,seq-prompt,seq-ft,replay,ewc,lwf,o-lora,l2p,lfpt5,prog-prompt}"
