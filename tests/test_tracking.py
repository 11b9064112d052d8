"""--report-to tensorboard: event files that tensorboard's reader parses, with the loss and matrix tags."""

from __future__ import annotations

import sys

import pytest

from petmix.data.task import Example, Task
from petmix.errors import PetmixError
from petmix.runs import read_json
from petmix.train import TrainConfig, Trainer


def _tasks(n: int = 2) -> list[Task]:
    tasks = []
    for t, w in enumerate(["yes", "no", "cat"][:n]):
        ex = [Example(f"say {w} number {i}", [w]) for i in range(10)]
        tasks.append(Task(f"task{t}", f"Answer {w}.", "exact_match", ex[:8], ex[8:], "plain"))
    return tasks


def _train(path, out, **kw) -> dict:
    cfg = TrainConfig(method="sapt-lora", model=str(path), batch_size=4, lr=5e-3, max_new_tokens=2,
                      replay_source="real", **kw)
    return Trainer(cfg, _tasks(), out).run()


def test_no_flag_no_tracking(tiny_llama_path, tmp_path):
    before = set(sys.modules)  # (first in this file: the next test imports tensorboard)
    _train(tiny_llama_path, tmp_path / "run")
    assert not (tmp_path / "run" / "tracking").exists()
    new = {m for m in set(sys.modules) - before if "tensorboard" in m or "wandb" in m or "mlflow" in m}
    assert not new  # nothing extra imported


def test_tensorboard_event_files(tiny_llama_path, tmp_path):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs tensorboard (pip install -e .[dev])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    results = _train(tiny_llama_path, out, report_to="tensorboard")
    files = sorted((out / "tracking").rglob("events.out.tfevents.*"))
    assert files, list(out.rglob("*"))
    scalars: dict[str, list] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    steps = sum(s["steps"] for s in results["stages"])
    assert [e.step for e in scalars["loss"]] == list(range(1, steps + 1))  # every optimiser step, over the stream
    for j, task in enumerate(results["tasks"]):  # the matrix after each stage: row i at step i
        logged = {e.step: e.value for e in scalars[f"matrix/{task}"]}
        want = {i + 1: row[j] for i, row in enumerate(results["matrix"]) if row[j] is not None}
        assert logged == pytest.approx(want)
    assert {"router/train/task0", "router/train/task1", "router/test/task0/task0", "metrics/AP"} <= set(scalars)
    assert read_json(out / "config.json")["report_to"] == "tensorboard"


def test_unknown_or_missing_tracker_is_a_clear_error(tiny_llama_path, tmp_path):
    with pytest.raises(PetmixError, match="unknown tracker"):
        _train(tiny_llama_path, tmp_path / "a", report_to="tensorbored")
