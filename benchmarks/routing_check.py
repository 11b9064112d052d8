"""Routing accuracy of a finished run on its own test inputs, with and without the task definitions.

The harder check of docs/results.md: the router is a learned function of the input's features, so it
should still find the task when the definition (the instruction text every input of a task shares) is
left out of the prompt. For a run that reflected on generated pseudo-inputs (SAPT's ARM with
replay_source generated) it also routes those pseudo-inputs with the final router: their routing accuracy
and how far their mean weights lie from those of the same task's real test inputs (issue 12, part 3). Usage:

    .venv/bin/python benchmarks/routing_check.py runs/bench/superni5/sapt-lora [more runs...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import petmix
from petmix.data.loaders import load_tasks
from petmix.data.streams import resolve_stream
from petmix.data.task import Task
from petmix.data.templates import format_prompt
from petmix.metrics import routing_accuracy
from petmix.replay.generator import load_pseudo_inputs


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows)]


def check(run: str) -> dict[str, dict[str, float | None]]:
    model = petmix.load(run)
    cfg = model.config
    specs = resolve_stream(cfg["stream"]) if cfg.get("stream") else cfg["tasks"]  # bigbench: specs, not names
    tasks = load_tasks(specs, cfg.get("data"), max_train=cfg.get("max_train"), max_test=cfg.get("max_test"),
                       seed=cfg.get("seed", 0), test_seed=cfg.get("test_seed"))  # the run's own test examples
    def weights(task: Task, inputs: list[str]) -> list[list[float]]:
        return [[r[name] for name in model.block_names] for r in model.route([format_prompt(task, x) for x in inputs])]

    out: dict[str, dict[str, float | None]] = {}
    real: dict[str, list[list[float]]] = {}  # the test inputs' weights, as the run saw them (with definition)
    for variant in ("with definition", "without definition"):
        accs, owns = [], []
        for j, task in enumerate(tasks):
            shown = task if variant == "with definition" else dataclasses.replace(task, definition="")
            rows = weights(shown, [ex.input for ex in task.test])
            if variant == "with definition":
                real[task.name] = rows
            got = routing_accuracy(rows, j)
            accs.append(got["accuracy"])
            owns.append(got["own_weight"])
        out[variant] = {"routing_accuracy": round(sum(accs) / len(accs), 2),
                        "own_weight": round(sum(owns) / len(owns), 4),
                        "per_task": dict(zip(cfg["tasks"], accs))}
    pseudo: dict[str, dict[str, float | None]] = {}
    for j, task in enumerate(tasks):
        inputs = load_pseudo_inputs(run, task.name)
        if not inputs:
            continue
        fake = weights(task, inputs)
        got = routing_accuracy(fake, j)
        gap = max(abs(a - b) for a, b in zip(_mean(fake), _mean(real[task.name])))
        pseudo[task.name] = {"n": len(inputs), "routing_accuracy": got["accuracy"], "own_weight": got["own_weight"],
                             "max_diff_of_mean_weights_vs_real": round(gap, 4)}
    if pseudo:
        out["generated pseudo-inputs"] = pseudo
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps({"run": run, **check(run)}))


if __name__ == "__main__":
    main()
