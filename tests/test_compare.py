"""petmix compare: several methods on one stream, one table."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from test_train import make_tasks

from petmix.cli import main
from petmix.compare import Entry, run_comparison
from petmix.errors import PetmixError


def test_entry_parse():
    assert Entry.parse("seq-lora") == Entry("seq-lora", "seq-lora", {})
    assert Entry.parse("ft=seq-ft:lr=5e-5").overrides == {"lr": 5e-5}
    e = Entry.parse("no-arm=sapt-lora:kl_ratio=0:replay-source=real")
    assert e == Entry("no-arm", "sapt-lora", {"kl_ratio": 0, "replay_source": "real"})
    with pytest.raises(PetmixError):
        Entry.parse("sapt-lora:kl_ratio")


def test_comparison_table_and_resume(tiny_llama_path, tmp_path):
    base = {"model": str(tiny_llama_path), "epochs": 1, "batch_size": 4, "lr": 5e-3, "max_new_tokens": 2,
            "replay_source": "real"}
    entries = [Entry.parse("sapt-lora"), Entry.parse("seq-lora"), Entry.parse("per-task-lora"), Entry.parse("mtl-lora")]
    rows = run_comparison(entries, base, make_tasks(2), tmp_path / "cmp")
    assert [r["label"] for r in rows] == ["sapt-lora", "seq-lora", "per-task-lora", "mtl-lora"]
    by = {r["label"]: r for r in rows}
    assert by["sapt-lora"]["FWT"] is not None  # per-task-lora ran first and gave single-task scores
    assert by["per-task-lora"]["FWT"] is None  # it is the single-task reference itself
    assert "task id given" in by["per-task-lora"]["note"] and "joint" in by["mtl-lora"]["note"]
    assert by["sapt-lora"]["trainable/task"] > by["seq-lora"]["trainable/task"]  # + router
    stages = by["sapt-lora"]["results"]["stages"]
    want = sum(s["train_s"] + s.get("replay_s", 0) + s["eval_s"] for s in stages)
    assert by["sapt-lora"]["wall s"] == pytest.approx(want, abs=0.2)  # ARM's between-task work counts
    table = list(csv.reader((tmp_path / "cmp" / "table.csv").open()))
    assert table[0][:5] == ["method", "AP", "F.Ra", "FWT", "BWT"] and len(table) == 5
    assert (tmp_path / "cmp" / "matrices.png").stat().st_size > 0
    mtime = (tmp_path / "cmp" / "seq-lora" / "results.json").stat().st_mtime
    recorded = json.loads((tmp_path / "cmp" / "seq-lora" / "results.json").read_text())["device"]
    assert recorded.startswith(f"cpu ({torch.get_num_threads()} thread")  # where it ran, beside its wall times
    run_comparison(entries, base, make_tasks(2), tmp_path / "cmp")  # finished entries are read, not re-run
    assert (tmp_path / "cmp" / "seq-lora" / "results.json").stat().st_mtime == mtime


def test_jobs_train_the_same_runs_in_worker_processes(tiny_llama_path, tmp_path):
    base = {"model": str(tiny_llama_path), "epochs": 1, "batch_size": 4, "lr": 5e-3, "max_new_tokens": 2}
    entries = [Entry.parse("seq-lora"), Entry.parse("broken=full-ft:unfreeze=no_such_weight"),
               Entry.parse("per-task-lora")]
    kw = {"seeds": [0, 1], "tasks_for_seed": lambda s: make_tasks(2)}
    one = {r["label"]: r for r in run_comparison(entries, base, make_tasks(2), tmp_path / "one", **kw)}
    two = {r["label"]: r for r in run_comparison(entries, base, make_tasks(2), tmp_path / "two", jobs=3, **kw)}
    for label in ("seq-lora", "per-task-lora"):
        for seed in (0, 1):
            a, b = (json.loads((tmp_path / d / label / f"seed-{seed}" / "results.json").read_text()) for d in ("one", "two"))
            assert a["matrix"] == b["matrix"] and a["metrics"] == b["metrics"]
            threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // 3))
            assert b["device"].startswith(f"cpu ({threads} thread")  # the cores shared out among the jobs
    assert [one[k].get("AP") for k in one] == [two[k].get("AP") for k in two]  # the same table (broken: none)
    assert two["seq-lora"]["FWT"] is not None  # each seed's reference had finished before seq-lora started
    assert "no_such_weight" in two["broken"]["failed"] and "failed" not in two["seq-lora"]


def test_a_worker_logs_each_run_once_under_its_own_name(tmp_path):
    import logging

    from petmix.parallel import worker_logging

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        for tag in ("first seed 0", "second seed 0"):  # one worker process, two runs in turn
            worker_logging(tag, str(tmp_path / "log.txt"), logging.INFO)
            logging.getLogger("petmix.train").info("stage 1 done")
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
            h.close()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line.split(" INFO ")[1] for line in lines] == ["[first seed 0] petmix.train: stage 1 done",
                                                           "[second seed 0] petmix.train: stage 1 done"]


def test_compare_cli_bad_entry_exits_2(tmp_path, capsys):
    assert main(["compare", "--methods", "sapt-lora:oops", "--out", str(tmp_path / "c")]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["compare", "--methods", "seq-lora", "--jobs", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--jobs: at least 1" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_single_task_entries_get_per_task_columns_and_a_failure_does_not_stop_the_rest(tiny_llama_path, tmp_path):
    base = {"model": str(tiny_llama_path), "epochs": 1, "batch_size": 4, "lr": 5e-3, "max_new_tokens": 2}
    entries = [Entry.parse("prompt-tuning"), Entry.parse("bad=lora:unfreeze=x:lora_r=0"), Entry.parse("lora")]
    with pytest.raises(PetmixError):  # a setting that cannot be valid is refused before anything runs
        run_comparison(entries, base, make_tasks(2), tmp_path / "cmp")
    assert not (tmp_path / "cmp" / "prompt-tuning").exists()
    entries[1] = Entry.parse("broken=full-ft:unfreeze=no_such_weight")  # fails only once it starts
    rows = run_comparison(entries, base, make_tasks(2), tmp_path / "cmp")
    assert "failed" in rows[1] and "no_such_weight" in rows[1]["failed"]
    table = list(csv.reader((tmp_path / "cmp" / "table.csv").open()))
    assert table[0] == ["method", "task0", "task1", "AP", "trainable/task", "wall s", "note"]
    assert table[2][0] == "broken" and table[2][-1].startswith("FAILED")
    lora = rows[2]
    assert lora["AP"] == pytest.approx((lora["task:task0"] + lora["task:task1"]) / 2)
    assert lora["note"] == "single-task: one model per task"


def test_device_note_names_runs_made_off_the_cpu():
    from petmix.compare import device_note

    cpu, gpu = {"device": "cpu (1 thread)"}, {"device": "cuda (NVIDIA H200)"}
    assert device_note({0: cpu, 1: {}}) == ""  # results from before petmix recorded it were CPU runs
    assert device_note({0: gpu, 1: gpu}) == "ran on cuda (NVIDIA H200): wall s not comparable with CPU rows"
    assert device_note({0: cpu, 2: gpu}) == "ran on cpu (1 thread) (seed 0); cuda (NVIDIA H200) (seed 2)"
