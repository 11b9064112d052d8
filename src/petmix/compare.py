"""Run several methods on one task stream and put their numbers side by side.

Each entry trains into ``OUT/<label>`` (resumable: a finished entry is read, not re-run). A
``per-task-lora`` entry, when present, runs first and gives every other entry its single-task
scores, so that FWT is defined. Writes ``OUT/table.md``, ``OUT/table.csv`` and ``OUT/matrices.png``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable
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
        label = label.strip() or method.strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", label):
            raise PetmixError(f"--methods entry {text!r}: label {label!r} must be a plain folder name "
                              "(letters, digits, . _ + -)")
        overrides: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise PetmixError(f"--methods entry {text!r}: expected key=value after ':', got {item!r}")
            overrides[key.replace("-", "_")] = _value(value)
        return cls(label, method.strip(), overrides)


def check_entries(entries: list[Entry]) -> None:
    """Each entry trains into OUT/<label>: two entries with one label would share (and misreport) a run."""
    if not entries:
        raise PetmixError("--methods: give at least one method")
    seen: set[str] = set()
    for e in entries:
        if e.label in seen:
            raise PetmixError(f"--methods: the label {e.label!r} is used twice; give each entry its own "
                              f"label (label=method, e.g. {e.label}-2={e.method})")
        seen.add(e.label)


def _value(text: str) -> Any:
    import yaml

    try:  # YAML 1.1 reads "5e-5" as a string; a number is meant
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
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
        notes.append("joint training" + ("" if results.get("method", "").startswith("attempt") else " (upper reference)"))
    if results.get("independent"):
        notes = ["single-task: one model per task"]
    return "; ".join(notes)


def run_comparison(entries: list[Entry], base: dict[str, Any], tasks: list[Task], out_dir: str | Path,
                   before_first: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Train (or read back) each entry into OUT/<label>. Every entry's settings are checked before
    anything is written; ``before_first`` runs then (the CLI starts its log file there)."""
    out_dir = Path(out_dir)
    check_entries(entries)
    ordered = sorted(entries, key=lambda e: e.method != "per-task-lora")  # single-task scores first
    single = next((e for e in ordered if e.method == "per-task-lora"), None)
    configs = {}
    for entry in ordered:  # every entry's settings are checked before the first one runs
        values = {**base, "method": entry.method, **entry.overrides}
        cfg = TrainConfig.from_dict(values, f"--methods entry {entry.label}")
        if single is not None and entry is not single:  # made by the comparison itself, before this entry
            cfg.single_task_results = str(out_dir / single.label)
        configs[entry.label] = cfg
    if before_first is not None:
        before_first()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in ordered:
        cfg = configs[entry.label]
        run_dir = out_dir / entry.label
        expected = 1 if get_method(cfg.method).joint else len(tasks)
        if _finished(run_dir, expected):
            log.info("%s: finished earlier, reading %s", entry.label, run_dir)
            results = read_json(run_dir / "results.json")
        else:
            log.info("%s: training (%s)", entry.label, cfg.method)
            try:
                results = Trainer(cfg, tasks, run_dir).run()
            except Exception as err:  # one failing method must not cost the others their runs
                log.exception("%s failed; going on with the other entries", entry.label)
                rows.append({"label": entry.label, "method": entry.label, "failed": f"{type(err).__name__}: {err}"})
                continue
        m = results["metrics"]
        rows.append({"label": entry.label, "method": entry.label, "AP": m["AP"], "F.Ra": m["F.Ra"], "FWT": m["FWT"],
                     "BWT": m["BWT"], "trainable/task": results.get("trainable_params_per_task"),
                     "wall s": stages_wall_seconds(results.get("stages") or []), "note": note_for(results),
                     "results": results, **final_scores(results)})
    rows.sort(key=lambda r: [e.label for e in entries].index(r["label"]))
    done = [r for r in rows if "results" in r]
    columns = table_columns(done, [t.name for t in tasks])
    (out_dir / "table.md").write_text(markdown_table(rows, columns) + "\n", encoding="utf-8")
    (out_dir / "table.csv").write_text(csv_table(rows, columns), encoding="utf-8")
    if done:
        write_matrices_figure(done, out_dir / "matrices.png")
    return rows


def final_scores(results: dict[str, Any]) -> dict[str, Any]:
    """Each task's final score: the last row (continual, joint) or the diagonal (single-task methods)."""
    matrix, names = results["matrix"], results["tasks"]
    if results.get("independent"):
        row = [matrix[i][i] if i < len(matrix) else None for i in range(len(names))]
    else:
        row = matrix[-1]
    return {f"task:{n}": v for n, v in zip(names, row)}


def table_columns(rows: list[dict[str, Any]], task_names: list[str]) -> list[str]:
    """Continual entries get AP, F.Ra, FWT, BWT; if every entry is single-task or joint, those are
    meaningless and each task's score is shown instead (AP is then the mean score)."""
    if rows and all(r["results"].get("independent") or r["results"].get("stage_names") == ["joint"] for r in rows):
        return ["method", *[f"task:{n}" for n in task_names], "AP", "trainable/task", "wall s", "note"]
    return COLUMNS


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _row_cells(r: dict[str, Any], columns: list[str]) -> list[Any]:
    if "failed" in r:  # a failed entry: its name, then the error in the note column
        return [r["label"]] + [None] * (len(columns) - 2) + [f"FAILED: {r['failed']}"]
    return [r.get(c) for c in columns]


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or COLUMNS
    head = [c.removeprefix("task:") for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in _row_cells(r, columns)) + " |" for r in rows]
    return "\n".join(lines)


def csv_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or COLUMNS
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([c.removeprefix("task:") for c in columns])
    for r in rows:
        writer.writerow(["" if v is None else v for v in _row_cells(r, columns)])
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

