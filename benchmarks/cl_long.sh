#!/usr/bin/env bash
# Continual-learning comparison on a CPU-sized Long Sequence stream (4 tasks) with the default model.
# Resumable: finished entries are read, unfinished ones continue. Needs ../shared/data.
# seq-ft (full fine-tuning) runs at lr 5e-5, a usual full fine-tuning rate; 1e-3 is the LoRA and prompt rate.
# Output: runs/bench/long4/{table.md,table.csv,matrices.png,<entry>/...}
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/data/CL_Benchmark ] || { echo "needs ../shared/data/CL_Benchmark (the benchmark data)"; exit 2; }
.venv/bin/petmix compare --config benchmarks/configs/long4_cpu.yaml --out "${OUT:-runs/bench/long4}" \
  --methods "${METHODS:-per-task-lora,sapt-lora,seq-lora,inc-lora,mtl-lora,sapt-prompt,seq-prompt,seq-ft=seq-ft:lr=5e-5,replay,ewc,lwf,o-lora,l2p,lfpt5,prog-prompt}"
