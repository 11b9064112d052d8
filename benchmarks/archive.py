"""Keep a comparison's finished runs in the repository, so its table accumulates across machines.

A benchmark table takes more 2-core hours than one working session has, and a session starts from a
fresh clone: run folders under runs/ are gone. `petmix compare` counts a run as finished from its
results.json (and checks its config.json against the entry's settings), so those two files, with
stages.json and the floors' caches, are all a later `compare` needs to read the run instead of training
it again. A `petmix tune` folder is kept the same way: its candidates are runs, plus its tuned.yaml. No weights, no predictions, no task text (each task's definition is replaced by its digest):
the archive is small and holds nothing of the benchmark data.

    .venv/bin/python benchmarks/archive.py save runs/bench/routing-superni5 benchmarks/results/runs/routing-superni5
    .venv/bin/python benchmarks/archive.py restore benchmarks/results/runs/routing-superni5 runs/bench/routing-superni5

`save` copies only finished runs (every stage in results.json); `restore` never overwrites a file that is
already in the run folder.
A restored run has no blocks: `petmix report`, `load` and benchmarks/routing_check.py need the original.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from petmix.errors import PetmixError
from petmix.runs import read_json, write_json

TUNED = "tuned.yaml"  # written by `petmix tune` at the top of its --out folder


def _slim(results: dict[str, Any]) -> dict[str, Any]:
    """results.json without task text: each task's definition becomes its digest."""
    for info in (results.get("per_task") or {}).values():
        text = info.get("definition") if isinstance(info, dict) else None
        if text and not text.startswith("sha256:"):  # a run put back from the archive has its digest already
            info["definition"] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return results


def _finished(results: dict[str, Any]) -> bool:
    stages = results.get("stage_names")  # absent for the zero-shot floor: one evaluation, no stages
    return stages is None or stages == ["joint"] or len(results.get("matrix") or []) >= len(results.get("tasks") or [])


def save(out: Path, dest: Path) -> list[Path]:
    """Every finished run under ``out`` (the floors' zero-shot folder included) and the majority floors."""
    written = []
    for path in sorted(out.rglob("results.json")):
        results = read_json(path)
        if not _finished(results):
            continue
        target = dest / path.parent.relative_to(out)
        write_json(target / "results.json", _slim(results))
        written.append(target / "results.json")
        for name in ("config.json", "stages.json"):
            if (path.parent / name).is_file():
                write_json(target / name, read_json(path.parent / name))
                written.append(target / name)
    for floor in sorted((out / "floors").glob("majority-seed-*.json")) if (out / "floors").is_dir() else []:
        write_json(dest / "floors" / floor.name, read_json(floor))
        written.append(dest / "floors" / floor.name)
    if (out / "compare.json").is_file():  # the comparison's record: it marks the folder as petmix's own
        write_json(dest / "compare.json", read_json(out / "compare.json"))
        written.append(dest / "compare.json")
    if (out / TUNED).is_file():  # `petmix tune`'s choices; its candidates are runs, kept above
        dest.mkdir(parents=True, exist_ok=True)
        _merge_tuned(out / TUNED, dest / TUNED)
        written.append(dest / TUNED)
    return written


def _merge_tuned(new: Path, kept: Path) -> None:
    """Merge ``new``'s choices into ``kept``'s, method by method: two tunings of other methods into one
    archive (two processes, or two clones) keep both; a method in both keeps the later choice (its
    ``tuned_at``; an entry without one is older), whichever file it came in."""
    tmp = kept.with_name(f".{TUNED}.tmp")
    if not kept.is_file():  # nothing to merge: the file as petmix wrote it
        shutil.copyfile(new, tmp)
        tmp.replace(kept)
        return
    methods = (yaml.safe_load(kept.read_text(encoding="utf-8")) or {}).get("methods") or {}
    text = new.read_text(encoding="utf-8")
    fresh = (yaml.safe_load(text) or {}).get("methods") or {}
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    for name, entry in fresh.items():
        if str((entry or {}).get("tuned_at", "")) >= str((methods.get(name) or {}).get("tuned_at", "")):
            methods[name] = entry
    tmp.write_text(header + yaml.safe_dump({"methods": methods}, sort_keys=False), encoding="utf-8")
    tmp.replace(kept)


def restore(dest: Path, out: Path) -> list[Path]:
    written = []
    for src in sorted([*dest.rglob("*.json"), *dest.glob(TUNED)]):
        target = out / src.relative_to(dest)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="RUNS -> ARCHIVE: the finished runs' JSON files")
    s.add_argument("runs")
    s.add_argument("archive")
    r = sub.add_parser("restore", help="ARCHIVE -> RUNS: files not already there")
    r.add_argument("archive")
    r.add_argument("runs")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except PetmixError as err:  # a damaged JSON file, named
        print(f"archive.py: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "save":
        if not Path(args.runs).is_dir():
            print(f"archive.py: {args.runs}: no such folder", file=sys.stderr)
            return 2
        files = save(Path(args.runs), Path(args.archive))
    else:
        if not Path(args.archive).is_dir():
            return 0  # nothing archived yet: nothing to restore
        files = restore(Path(args.archive), Path(args.runs))
    print(f"{args.cmd}: {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
