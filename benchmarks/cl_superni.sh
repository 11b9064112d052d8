#!/usr/bin/env bash
# Continual-learning comparison on a CPU-sized SuperNI stream with the default model.
# Resumable: finished entries are read, unfinished ones continue. Needs ../shared/data.
# seq-ft (full fine-tuning) runs at lr 5e-5, a usual full fine-tuning rate; 1e-3 is the LoRA and prompt rate.
# Output: runs/bench/superni5/{table.md,table.csv,matrices.png,<entry>/...}
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/data/CL_Benchmark ] || { echo "needs ../shared/data/CL_Benchmark (the benchmark data)"; exit 2; }
.venv/bin/petmix compare --config benchmarks/configs/superni5_cpu.yaml --out "${OUT:-runs/bench/superni5}" \
  --methods "${METHODS:-per-task-lora,sapt-lora,sapt-lora-kl0.1=sapt-lora:kl_ratio=0.1,sapt-lora-no-arm=sapt-lora:kl_ratio=0,sapt-lora-arm-real=sapt-lora:replay_source=real,seq-lora,inc-lora,mtl-lora,sapt-prompt,seq-prompt,seq-ft=seq-ft:lr=5e-5,replay,ewc,lwf,o-lora,l2p,lfpt5,prog-prompt}"
