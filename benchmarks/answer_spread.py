"""How varied a comparison's answers are: per entry and task, the share of test inputs that get the
entry's most frequent answer, and the number of distinct answers, over the seeds' final predictions.

A method whose score sits at the majority-label floor may have learned the task's answer format and
nothing else (one answer for every input), or may answer in earnest and be as often wrong; this says
which. Usage:

    .venv/bin/python benchmarks/answer_spread.py runs/bench/attempt/k32/compare [--entries a,b]
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petmix.runs import read_json, read_jsonl  # noqa: E402
from petmix.train import finished_run  # noqa: E402


def spread(run: Path, task: str) -> tuple[float, int, str] | None:
    """(share of the most frequent answer, distinct answers, that answer) of a run's final predictions."""
    path = run / "predictions" / f"{task}.jsonl"
    if not path.is_file():
        return None
    answers = [str(r["prediction"]).strip() for r in read_jsonl(path)]
    if not answers:
        return None
    top, count = collections.Counter(answers).most_common(1)[0]
    shown = re.sub(r"\n\s*", r"\\n", top)  # one table line: a line break shows as \n
    return count / len(answers), len(set(answers)), shown if len(shown) <= 30 else shown[:27] + "..."


def finished(run: Path) -> bool:
    results = read_json(run / "results.json") if (run / "results.json").is_file() else {}
    return bool(results) and finished_run(run, results["method"], len(results["tasks"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--entries", help="comma-separated entry labels (default: every entry with runs)")
    args = ap.parse_args(argv)
    labels = args.entries.split(",") if args.entries else sorted(
        p.name for p in args.compare_dir.iterdir() if p.is_dir() and any(p.glob("seed-*/results.json")))
    tasks: list[str] = []
    rows = []
    for label in labels:
        runs = [r for r in sorted((args.compare_dir / label).glob("seed-*")) if finished(r)]
        if not runs:
            continue
        tasks = tasks or list(read_json(runs[0] / "results.json")["tasks"])
        cells = []
        for task in tasks:
            got = [s for s in (spread(r, task) for r in runs) if s is not None]
            if not got:
                cells.append("-")
                continue
            share = statistics.mean(s[0] for s in got) * 100
            distinct = statistics.mean(s[1] for s in got)
            tops = "/".join(sorted({s[2] for s in got}))
            cells.append(f"{share:.0f}% '{tops}', {distinct:.1f} distinct")
        rows.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    print("Share of test inputs given the most frequent answer (mean over seeds), that answer, and the mean")
    print("number of distinct answers per seed:\n")
    print("| entry | seeds | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
