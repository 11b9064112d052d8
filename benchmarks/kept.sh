# Sourced by the benchmark scripts. `kept OUT COMMAND...` runs COMMAND between a restore and a save of the
# finished runs' JSON files under OUT (benchmarks/archive.py), so that a table or a tuning accumulates
# across fresh clones. ARCHIVE (default benchmarks/results/runs) is where they are kept.
#   kept_compare OUT ARGS...   = kept OUT petmix compare ARGS... --out OUT
#   kept_tune OUT ARGS...      = kept OUT petmix tune ARGS... --out OUT
kept() {
  local out=$1 rc=0
  shift
  local archived="${ARCHIVE:-benchmarks/results/runs}/${out#*runs/bench/}"
  .venv/bin/python benchmarks/archive.py restore "$archived" "$out"
  "$@" || rc=$?
  [ -d "$out" ] && .venv/bin/python benchmarks/archive.py save "$out" "$archived"
  return $rc
}
kept_compare() { local out=$1; shift; kept "$out" .venv/bin/petmix compare "$@" --out "$out"; }
kept_tune() { local out=$1; shift; kept "$out" .venv/bin/petmix tune "$@" --out "$out"; }
