#!/usr/bin/env bash
# SAPT's attentive reflection (ARM), issue 12 part 3: what the pseudo-inputs come from, at the default
# (prototype) router. Entries: feature statistics (petmix's default), SAPT's generated pseudo-inputs,
# real stored training inputs (an oracle: it keeps old examples, which SAPT must not), and no
# reflection at all (kl_ratio 0). Same stream, settings and test examples as benchmarks/routing.sh.
# Resumable. Needs ../shared/data. Run it from a checkout nobody edits meanwhile (see routing.sh).
#   STREAM=long4 SEEDS=0 bash benchmarks/reflection.sh
#   STREAM=long4-shared SEEDS=0 bash benchmarks/reflection.sh   (the Long stream issue 12 names)
# Output: runs/bench/reflection-<stream>/{table.md,per_task.md,<entry>/seed-<s>/...}
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/kept.sh
[ -d ../shared/data/CL_Benchmark ] || { echo "needs ../shared/data/CL_Benchmark (the benchmark data)"; exit 2; }
stream=${STREAM:-long4}
extra=()
case $stream in
  superni5) config=benchmarks/configs/superni5_cpu.yaml ;;
  long4) config=benchmarks/configs/long4_cpu.yaml ;;
  long4-shared) config=benchmarks/configs/long4_cpu.yaml; extra=(--stream long4-shared) ;;
  *) echo "unknown stream $stream (superni5, long4 or long4-shared)"; exit 2 ;;
esac
# The sapt-lora entry has exactly routing.sh's settings: a seed routing.sh finished (kept in the archive)
# is read from there instead of trained again (compare checks its config.json against these settings).
archive="${ARCHIVE:-benchmarks/results/runs}"
seeds=${SEEDS:-0}
for seed in ${seeds//,/ }; do
  from="$archive/routing-$stream/sapt-lora/seed-$seed"
  if [ -f "$from/results.json" ]; then
    .venv/bin/python benchmarks/archive.py restore "$from" "runs/bench/reflection-$stream/sapt-lora/seed-$seed"
  fi
done
# lr 1e-3: routing.sh's rate (its kept seeds are read here), not sapt-lora's own default since (docs/tuned.md)
kept_compare "runs/bench/reflection-$stream" --config "$config" "${extra[@]}" --lr 1e-3 --seeds "${SEEDS:-0}" --no-floors \
  --methods "sapt-lora,arm-generated=sapt-lora:replay_source=generated,arm-real=sapt-lora:replay_source=real,no-arm=sapt-lora:kl_ratio=0"
