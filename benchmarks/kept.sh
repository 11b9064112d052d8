# Sourced by the benchmark scripts: `kept_compare OUT ARGS...` runs `petmix compare ARGS... --out OUT`
# between a restore and a save of the finished runs' JSON files (benchmarks/archive.py), so that a table
# accumulates across fresh clones. ARCHIVE (default benchmarks/results/runs) is where they are kept.
kept_compare() {
  local out=$1 rc=0
  shift
  local kept="${ARCHIVE:-benchmarks/results/runs}/${out#*runs/bench/}"
  .venv/bin/python benchmarks/archive.py restore "$kept" "$out"
  .venv/bin/petmix compare "$@" --out "$out" || rc=$?
  [ -d "$out" ] && .venv/bin/python benchmarks/archive.py save "$out" "$kept"
  return $rc
}
