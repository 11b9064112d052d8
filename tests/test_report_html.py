"""`petmix report RUN --html` and the comparison page: self-contained, escaped, every section, in a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from chromium import CHROMIUM, inspect_page

from petmix.cli import main
from petmix.compare import Entry, run_comparison
from petmix.data.task import Example, Task
from petmix.report_html import render_compare_html, render_run_html, write_compare_html
from petmix.runs import write_jsonl
from petmix.train import TrainConfig, Trainer

RUN_SECTIONS = ["summary", "matrix", "metrics", "routing", "stages", "examples", "pseudo", "config"]


def _tasks() -> list[Task]:
    tasks = []
    for t, w in enumerate(["yes", "no"]):
        ex = [Example(f"say {w} <b>number</b> {i} & more", [w]) for i in range(10)]
        tasks.append(Task(f"task{t}", f"Answer {w}.", "exact_match", ex[:8], ex[8:], "plain"))
    return tasks


def _config(path: Path) -> TrainConfig:
    return TrainConfig(method="sapt-lora", model=str(path), batch_size=4, lr=5e-3, max_new_tokens=2,
                       replay_source="real")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_path) -> Path:
    out = tmp_path_factory.mktemp("html") / "cmp" / "sapt"
    Trainer(_config(tiny_llama_path), _tasks(), out).run()
    # an answer with markup: the page must show it as text
    path = out / "predictions" / "task0.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["prediction"] = "<script>console.error('injected')</script>"
    write_jsonl(path, rows)
    return out


def test_run_page_is_self_contained_and_escaped(tiny_run):
    page = render_run_html(tiny_run)
    for sid in RUN_SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "<script" not in page.replace("&lt;script", "")  # no script at all, the injected one escaped
    assert "&lt;b&gt;number&lt;/b&gt;" in page
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing fetched: images inlined, links in-page
    assert page.count('src="data:image/png;base64,') >= 2  # matrix and router heatmaps


def test_cli_writes_report_html(tiny_run, capsys):
    assert main(["report", str(tiny_run), "--html"]) == 0
    assert (tiny_run / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out


def test_compare_page(tiny_run, tiny_llama_path):
    out = tiny_run.parent
    settings = {k: v for k, v in _config(tiny_llama_path).to_dict().items() if k != "method"}
    run_comparison([Entry("sapt", "sapt-lora")], settings, _tasks(), out)  # finished entry: read, not re-run
    page = render_compare_html(out)
    assert '<section id="table">' in page and '<section id="run-sapt">' in page and '<section id="matrices">' in page
    assert '<td>sapt</td>' in page and "data:image/png;base64," in page
    (out / "table.md").write_text("| method | AP | note |\n|---|---|---|\n| sapt | 12.50 | <i>x</i> |\n", encoding="utf-8")
    page = render_compare_html(out)
    assert "&lt;i&gt;x&lt;/i&gt;" in page and '<td class="num">12.50</td>' in page
    assert write_compare_html(out).is_file()


@pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                    reason=f"headless check needs Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
def test_pages_in_headless_chromium(tiny_run, tmp_path):
    run_page = tiny_run / "report.html"
    run_page.write_text(render_run_html(tiny_run), encoding="utf-8")
    cmp_page = write_compare_html(tiny_run.parent)
    for page, sections in ((run_page, RUN_SECTIONS), (cmp_page, ["table", "run-sapt", "config"])):
        seen = inspect_page(page, width=1280)
        assert seen["errors"] == [], seen["errors"]
        shown = {s["id"] for s in seen["sections"] if s["visible"] and s["h"] > 20}
        assert set(sections) <= shown, (page, seen["sections"])
        assert all(i["ok"] for i in seen["images"]), seen["images"]
        assert seen["width"] <= 1280  # no sideways scrolling at laptop width
        assert seen["external"] == []
        assert seen["png"][:8] == b"\x89PNG\r\n\x1a\n"
