"""What a method must beat to have learned anything: the majority label and the untouched base model.

- Majority label: each task's most frequent training answer, given for every test input (for a
  classification task the majority-class predictor; for a generation task a constant answer, usually
  near 0). Computed from the training examples a run sees (so per seed), scored on the test set.
- Zero-shot: the backbone with no block at all, greedy decoding with the run's generation settings,
  on the same test examples.

Both are cached in ``OUT/floors/`` of a comparison, keyed by what they depend on, so a resumed
comparison reads them instead of recomputing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from petmix.data.task import Task
from petmix.metrics import single_row_metrics, task_score
from petmix.runs import read_json, write_json

log = logging.getLogger(__name__)


def majority_answer(task: Task) -> str:
    """The most frequent training answer (ties: the one met first in the training data)."""
    counts = Counter(ex.target.strip() for ex in task.train)
    best = max(counts.values())
    return next(ex.target.strip() for ex in task.train if counts[ex.target.strip()] == best)


def is_classification(task: Task) -> bool:
    """A task with a label set, or whose training answers take few distinct values (at most 20, and
    each met twice on average)."""
    if task.labels:
        return True
    answers = {ex.target.strip() for ex in task.train}
    return len(answers) <= min(20, len(task.train) // 2)


def majority_floor(tasks: list[Task]) -> dict[str, Any]:
    """Per task: the majority answer and its test score; AP as the mean over tasks."""
    per_task = {}
    for task in tasks:
        answer = majority_answer(task)
        value = task_score(task.metric, [answer] * len(task.test), [ex.outputs for ex in task.test])
        per_task[task.name] = {"answer": answer, "score": round(value, 4), "metric": task.metric,
                               "classification": is_classification(task), "n_test": len(task.test),
                               "n_train": len(task.train)}
    row = [per_task[t.name]["score"] for t in tasks]
    return {"method": "majority label", "tasks": [t.name for t in tasks], "matrix": [row],
            "metrics": single_row_metrics(row), "per_task": per_task}


def _examples_key(tasks: list[Task], split: str = "test") -> list[list[Any]]:
    """What a floor depends on: each task's name and the examples of ``split`` (hashed)."""
    import hashlib

    def digest(examples: list[Any]) -> str:
        text = "\n".join(f"{e.input}\t{e.target}" for e in examples)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return [[t.name, len(getattr(t, split)), digest(getattr(t, split))] for t in tasks]


def cached_majority_floor(out: Path, tasks: list[Task], seed: int) -> dict[str, Any]:
    """The majority floor of one seed's training sample, read from ``out`` if computed before."""
    path = Path(out) / f"majority-seed-{seed}.json"
    key = {"test": _examples_key(tasks), "train": _examples_key(tasks, "train")}
    if path.is_file():
        cached = read_json(path)
        if cached.get("key") == key:
            return cached
    result = {**majority_floor(tasks), "seed": seed, "key": key}
    write_json(path, result)
    return result


def cached_zero_shot_floor(out: Path, tasks: list[Task], cfg: Any) -> dict[str, Any]:
    """The untouched backbone's scores (``cfg``: a TrainConfig for the model and generation settings),
    written like ``petmix eval`` into ``out/zero-shot`` and read back if its settings match."""
    import torch

    from petmix.backbone import load_backbone
    from petmix.evaluate import evaluate_tasks
    from petmix.runs import write_jsonl

    run = Path(out) / "zero-shot"
    key = {"model": cfg.model, "test": _examples_key(tasks), "max_new_tokens": cfg.max_new_tokens,
           "max_source_len": cfg.max_source_len, "chat": cfg.chat, "bf16": cfg.bf16}
    if (run / "results.json").is_file():
        cached = read_json(run / "results.json")
        if cached.get("key") == key:
            log.info("zero-shot floor: read %s", run / "results.json")
            return cached
    started = time.time()
    backbone = load_backbone(cfg.model)
    with torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        results = evaluate_tasks(backbone, tasks, cfg.generation(), desc="zero-shot floor")
    for task in tasks:
        write_jsonl(run / "predictions" / f"{task.name}.jsonl", results[task.name]["records"])
    names = [t.name for t in tasks]
    row = [results[n]["score"] for n in names]
    payload = {"method": "zero-shot", "tasks": names, "matrix": [row], "metrics": single_row_metrics(row),
               "per_task": {n: {"metric": results[n]["metric"], "score": results[n]["score"], "n_test": results[n]["n"]}
                            for n in names},
               "model": backbone.describe(), "key": key, "wall_s": round(time.time() - started, 1)}
    write_json(run / "results.json", payload)
    return payload
