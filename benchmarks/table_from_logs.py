"""A comparison table from the logs of one-seed `petmix compare` cells, where the cells' run folders are gone.

`petmix compare` builds its tables from finished runs (results.json). A batch of cells run elsewhere
(one process per entry and seed, on a lent GPU) whose run folders could not be brought back leaves only
its logs; each log ends with the cell's one-seed table. This reads those rows and summarises them over
the seeds the same way `compare` does (petmix.stats: mean ± sample standard deviation, and `~` where a
difference to the best lies within noise). It cannot check the runs' settings as `compare` does: the
logs' commands are the record. A table built here is a measurement to quote, not an archive that
`compare --no-train` resumes from.

Usage: python benchmarks/table_from_logs.py LOG_DIR      (files ENTRY-SEED.log, e.g. sapt-lora-0.log)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from petmix.stats import Summary, within_noise

METRICS = ["AP", "F.Ra", "FWT", "BWT", "routing acc"]
FLOORS = ["floor: majority label", "floor: zero-shot"]


def cell_rows(log: Path) -> dict[str, dict[str, str]]:
    """Every row of the first table in a cell's log (its one-seed results table), by its first column."""
    header, rows = None, {}
    for line in log.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| method |"):
            if header:
                break  # a later table (the pairwise one) repeats the names
            header = cells
        elif header and line.startswith("| ") and len(cells) == len(header) and not cells[0].startswith("---"):
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def number(text: str | None) -> float | None:
    return None if text in (None, "", "-") else float(text)


def table(log_dir: Path) -> str:
    rows: dict[str, dict[int, dict[str, str]]] = {}
    floors: dict[str, dict[int, dict[str, str]]] = {}
    for log in sorted(log_dir.glob("*.log")):
        m = re.fullmatch(r"(.+)-(\d+)\.log", log.name)
        if not m:
            continue
        found = cell_rows(log)
        if m.group(1) not in found:
            raise SystemExit(f"{log}: no finished row for {m.group(1)} (the cell did not finish)")
        rows.setdefault(m.group(1), {})[int(m.group(2))] = found[m.group(1)]
        for floor in FLOORS:  # a cell run with floors (one per seed is enough) lists them first
            if floor in found:
                floors.setdefault(floor, {})[int(m.group(2))] = found[floor]
    summaries = {e: {k: Summary.of([number(r.get(k)) for r in seeds.values()]) for k in METRICS}
                 for e, seeds in rows.items()}
    order = sorted(rows, key=lambda e: -(summaries[e]["AP"].mean or 0))
    best = summaries[order[0]]["AP"]
    lines = ["| method | seeds | " + " | ".join(METRICS) + " | vs best AP | AP per seed |",
             "|---" * (len(METRICS) + 4) + "|"]
    for floor, seeds in floors.items():
        lines.append(f"| {floor} | {','.join(map(str, sorted(seeds)))} | "
                     + " | ".join(Summary.of([number(r.get(k)) for r in seeds.values()]).cell() for k in METRICS)
                     + " |  | " + " / ".join(seeds[k]["AP"] for k in sorted(seeds)) + " |")
    for e in order:
        s = summaries[e]
        mark = "best" if e == order[0] else {True: "~", False: "<", None: ""}[within_noise(s["AP"], best)]
        per_seed = " / ".join(rows[e][k]["AP"] for k in sorted(rows[e]))
        lines.append(f"| {e} | {','.join(map(str, sorted(rows[e])))} | "
                     + " | ".join(s[k].cell() for k in METRICS) + f" | {mark} | {per_seed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: python benchmarks/table_from_logs.py LOG_DIR")
    print(table(Path(sys.argv[1])))
