"""One self-contained HTML page per run (``petmix report RUN --html``) or comparison (``petmix compare``).

The page opens with no network: styles are inline, images are PNGs inlined as base64 (the same
heatmaps ``petmix report`` writes), every text from the run is HTML-escaped. It reads at laptop width:
wide tables scroll inside their own box instead of widening the page.

Sections of a run's page: summary, accuracy matrix, metrics (and routing accuracy), routing heatmaps
(training and test phase; ATTEMPT's attention), stages and timings, test examples per task with their
answers, scores and router weights, ARM's pseudo-inputs (when the run has them) and the configuration.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from html import escape
from pathlib import Path
from typing import Any

from petmix.report import load_results, source_attention, test_router_weights, write_heatmaps
from petmix.runs import read_json

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2330;margin:0;
 background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:20px 24px 48px}
header{background:#1d2330;color:#fff;padding:18px 24px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:0;color:#c5cad6}
nav{max-width:1180px;margin:0 auto;padding:8px 24px 0;font-size:13px}
nav a{margin-right:14px;color:#3559b7;text-decoration:none}
section{background:#fff;border:1px solid #dfe2e8;border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px} h3{font-size:14px;margin:14px 0 6px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border:1px solid #e1e4ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f6;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
img{max-width:100%;height:auto;border:1px solid #eceef2;border-radius:4px}
.muted{color:#687083} .kv td:first-child{color:#4a5161;white-space:nowrap}
.bar{display:inline-block;height:9px;background:#3f7fd9;border-radius:2px;vertical-align:middle}
.bars td{border:0;padding:1px 6px 1px 0;font-size:12px}
.ex td.text{max-width:430px;white-space:pre-wrap;word-break:break-word}
.fail{color:#b3261e}
"""


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _cell(v: Any, digits: int = 2) -> str:
    cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    return f"<td{cls}>{escape(_fmt(v, digits))}</td>"


def _score_cell(v: float | None) -> str:
    """A matrix cell shaded by its score (0 white, 100 blue)."""
    if v is None:
        return '<td class="num muted">-</td>'
    a = max(0.0, min(1.0, v / 100))
    color = "#fff" if a > 0.6 else "#1d2330"
    return f'<td class="num" style="background:rgba(53,89,183,{0.08 + 0.82 * a:.2f});color:{color}">{v:.1f}</td>'


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """``rows`` hold ready-made ``<td>`` cells."""
    out = [f'<div class="scroll"><table class="{cls}"><thead><tr>']
    out += [f"<th>{escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    out += ["<tr>" + "".join(r) + "</tr>" for r in rows]
    out.append("</tbody></table></div>")
    return "".join(out)


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def _page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(_section(*s) for s in sections)
    made = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)} · written {made} by petmix</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")


# ---- a run ------------------------------------------------------------------------------------
def _matrix(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    names = results.get("stage_names") or [str(i + 1) for i in range(len(results["matrix"]))]
    rows = [[f"<td>{i + 1}. {escape(names[i])}</td>"] + [_score_cell(v) for v in row]
            for i, row in enumerate(results["matrix"])]
    metric = {t: (results.get("per_task") or {}).get(t, {}).get("metric", "") for t in tasks}
    note = ", ".join(sorted({m for m in metric.values() if m}))
    return (_table(["after stage"] + tasks, rows)
            + f'<p class="muted">a[i][j]: score on task j after training stage i, in percent ({escape(note)}).</p>')


def _routes_per_task(results: dict[str, Any]) -> bool:
    """One block per task in task order, picked by a router with no task id: routing accuracy applies."""
    from petmix.methods import get_method

    try:
        method = get_method(results.get("method", ""))
    except Exception:  # noqa: BLE001 - zero-shot runs and methods of another petmix version
        return False
    return method.routes_per_task and not results.get("sources")


def routing_accuracy(run_dir: Path, results: dict[str, Any]) -> list[list[float | None]] | None:
    """Routing accuracy per (stage, task): the share of a task's test inputs whose one largest router weight
    is on its own block. From results.json where the run recorded it, else from the latest predictions
    (one row)."""
    if not _routes_per_task(results):
        return None
    recorded = results.get("routing_accuracy")
    if isinstance(recorded, dict) and recorded.get("per_stage"):
        return recorded["per_stage"]
    row: list[float | None] = []
    for j, task in enumerate(results["tasks"]):
        path = run_dir / "predictions" / f"{task}.jsonl"
        rows = [json.loads(x).get("router_weights") for x in path.read_text().splitlines() if x] if path.is_file() else []
        rows = [w for w in rows if w and len(w) > j]
        hits = sum(1 for w in rows if w[j] == max(w) and w.count(max(w)) == 1)
        row.append(100.0 * hits / len(rows) if rows else None)
    return [row]


def _metrics(run_dir: Path, results: dict[str, Any]) -> str:
    m = results.get("metrics") or {}
    rows = [[_cell(k), _cell(v)] for k, v in m.items()]
    if results.get("trainable_params_per_task") is not None:
        rows.append([_cell("trainable parameters per task"), _cell(results["trainable_params_per_task"])])
    routing = routing_accuracy(run_dir, results)
    if routing:
        last = [v for v in routing[-1] if v is not None]
        rows.append([_cell("routing accuracy (mean over tasks, last stage)"),
                     _cell(sum(last) / len(last) if last else None)])
    body = _table(["metric", "value"], rows)
    body += ('<p class="muted">AP: mean final score; F.Ra: mean drop from a task\'s best score to its final one; '
             "FWT: mean a[i][i] minus the single-task score; BWT: mean a[T][i] - a[i][i].</p>")
    if routing:
        names = results.get("stage_names") or []
        label = (lambda i: f"{i + 1}. {names[i]}" if i < len(names) else str(i + 1)) if len(routing) > 1 else (
            lambda i: "last stage")
        body += "<h3>Routing accuracy (test inputs)</h3>"
        body += _table(["after stage"] + results["tasks"],
                       [[f"<td>{escape(label(i))}</td>"] + [_score_cell(v) for v in row] for i, row in enumerate(routing)])
        body += ('<p class="muted">The share of a task\'s test inputs whose largest router weight is on that '
                 "task's own block, in percent.</p>")
    return body


def _routing(run_dir: Path, results: dict[str, Any], images: list[Path]) -> str:
    shown = [p for p in images if p.name != "matrix.png"]
    if not shown:
        return '<p class="muted">This method has no router: every input uses the same blocks.</p>'
    captions = {"router.png": "Mean router weight per (task, block): the training phase (each task's own training "
                              "inputs while it was learned) and the test phase (every task's test inputs after "
                              "the last stage).",
                "attention.png": "ATTEMPT: mean attention of each target task's test inputs over the source prompts "
                                 "and its own target prompt."}
    return "".join(f"<figure>{_image(p, p.stem)}<figcaption class=\"muted\">{escape(captions.get(p.name, ''))}"
                   "</figcaption></figure>" for p in shown)


def _stages(results: dict[str, Any]) -> str:
    stages = results.get("stages") or []
    if not stages:
        return f'<p>wall time {escape(_fmt(results.get("wall_s")))} s (one evaluation).</p>'
    extra = sorted({k for s in stages for k in s if k.startswith("mean_") and k.endswith("_loss") and k != "mean_loss"})
    head = ["stage", "steps", "mean loss", *[k.removeprefix("mean_").replace("_", " ") for k in extra],
            "train s", "replay s", "eval s", "replay"]
    rows = [[_cell(f"{i + 1}. {s.get('name', '')}"), _cell(s.get("steps")), _cell(s.get("mean_loss"), 4),
             *[_cell(s.get(k), 4) for k in extra], _cell(s.get("train_s"), 1), _cell(s.get("replay_s"), 1),
             _cell(s.get("eval_s"), 1), _cell(s.get("replay") or "")] for i, s in enumerate(stages)]
    body = _table(head, rows)
    body += f'<p>Wall time of the run (training, between-task work, evaluation): <b>{escape(_fmt(results.get("wall_s"), 1))} s</b>.</p>'
    return body


def _weights_bars(weights: list[float] | None, names: list[str]) -> str:
    if not weights:
        return '<span class="muted">-</span>'
    rows = "".join(f'<tr><td>{escape(names[b] if b < len(names) else f"block {b + 1}")}</td>'
                   f'<td><span class="bar" style="width:{max(1, round(80 * max(0.0, min(1.0, w))))}px"></span></td>'
                   f'<td class="num">{w:.3f}</td></tr>' for b, w in enumerate(weights))
    return f'<table class="bars">{rows}</table>'


def _block_names(results: dict[str, Any], n: int) -> list[str]:
    sources = [f"source:{s}" for s in results.get("sources") or []]
    if _routes_per_task(results) or sources:
        return (sources + list(results["tasks"]))[:n]
    return [f"block {b + 1}" for b in range(n)]


def _examples(run_dir: Path, results: dict[str, Any], per_task: int, width: int) -> str:
    parts = []
    for task in results["tasks"]:
        path = run_dir / "predictions" / f"{task}.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x][:per_task]
        rows = []
        for r in records:
            text = r.get("input", "")
            text = text if len(text) <= width else text[: width - 1] + "…"
            w = r.get("router_weights")
            rows.append([f'<td class="text">{escape(text)}</td>', f'<td class="text">{escape(r.get("prediction", ""))}</td>',
                         f'<td class="text">{escape(" | ".join(r.get("references") or []))}</td>',
                         _cell(r.get("score"), 1),
                         f"<td>{_weights_bars(w, _block_names(results, len(w) if w else 0))}</td>"])
        metric = (results.get("per_task") or {}).get(task, {}).get("metric", "score")
        parts.append(f"<h3>{escape(task)}</h3>" + _table(["input", "answer", "reference", escape(metric),
                                                            "router weights"], rows, "ex"))
    if not parts:
        return '<p class="muted">No predictions saved in this run.</p>'
    return ('<p class="muted">The first test inputs of each task, answered by the model after the last stage '
            "(score in percent).</p>" + "".join(parts))


def _pseudo(run_dir: Path, examples: int = 3, width: int = 120) -> str | None:
    from petmix.replay.generator import load_pseudo_info, load_pseudo_inputs

    arm_path = run_dir / "arm.json"
    if not arm_path.is_file():
        return None
    arm = read_json(arm_path)
    if arm.get("replay_source") == "features":
        return (f"<p>ARM reflects on feature statistics (kl_ratio {escape(_fmt(arm.get('kl_ratio')))}): per earlier "
                "task, the mean and variance of the router's input feature (<code>arm_features.safetensors</code>); "
                "pseudo-features are drawn from them, and no input is kept or generated. Targets stored for: "
                f"{escape(', '.join(arm.get('targets', {})))}.</p>")
    source = "real training inputs (oracle variant)" if arm.get("oracle") else "generated by per-task generators"
    rows = []
    for task in arm.get("pools", {}):
        inputs = load_pseudo_inputs(run_dir, task) or []
        info = load_pseudo_info(run_dir, task) or {}
        seconds = sum((info.get("timings") or {}).values()) if info.get("timings") else None
        shown = "<br>".join(escape(x[:width] + ("…" if len(x) > width else "")) for x in inputs[:examples])
        rows.append([_cell(task), _cell(len(inputs)), _cell(seconds, 0), _cell(info.get("explanation") or ""),
                     f'<td class="text">{shown}</td>'])
    return (f"<p>Inputs {escape(source)}; kl_ratio {escape(_fmt(arm.get('kl_ratio')))}.</p>"
            + _table(["task", "kept", "made in (s)", "how", "examples"], rows, "ex"))


def _config(run_dir: Path) -> str:
    path = run_dir / "config.json"
    if not path.is_file():
        return '<p class="muted">No config.json in this run.</p>'
    cfg = read_json(path)
    rows = [[_cell(k), f'<td class="text">{escape(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))}</td>']
            for k, v in cfg.items()]
    half = (len(rows) + 1) // 2  # two columns side by side: the settings fit one screen
    return ('<div class="grid">' + "".join(f"<div>{_table(['setting', 'value'], part, 'kv ex')}</div>"
                                           for part in (rows[:half], rows[half:]) if part) + "</div>")


def render_run_html(run_dir: str | Path, examples_per_task: int = 3, input_width: int = 400) -> str:
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    images = write_heatmaps(run_dir, results)
    model = results.get("model") or {}
    summary_rows = [["method", f"{results.get('method', 'eval')} — {results.get('method_summary', '')}".rstrip(" —")],
                    ["model", f"{model.get('name', '-')} ({_fmt(model.get('parameters'))} parameters, "
                              f"{model.get('dtype', '-')})" if model else "-"],
                    ["tasks", ", ".join(results["tasks"])],
                    ["task id at test time", "given" if results.get("task_id_at_test") else "not given (routed)"],
                    ["stages", str(len(results["matrix"]))],
                    ["wall time", f"{_fmt(results.get('wall_s'), 1)} s"],
                    ["run directory", str(run_dir.resolve())]]
    if results.get("independent"):
        summary_rows.append(["note", "single-task method: each task learned from the same start and scored by its "
                                     "own model (the diagonal)"])
    summary = _table(["", ""], [[_cell(k), _cell(v)] for k, v in summary_rows], "kv")
    matrix_img = next((p for p in images if p.name == "matrix.png"), None)
    matrix = f'<div class="grid"><div>{_matrix(results)}</div>'
    matrix += f"<div>{_image(matrix_img, 'accuracy matrix')}</div>" if matrix_img else ""
    matrix += "</div>"
    sections = [("summary", "Summary", summary), ("matrix", "Accuracy matrix", matrix),
                ("metrics", "Metrics", _metrics(run_dir, results)),
                ("routing", "Routing", _routing(run_dir, results, images)),
                ("stages", "Stages and timings", _stages(results)),
                ("examples", "Test examples", _examples(run_dir, results, examples_per_task, input_width))]
    pseudo = _pseudo(run_dir)
    if pseudo:
        sections.append(("pseudo", "ARM pseudo-inputs", pseudo))
    sections.append(("config", "Configuration", _config(run_dir)))
    title = f"petmix run {run_dir.resolve().name}: {results.get('method', 'eval')}"
    return _page(title, f"{len(results['tasks'])} tasks, model {model.get('name', '-')}", sections)


def write_run_html(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``); also (re)writes the heatmap PNGs it inlines."""
    out = Path(out) if out else Path(run_dir) / "report.html"
    page = render_run_html(run_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# ---- a comparison -----------------------------------------------------------------------------
def _markdown_table(text: str) -> str:
    """A Markdown pipe table (``table.md``) as an HTML table; numbers right-aligned."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return f"<pre>{escape(text)}</pre>"
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, body = split[0], [r for r in split[2:]]

    def cell(c: str) -> str:
        try:
            float(c.replace(",", ""))
            return f'<td class="num">{escape(c)}</td>'
        except ValueError:
            return f'<td class="fail">{escape(c)}</td>' if c.startswith("FAILED") else f"<td>{escape(c)}</td>"

    return _table(head, [[cell(c) for c in r] for r in body])


def render_compare_html(out_dir: str | Path) -> str:
    out_dir = Path(out_dir)
    sections = []
    table = out_dir / "table.md"
    body = _markdown_table(table.read_text(encoding="utf-8")) if table.is_file() else '<p class="muted">no table.md</p>'
    sections.append(("table", "Comparison", body + '<p class="muted">Scores in percent; the same task stream, '
                     "data and budget for every entry.</p>"))
    if (out_dir / "matrices.png").is_file():
        sections.append(("matrices", "Accuracy matrices", _image(out_dir / "matrices.png", "accuracy matrices")))
    runs = sorted(p.parent for p in out_dir.glob("*/results.json"))
    tasks: list[str] = []
    for run in runs:
        results = load_results(run)
        tasks = tasks or results["tasks"]
        parts = [f"<p>{escape(results.get('method', ''))} — {escape(results.get('method_summary', ''))}; "
                 f"wall time {escape(_fmt(results.get('wall_s'), 1))} s; "
                 f"{escape(_fmt(results.get('trainable_params_per_task')))} trainable parameters per task. "
                 f'Full page: <code>{escape(run.name)}/report.html</code> (<code>petmix report {escape(str(run))} '
                 "--html</code>).</p>", _matrix(results)]
        weights = test_router_weights(run, results) if not results.get("sources") else source_attention(run, results)
        if weights:
            cols = _block_names(results, max(len(r) for r in weights))
            if results.get("sources"):
                cols = [f"source:{s}" for s in results["sources"]] + ["own target"]
            parts.append("<h3>Mean router weight of each task's test inputs</h3>"
                         + _table(["task"] + cols, [[_cell(t)] + [_cell(v, 3) for v in row]
                                                    for t, row in zip(results["tasks"], weights)]))
        sections.append((f"run-{run.name}", f"Entry {run.name}", "".join(parts)))
    config = out_dir / next((p.name for p in runs), "-") / "config.json"
    if config.is_file():
        sections.append(("config", f"Configuration (entry {config.parent.name})", _config(config.parent)))
    return _page(f"petmix comparison {out_dir.resolve().name}",
                 f"{len(runs)} entries on {len(tasks)} tasks" + (f": {', '.join(tasks)}" if tasks else ""), sections)


def write_compare_html(out_dir: str | Path) -> Path:
    out = Path(out_dir) / "report.html"
    page = render_compare_html(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
