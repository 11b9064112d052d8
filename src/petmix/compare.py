"""Run several methods on one task stream and put their numbers side by side.

Each entry trains into ``OUT/<label>`` (resumable: a finished entry is read, not re-run), or, with
several seeds, into ``OUT/<label>/seed-<s>``, and the table shows each metric's mean ± sample standard
deviation with the differences that lie within noise marked (``petmix.stats``). A ``per-task-lora``
entry, when present, runs first and gives every other entry its single-task scores, so that FWT is
defined. Floors (majority label, zero-shot base model; ``petmix.floors``) are rows of the table.
Writes ``OUT/table.md``, ``OUT/table.csv``, ``OUT/per_task.md``, ``OUT/compare.json`` and
``OUT/matrices.png``.
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
from petmix.methods import METHODS
from petmix.parallel import Run, train_runs
from petmix.runs import holding, read_json, write_json
from petmix.stats import NOISE_RULE, Summary, within_noise
from petmix.train import TrainConfig, Trainer, finished_run, run_settings_diff, stages_wall_seconds

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


def note_for(results: dict[str, Any]) -> str:
    notes = []
    if results.get("task_id_at_test"):
        notes.append("task id given at test")
    method = METHODS.get(results.get("method", ""))
    if method is not None and method.reference:
        notes.append("single-task reference (its diagonal gives FWT)")
    stages = results.get("stages") or [{}]
    replay = stages[0].get("replay")
    if replay:
        notes.append(replay)
    elif method is not None and method.routes_per_task:
        notes.append("no ARM")  # a routing method whose stages record no replay: reflection was off
    if results.get("stage_names") == ["joint"]:
        notes.append("joint training" + ("" if results.get("sources") else " (upper reference)"))
    if results.get("independent"):
        notes = ["single-task: one model per task"]
    return "; ".join(notes)


def load_tuned(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """``petmix tune``'s file: method -> the settings it chose (``{}`` without a file)."""
    if not path:
        return {}
    from petmix.tune import read_tuned

    return read_tuned(path)


def entry_values(entry: Entry, base: dict[str, Any], tuned: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An entry's settings: the shared ones, then the tuned ones of its method, then its own overrides."""
    return {**base, **tuned.get(entry.method, {}), "method": entry.method, **entry.overrides}


def run_comparison(entries: list[Entry], base: dict[str, Any], tasks: list[Task], out_dir: str | Path, *,
                   seeds: list[int] | None = None, tasks_for_seed: Callable[[int], list[Task]] | None = None,
                   tuned: dict[str, dict[str, Any]] | None = None, floors: bool = False,
                   record: dict[str, Any] | None = None,
                   before_first: Callable[[], None] | None = None, train: bool = True,
                   jobs: int = 1) -> list[dict[str, Any]]:
    """Train every entry (once per seed with ``seeds``) and write the tables; returns one row per entry
    (floors first when ``floors``).

    Without ``seeds`` each entry trains once into ``OUT/<label>`` (the layout of earlier petmix). With
    ``seeds`` each runs into ``OUT/<label>/seed-<s>`` on ``tasks_for_seed(s)`` (the seed's training
    sample, one test set for all seeds); a finished seed is read, an unfinished one resumes, and a
    finished ``OUT/<label>`` of the earlier layout counts as the seed it ran with. Every run's settings
    are checked before anything is written; ``before_first`` runs then (the CLI starts its log there).
    ``train=False`` trains nothing: the tables hold the finished runs, the rest show as not yet run (a
    table that accumulates over sessions, read back from the archive). ``jobs`` > 1 trains that many
    runs at once, each in its own process (``petmix.parallel``): the same runs, on fewer threads each."""
    out_dir = Path(out_dir)
    check_entries(entries)
    tuned = tuned or {}
    multi = seeds is not None
    seed_list = list(seeds) if multi else [int(base.get("seed", 0) or 0)]
    if multi and not seed_list:
        raise PetmixError("--seeds: give at least one seed")
    test_seed = base.get("test_seed")
    if multi and test_seed is None:
        test_seed = int(base.get("seed", 0) or 0)  # one test set for every seed
    load = tasks_for_seed or (lambda s: tasks)
    names = [t.name for t in tasks]
    def reference(e: Entry) -> bool:
        return e.method in METHODS and METHODS[e.method].reference

    ordered = sorted(entries, key=lambda e: not reference(e))  # single-task scores first
    single = next((e for e in ordered if reference(e)), None)

    def run_dir(entry: Entry, seed: int) -> Path:
        if not multi:
            return out_dir / entry.label
        legacy = out_dir / entry.label
        if finished_run(legacy, entry.method, len(tasks)) and read_json(legacy / "config.json").get("seed") == seed:
            return legacy  # a finished single-seed run of the same settings (checked below) is this seed's
        return legacy / f"seed-{seed}"

    configs: dict[tuple[str, int], TrainConfig] = {}
    for seed in seed_list:  # every run's settings are checked before the first one runs
        for entry in ordered:
            values = entry_values(entry, base, tuned)
            if multi:
                values.update(seed=seed, test_seed=test_seed)
            cfg = TrainConfig.from_dict(values, f"--methods entry {entry.label}" + (f" seed {seed}" if multi else ""))
            if single is not None and entry is not single:  # made by the comparison itself, before this entry
                cfg.single_task_results = str(run_dir(single, seed))
            diff = run_settings_diff(run_dir(entry, seed), cfg, names)
            if diff and finished_run(run_dir(entry, seed), cfg.method, len(tasks)):
                raise PetmixError(f"{run_dir(entry, seed)} holds a finished run with other settings ({diff}); "
                                  "use a new --out or the same settings")
            configs[entry.label, seed] = cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    with holding(out_dir):  # a second comparison into the same folder stops here, before it writes
        if before_first is not None:
            before_first()
        write_json(out_dir / "compare.json", {**(record or {}), "entries": [e.label for e in entries],
                                              "seeds": seed_list if multi else None, "test_seed": test_seed,
                                              "tuned": tuned or None, "noise_rule": NOISE_RULE if multi else None})

        floor_rows: list[dict[str, Any]] = []
        if floors:
            floor_rows = compute_floors(out_dir / "floors", seed_list, load, configs[ordered[0].label, seed_list[0]])
        runs: dict[str, dict[int, dict[str, Any]]] = {e.label: {} for e in entries}
        failures: dict[str, dict[int, str]] = {e.label: {} for e in entries}
        # Every run finished earlier counts from the start, so the tables written while the rest train
        # show all of them (not only the seeds this invocation has reached).
        for seed in seed_list:
            for entry in ordered:
                where = run_dir(entry, seed)
                if finished_run(where, configs[entry.label, seed].method, len(tasks)):
                    log.info("%s: finished earlier, reading %s", entry.label + (f" seed {seed}" if multi else ""), where)
                    runs[entry.label][seed] = read_json(where / "results.json")
        todo = [(seed, entry) for seed in seed_list if train for entry in ordered if seed not in runs[entry.label]]

        def finished(entry: Entry, seed: int, results: dict[str, Any] | None, error: str | None) -> None:
            if error is None:
                runs[entry.label][seed] = results
            else:
                failures[entry.label][seed] = error
            rows = floor_rows + [entry_row(e.label, runs[e.label], failures[e.label], seed_list, multi) for e in entries]
            write_tables(rows, names, out_dir, multi)

        seed_tasks: dict[int, list[Task]] = {}

        def make(entry: Entry, seed: int) -> Run:
            if seed not in seed_tasks:
                seed_tasks[seed] = load(seed)
            tag = entry.label + (f" seed {seed}" if multi else "")
            return Run(configs[entry.label, seed], seed_tasks[seed], run_dir(entry, seed), tag, (entry, seed))

        if jobs > 1 and len(todo) > 1:
            # a seed's single-task reference first: the seed's other runs read its scores when they start
            due = {seed for seed, entry in todo if entry is single}

            def ready(run: Run) -> bool:
                return run.key[0] is single or run.key[1] not in due

            def ended(run: Run, results: dict[str, Any] | None, error: str | None) -> None:
                if run.key[0] is single:
                    due.discard(run.key[1])
                finished(*run.key, results, error)

            train_runs([make(entry, seed) for seed, entry in todo], jobs, ended, ready)
        else:
            for seed, entry in todo:
                run = make(entry, seed)
                log.info("%s: training (%s) into %s", run.tag, run.cfg.method, run.where)
                try:
                    results = Trainer(run.cfg, run.tasks, run.where).run()
                except Exception as err:  # one failing run must not cost the others theirs
                    log.exception("%s failed; going on with the other runs", run.tag)
                    finished(entry, seed, None, f"{type(err).__name__}: {err}")
                else:
                    finished(entry, seed, results, None)
        rows = floor_rows + [entry_row(e.label, runs[e.label], failures[e.label], seed_list, multi) for e in entries]
        write_tables(rows, names, out_dir, multi)
        done = [r for r in rows if "results" in r and not r.get("floor")]
        if done:
            write_matrices_figure(done, out_dir / "matrices.png")
        return rows


def compute_floors(out: Path, seeds: list[int], load: Callable[[int], list[Task]], cfg: TrainConfig
                   ) -> list[dict[str, Any]]:
    """The majority-label rows (one value per seed: each seed's training sample has its majority) and the
    zero-shot row (the test set is the same for every seed), cached under ``out``."""
    from petmix.floors import cached_majority_floor, cached_zero_shot_floor

    majority = {s: cached_majority_floor(out, load(s), s) for s in seeds}
    zero = cached_zero_shot_floor(out, load(seeds[0]), cfg)
    answers = {n: sorted({m["per_task"][n]["answer"] for m in majority.values()}) for n in zero["tasks"]}
    shown = "; ".join(f"{n}: {' / '.join(a)[:40]!r}" for n, a in answers.items()
                      if majority[seeds[0]]["per_task"][n]["classification"])
    rows = []
    for label, per_seed, note in [
        ("floor: majority label", majority,
         "most frequent train answer, given for every test input" + (f" ({shown})" if shown else "")),
        ("floor: zero-shot", {seeds[0]: zero}, f"untouched {cfg.model}, greedy, same test inputs"),
    ]:
        row = entry_row(label, per_seed, {}, list(per_seed), len(per_seed) > 1)
        row.update(floor=True, note=note, **{"wall s": None, "trainable/task": 0})
        rows.append(row)
    return rows


def _routing_accuracy(results: dict[str, Any]) -> float | None:
    value = results.get("routing_accuracy")
    return value.get("final") if isinstance(value, dict) else None


def device_note(runs: dict[int, dict[str, Any]]) -> str:
    """Name the device of runs made off the CPU (results written before petmix recorded it were CPU runs):
    their scores are the same method's, but their wall times do not compare with the CPU rows'."""
    devices: dict[str, list[str]] = {}
    for seed, res in runs.items():
        devices.setdefault(res.get("device") or "cpu", []).append(str(seed))
    if all(d.startswith("cpu") for d in devices):
        return ""
    if len(devices) == 1:
        return f"ran on {next(iter(devices))}: wall s not comparable with CPU rows"
    return "ran on " + "; ".join(f"{d} (seed {', '.join(s)})" for d, s in devices.items())


def entry_row(label: str, runs: dict[int, dict[str, Any]], failures: dict[int, str], seeds: list[int],
              multi: bool) -> dict[str, Any]:
    """One table row: each metric's mean over the finished seeds (``row[c]``), its ``Summary``
    (``row["stats"][c]``) and the seeds behind it."""
    finished = [runs[s] for s in seeds if s in runs]
    if not finished:
        if not failures:  # still to train (tables are written while the others run): pending, not failed
            return {"label": label, "method": label, "note": "not yet run"}
        failed = "; ".join(f"seed {s}: {e}" if multi else e for s, e in failures.items())
        return {"label": label, "method": label, "failed": failed}
    first = finished[0]
    values: dict[str, list[Any]] = {}
    for res in finished:
        for key, v in {**res["metrics"], **final_scores(res), "routing acc": _routing_accuracy(res)}.items():
            values.setdefault(key, []).append(v)
    stats = {k: Summary.of(v) for k, v in values.items()}
    notes = [note_for(first)] if first.get("matrix") and "method_summary" in first else []
    missing = [s for s in seeds if s not in runs]
    not_run = [str(s) for s in missing if s not in failures]
    if multi and not_run:
        notes.append("seeds not yet run: " + ", ".join(not_run))
    notes += [f"seed {s} failed: {e}" for s, e in failures.items()]
    notes.append(device_note({s: runs[s] for s in seeds if s in runs}))
    results = dict(first)
    if len(finished) > 1:  # the figure shows the mean matrix over seeds
        results["matrix"] = _mean_matrix([r["matrix"] for r in finished])
    return {"label": label, "method": label, **{k: st.mean for k, st in stats.items()}, "stats": stats,
            "seeds": f"{len(finished)}" if not missing else f"{len(finished)}/{len(seeds)}",
            "trainable/task": first.get("trainable_params_per_task"),
            "wall s": Summary.of([stages_wall_seconds(r.get("stages") or []) for r in finished]).mean,
            "note": "; ".join(n for n in notes if n), "results": results}


def _mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    return [[Summary.of([m[i][j] for m in matrices]).mean if all(m[i][j] is not None for m in matrices) else None
             for j in range(len(matrices[0][i]))] for i in range(len(matrices[0]))]


def write_tables(rows: list[dict[str, Any]], task_names: list[str], out_dir: Path, multi: bool) -> None:
    """table.md (with the noise marks and a footnote), table.csv and per_task.md."""
    done = [r for r in rows if "results" in r and not r.get("floor")]
    columns = list(table_columns(done, task_names))  # a copy: COLUMNS itself must not grow
    if any(r.get("routing acc") is not None for r in rows):
        columns.insert(columns.index("AP") + (4 if "F.Ra" in columns else 1), "routing acc")
    _mark_floors(rows)
    if multi:
        columns.insert(1, "seeds")
        _mark_noise(rows)
        columns.insert(columns.index("note"), "vs best AP")
    foot = []
    if multi:
        foot += ["Cells: mean ± sample standard deviation (n - 1) over the seeds in `seeds`.",
                 f"`vs best AP`: `best` has the highest mean AP; `~` its difference to the best lies within noise "
                 f"({NOISE_RULE}); `<` below the best by more than that; empty with fewer than two seeds."]
    if any(r.get("floor") for r in rows):
        foot.append("Floors: the majority label (each task's most frequent training answer, for every test "
                    "input) and the zero-shot base model, on the same test inputs; `BELOW FLOOR` marks a "
                    "method whose AP is lower.")
    pairwise = pairwise_noise_table(rows) if multi else ""
    parts = [markdown_table(rows, columns), "\n".join(foot), pairwise]
    (out_dir / "table.md").write_text("\n\n".join(p for p in parts if p) + "\n", encoding="utf-8")
    (out_dir / "table.csv").write_text(csv_table(rows, columns, with_std=multi), encoding="utf-8")
    per_task = ["method", *(["seeds"] if multi else []), *[f"task:{n}" for n in task_names], "AP", "note"]
    (out_dir / "per_task.md").write_text(markdown_table(rows, per_task) + "\n", encoding="utf-8")


def _methods(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "results" in r and not r.get("floor") and r.get("AP") is not None]


def _mark_floors(rows: list[dict[str, Any]]) -> None:
    """Say in the note of each method whose AP lies below a floor's (after tuning, a defect to find)."""
    floors = [r for r in rows if r.get("floor") and r.get("AP") is not None]
    for r in _methods(rows):
        below = [f"{f['label'].removeprefix('floor: ')} {f['AP']:.2f}" for f in floors if r["AP"] < f["AP"]]
        r["note"] = "; ".join(x for x in [r.get("note"), "BELOW FLOOR: " + ", ".join(below) if below else ""] if x)


def _mark_noise(rows: list[dict[str, Any]]) -> None:
    methods = _methods(rows)
    if not methods:
        return
    best = max(methods, key=lambda r: r["AP"])
    for r in methods:
        same = within_noise(r["stats"]["AP"], best["stats"]["AP"])
        r["vs best AP"] = "best" if r is best else {True: "~", False: "<", None: ""}[same]


def pairwise_noise_table(rows: list[dict[str, Any]]) -> str:
    """Every pair of methods on AP: ``~`` within noise, ``>``/``<`` the row's method above/below the
    column's by more than noise, ``.`` where a side has fewer than two seeds."""
    methods = _methods(rows)
    if len(methods) < 2:
        return ""
    lines = ["AP, pairwise (row vs column; `~` within noise, `>` / `<` beyond it, `.` too few seeds):", "",
             "| | " + " | ".join(r["label"] for r in methods) + " |", "|---|" + "---|" * len(methods)]
    for a in methods:
        cells = []
        for b in methods:
            if a is b:
                cells.append("")
                continue
            same = within_noise(a["stats"]["AP"], b["stats"]["AP"])
            cells.append("." if same is None else "~" if same else ">" if a["AP"] > b["AP"] else "<")
        lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    if isinstance(v, Summary):
        return v.cell()
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _row_cells(r: dict[str, Any], columns: list[str]) -> list[Any]:
    if "failed" in r:  # a failed entry: its name, then the error in the note column
        return [r["label"]] + [None] * (len(columns) - 2) + [f"FAILED: {r['failed']}"]
    stats = r.get("stats", {})
    return [stats[c] if c in stats and stats[c].std is not None else r.get(c) for c in columns]


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or COLUMNS
    head = [c.removeprefix("task:") for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in _row_cells(r, columns)) + " |" for r in rows]
    return "\n".join(lines)


def csv_table(rows: list[dict[str, Any]], columns: list[str] | None = None, with_std: bool = False) -> str:
    """One column per value; ``with_std``: each statistic's mean, then its sample standard deviation
    (``<column> sd``)."""
    columns = columns or COLUMNS
    stat_cols = {c for r in rows for c in r.get("stats", {})} if with_std else set()
    head: list[str] = []
    for c in columns:
        head.append(c.removeprefix("task:"))
        if c in stat_cols:
            head.append(c.removeprefix("task:") + " sd")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(head)
    for r in rows:
        cells: list[Any] = []
        for c in columns:
            if "failed" in r:
                cells.append(r["label"] if c == columns[0] else f"FAILED: {r['failed']}" if c == "note" else None)
            else:
                cells.append(r.get(c))
            if c in stat_cols:
                st = r.get("stats", {}).get(c)
                cells.append(st.std if st is not None and "failed" not in r else None)
        writer.writerow(["" if v is None else v for v in cells])
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

