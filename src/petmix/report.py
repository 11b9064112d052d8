"""Tables and heatmaps of a run: the a[i][j] matrix, its metrics, and where the router sent inputs.

The router heatmaps are SAPT's Figure 3: the mean weight each block receives on the inputs of each
task, in the training phase (each task's own training inputs while it was learned) and in the test
phase (every task's test inputs after the last stage). For ATTEMPT runs, ``attention.png`` shows the
mean attention of each target task's test inputs over the source prompts and its own target prompt,
the view ATTEMPT uses to show which source tasks a target task draws on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from petmix.errors import PetmixError
from petmix.runs import damaged, read_json, read_jsonl


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not Path(run_dir).is_dir():
        raise PetmixError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise PetmixError(f"{path}: no results (is {run_dir} a petmix run directory?)")
    results = read_json(path)
    tasks = results.get("tasks") if isinstance(results, dict) else None
    matrix = results.get("matrix") if isinstance(results, dict) else None
    ok = (isinstance(tasks, list) and isinstance(matrix, list) and isinstance(results.get("metrics"), dict)
          and all(isinstance(r, list) and len(r) == len(tasks) for r in matrix)
          and all(v is None or isinstance(v, (int, float)) for r in matrix for v in r))
    if not ok:
        raise damaged(path, "not a results file (needs tasks, a matrix with one score per task in each row, "
                            "and metrics)")
    return results


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def matrix_table(results: dict[str, Any]) -> str:
    """The accuracy matrix as a Markdown table, rows = after stage i, columns = tasks."""
    tasks = results["tasks"]
    head = "| after stage | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1)]
    names = results.get("stage_names") or [str(i + 1) for i in range(len(results["matrix"]))]
    for i, row in enumerate(results["matrix"]):
        lines.append(f"| {i + 1}. {names[i]} | " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def metrics_line(results: dict[str, Any]) -> str:
    return "  ".join(f"{k} {_fmt(v)}" for k, v in results["metrics"].items())


def test_router_weights(run_dir: str | Path, results: dict[str, Any]) -> list[list[float]] | None:
    """Mean router weight per (test task, block) from the latest stage's predictions."""
    rows = []
    for task in results["tasks"]:
        path = Path(run_dir) / "predictions" / f"{task}.jsonl"
        if not path.is_file():
            return None
        weights = [r.get("router_weights") for r in read_jsonl(path) if isinstance(r, dict)]
        weights = [w for w in weights if w]
        if not weights:
            return None
        n = len(weights[0])
        rows.append([sum(w[b] for w in weights) / len(weights) for b in range(n)])
    return rows


def source_attention(run_dir: str | Path, results: dict[str, Any]) -> list[list[float]] | None:
    """Runs whose pool starts with source prompts (ATTEMPT): mean attention per (target task, [sources...,
    own target]) over the task's test inputs."""
    sources = results.get("sources") or []
    if not sources:
        return None
    m, rows = len(sources), []
    for t, task in enumerate(results["tasks"]):
        path = Path(run_dir) / "predictions" / f"{task}.jsonl"
        if not path.is_file():
            return None
        weights = [w for w in (r.get("router_weights") for r in read_jsonl(path) if isinstance(r, dict)) if w]
        if not weights or len(weights[0]) < m + t + 1:
            return None  # not attention over the sources and a target per task (e.g. SPoT, which only starts from them)
        cols = list(range(m)) + [m + t]
        rows.append([sum(w[c] for w in weights) / len(weights) for c in cols])
    return rows


def train_router_weights(results: dict[str, Any]) -> list[list[float | None]] | None:
    """Mean router weight per (task, block) on the task's own training inputs while it was learned."""
    stages = results.get("stages") or []
    rows = [s.get("train_router_weights") for s in stages]
    if not rows or any(r is None for r in rows):
        return None
    width = max(len(r) for r in rows)
    return [list(r) + [None] * (width - len(r)) for r in rows]


def routing_table(results: dict[str, Any]) -> str | None:
    """Routing accuracy (and mean own-block weight) per stage and task, as a Markdown table."""
    routing = results.get("routing_accuracy")
    if not routing or not routing.get("per_stage"):
        return None
    tasks = results["tasks"]
    names = results.get("stage_names") or [str(i + 1) for i in range(len(routing["per_stage"]))]
    lines = ["routing accuracy % (mean weight on the own block), after each stage:", "",
             "| after stage | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    own = routing.get("own_weight_per_stage") or [[None] * len(tasks)] * len(routing["per_stage"])
    for i, (accs, weights) in enumerate(zip(routing["per_stage"], own)):
        cells = ["-" if a is None else f"{a:.1f} ({w:.2f})" for a, w in zip(accs, weights)]
        lines.append(f"| {i + 1}. {names[i]} | " + " | ".join(cells) + " |")
    final = routing.get("final")
    if final is not None:
        lines += ["", f"routing accuracy after the last stage: {final:.1f}% "
                      f"(mean own-block weight {routing.get('final_own_weight', 0):.3f})"]
    lines += [f"({routing.get('definition', '')})"]
    return "\n".join(lines)


def _heatmap(ax, data, row_labels, col_labels, title, vmax=None, fmt="{:.2f}") -> None:
    import numpy as np

    arr = np.array([[np.nan if v is None else v for v in row] for row in data], dtype=float)
    im = ax.imshow(arr, cmap="viridis", vmin=0, vmax=vmax if vmax is not None else np.nanmax(arr) or 1)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if not np.isnan(arr[i, j]):
                ax.text(j, i, fmt.format(arr[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if arr[i, j] < (np.nanmax(arr) or 1) * 0.6 else "black")
    return im


def short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def write_heatmaps(run_dir: str | Path, results: dict[str, Any] | None = None) -> list[Path]:
    """Write ``matrix.png`` and, for routed methods, ``router.png``; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    results = results or load_results(run_dir)
    tasks = [short(t) for t in results["tasks"]]
    stages = [f"{i + 1}. {short(n)}" for i, n in enumerate(results.get("stage_names") or tasks)]
    written = []

    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(tasks), 1.2 + 0.5 * len(stages)))
    im = _heatmap(ax, results["matrix"], stages, tasks, f"{results.get('method', 'scores')}: a[i][j] after stage i",
                  vmax=100, fmt="{:.0f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    written.append(run_dir / "matrix.png")
    fig.savefig(written[-1], dpi=130)
    plt.close(fig)

    attention = source_attention(run_dir, results) if results.get("sources") else None
    if attention:
        cols = [short(s) for s in results["sources"]] + ["own target"]
        fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(cols), 1.5 + 0.5 * len(tasks)))
        im = _heatmap(ax, attention, tasks, cols, f"{results['method']}: mean attention of each target task's test "
                      "inputs", vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        written.append(run_dir / "attention.png")
        fig.savefig(written[-1], dpi=130)
        plt.close(fig)
        return written

    test_w = test_router_weights(run_dir, results)
    train_w = train_router_weights(results)
    panels = [(w, t) for w, t in [(train_w, "training phase: own training inputs"),
                                  (test_w, "test phase: test inputs after the last stage")] if w]
    routing = (results.get("routing_accuracy") or {}).get("per_stage")
    if panels and len(results["tasks"]) > 0:
        blocks_n = max(len(r) for w, _ in panels for r in w)
        n_panels = len(panels) + (1 if routing else 0)
        fig, axes = plt.subplots(1, n_panels, figsize=((3 + 0.7 * blocks_n) * n_panels, 1.8 + 0.5 * len(tasks)))
        axes = [axes] if n_panels == 1 else list(axes)
        for ax, (w, title) in zip(axes, panels):
            blocks = [f"block {b + 1}" for b in range(max(len(r) for r in w))]
            _heatmap(ax, w, tasks[: len(w)], blocks, title, vmax=1)
        if routing:  # beside the weights: how often the own block got the largest weight
            _heatmap(axes[-1], [[None if v is None else v for v in row] for row in routing], stages[: len(routing)],
                     tasks, "routing accuracy % after stage i", vmax=100, fmt="{:.0f}")
        fig.suptitle("mean router weight per (task, block)", fontsize=10)
        fig.tight_layout()
        written.append(run_dir / "router.png")
        fig.savefig(written[-1], dpi=130)
        plt.close(fig)
    return written


def pseudo_samples_table(run_dir: str | Path, examples: int = 3, width: int = 70) -> str | None:
    """ARM's pseudo-inputs per task: how many, from where, how they were made, and a few of them."""
    from petmix.replay.generator import load_pseudo_info, load_pseudo_inputs

    arm_path = Path(run_dir) / "arm.json"
    if not arm_path.is_file():
        return None
    arm = read_json(arm_path)
    if arm.get("replay_source") == "features":
        return (f"ARM reflection on feature statistics, kl_ratio {arm.get('kl_ratio')}: per earlier task, the mean and "
                "variance of the router's input feature (arm_features.safetensors); pseudo-features are drawn from "
                f"them; no input is kept or generated. Targets stored for: {', '.join(arm.get('targets', {}))}")
    source = "real training inputs (ORACLE variant)" if arm.get("oracle") else "generated by per-task generators"
    lines = [f"ARM pseudo-inputs: {source}, kl_ratio {arm.get('kl_ratio')}", "",
             "| task | kept | made in (s) | how | examples |", "|---|---|---|---|---|"]
    for task in arm.get("pools", {}):
        inputs = load_pseudo_inputs(run_dir, task) or []
        info = load_pseudo_info(run_dir, task) or {}
        seconds = sum((info.get("timings") or {}).values()) if info.get("timings") else None
        how = info.get("explanation") or ("sampled real inputs" if info.get("oracle") else "")
        shown = " / ".join(json.dumps(x[:width] + ("…" if len(x) > width else ""), ensure_ascii=False)
                           for x in inputs[:examples])
        lines.append(f"| {task} | {len(inputs)} | {'-' if seconds is None else f'{seconds:.0f}'} | {how} | {shown} |")
    return "\n".join(lines)


def render_report(run_dir: str | Path) -> str:
    results = load_results(run_dir)
    parts = [f"run: {run_dir}", f"method: {results.get('method', 'eval')}"
             + ("  (task id given at test time)" if results.get("task_id_at_test") else ""),
             "", matrix_table(results), "", metrics_line(results)]
    if results.get("trainable_params_per_task") is not None:
        parts.append(f"trainable parameters per task: {results['trainable_params_per_task']:,}")
    if results.get("wall_s") is not None:
        parts.append(f"wall time: {results['wall_s']:.0f} s")
    if results.get("independent"):
        parts.append("single-task method: each task is learned from the same start and scored by its own model "
                     "(the diagonal); AP is their mean")
    attention = source_attention(run_dir, results) if results.get("sources") else None
    if attention:
        cols = list(results["sources"]) + ["own target"]
        parts += ["", "mean attention over source prompts (test inputs):", "",
                  "| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        parts += [f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for t, row in zip(results["tasks"], attention)]
    routing = routing_table(results)
    if routing:
        parts += ["", routing]
    pseudo = pseudo_samples_table(run_dir)
    if pseudo:
        parts += ["", pseudo]
    return "\n".join(parts)
