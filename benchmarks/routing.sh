#!/usr/bin/env bash
# SAPT's selection (issue: the router must tell tasks apart): the new default router against the
# paper's preset and the task-id reference, on the SuperNI five-task stream and long4-shared, with
# 100 test examples per task. Resumable: finished entries are read, unfinished ones continue, so the
# table can be completed over several runs. Needs ../shared/data.
#   STREAMS="superni5 long4" SEEDS="0 1 2" bash benchmarks/routing.sh
# Output: runs/bench/routing-<stream>/{table.md,table.csv,<entry>/...}; then
#   .venv/bin/python benchmarks/routing_check.py runs/bench/routing-<stream>/<entry>   (no-definition check)
#   .venv/bin/python benchmarks/seed_table.py runs/bench/routing-<stream>              (mean +- std over seeds)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/data/CL_Benchmark ] || { echo "needs ../shared/data/CL_Benchmark (the benchmark data)"; exit 2; }
for stream in ${STREAMS:-superni5 long4}; do
  case $stream in
    superni5) config=benchmarks/configs/superni5_cpu.yaml ;;
    long4) config=benchmarks/configs/long4_cpu.yaml ;;
    *) echo "unknown stream $stream (superni5 or long4)"; exit 2 ;;
  esac
  for seed in ${SEEDS:-0}; do
    s=""; [ "$seed" = 0 ] || s="-s$seed"
    # The paper's preset: its router and generative replay, at the kl_ratio that did best on CPU before.
    main="per-task-lora$s=per-task-lora:seed=$seed,sapt-lora$s=sapt-lora:seed=$seed"
    main="$main,sapt-paper$s=sapt-lora:seed=$seed:router=paper:replay_source=generated:kl_ratio=0.1"
    extra=""; [ "$seed" = 0 ] && extra=",inc-lora,seq-lora,o-lora"
    .venv/bin/petmix compare --config "$config" --out "runs/bench/routing-$stream" --methods "${METHODS:-$main$extra}"
  done
done
