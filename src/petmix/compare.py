"""Run several methods on one task stream and put their numbers side by side.

Each entry trains into ``OUT/<label>`` (resumable: a finished entry is read, not re-run). A
``per-task-lora`` entry, when present, runs first and gives every other entry its single-task
scores, so that FWT is defined. Writes ``OUT/table.md``, ``OUT/table.csv`` and ``OUT/matrices.png``.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petmix.data.task import Task
from petmix.errors import PetmixError
from petmix.methods import get_method
from petmix.runs import read_json
from petmix.train import TrainConfig, Trainer, stages_wall_seconds

log = logging.getLogger(__name__)

COLUMNS = ["method", "AP", "F.Ra", "FWT", "BWT", "trainable/task", "wall s", "note"]


@dataclass
class Entry:
    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Entry:
        """``label=method:key=value:key=value`` or just ``method``."""
        head, *items = text.split(":")
        label, _, method = head.rpartition("=")
        overrides: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise PetmixError(f"--methods entry {text!r}: expected key=value after ':', got {item!r}")
            overrides[key.replace("-", "_")] = _value(value)
        return cls(label or method, method, overrides)


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _finished(out: Path, expected_rows: int) -> bool:
    path = out / "results.json"
    return path.is_file() and len(read_json(path).get("matrix", [])) == expected_rows


def note_for(results: dict[str, Any]) -> str:
    notes = []
    if results.get("task_id_at_test"):
        notes.append("task id given at test")
    if results.get("method", "").startswith("per-task"):
        notes.append("single-task reference (its diagonal gives FWT)")
    stages = results.get("stages") or [{}]
    replay = stages[0].get("replay")
    if replay:
        notes.append(replay)
    elif results.get("method") == "sapt-lora":
        notes.append("no ARM")
    if results.get("stage_names") == ["joint"]:
        notes.append("joint training (upper reference)")
    return "; ".join(notes)


def run_comparison(entries: list[Entry], base: dict[str, Any], tasks: list[Task], out_dir: str | Path) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(entries, key=lambda e: e.method != "per-task-lora")  # single-task scores first
    single = next((e for e in ordered if e.method == "per-task-lora"), None)
    rows = []
    for entry in ordered:
        values = {**base, "method": entry.method, **entry.overrides}
        if single is not None and entry is not single:
            values["single_task_results"] = str(out_dir / single.label)
        cfg = TrainConfig.from_dict(values, f"entry {entry.label}")
        run_dir = out_dir / entry.label
        expected = 1 if get_method(cfg.method).joint else len(tasks)
        if _finished(run_dir, expected):
            log.info("%s: finished earlier, reading %s", entry.label, run_dir)
            results = read_json(run_dir / "results.json")
        else:
            log.info("%s: training (%s)", entry.label, cfg.method)
            results = Trainer(cfg, tasks, run_dir).run()
        m = results["metrics"]
        rows.append({"label": entry.label, "method": entry.label, "AP": m["AP"], "F.Ra": m["F.Ra"], "FWT": m["FWT"],
                     "BWT": m["BWT"], "trainable/task": results.get("trainable_params_per_task"),
                     "wall s": stages_wall_seconds(results.get("stages") or []), "note": note_for(results), "results": results})
    rows.sort(key=lambda r: [e.label for e in entries].index(r["label"]))
    (out_dir / "table.md").write_text(markdown_table(rows) + "\n", encoding="utf-8")
    (out_dir / "table.csv").write_text(csv_table(rows), encoding="utf-8")
    write_matrices_figure(rows, out_dir / "matrices.png")
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def csv_table(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    return buf.getvalue()


def write_matrices_figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from petmix.report import _heatmap, short

    n = len(rows)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    tasks = [short(t, 12) for t in rows[0]["results"]["tasks"]] if rows else []
    fig, axes = plt.subplots(nrows, cols, figsize=(0.9 * len(tasks) * cols + 2, 0.7 * len(tasks) * nrows + 1.5),
                             squeeze=False)
    for ax, r in zip(axes.flat, rows):
        res = r["results"]
        stages = [str(i + 1) for i in range(len(res["matrix"]))]
        _heatmap(ax, res["matrix"], stages, tasks, f"{r['label']}  AP {_cell(r['AP'])}", vmax=100, fmt="{:.0f}")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

