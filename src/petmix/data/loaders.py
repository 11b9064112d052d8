"""Turn a task spec (folder, name under a data dir, unique prefix, or `bigbench:<name>`) into a Task.

Folder layouts, detected per folder:
- CL layout (SAPT / O-LoRA): train.json + test.json (+ labels.json for Long_Sequence);
- generic: train.jsonl + test.jsonl, lines {"input": str, "output": str | [str]},
  optional task.json {"definition": str, "metric": "rougeL" | "exact_match"};
- BIG-bench: a task.json with "examples".
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from petmix.data import bigbench
from petmix.data.task import METRICS, Example, Task, cap, make_example, read_json, split_off
from petmix.errors import DataError

BIGBENCH_PREFIX = "bigbench:"
BENCHMARK_DIRS = {"SuperNI": "superni", "Long_Sequence": "long"}
DERIVED_TEST_FRACTION = 0.1
# A task whose copy has a test file but no train.json (dbpedia in the shared copy): this share of the
# test file is held back as the test set and the rest becomes train, disjoint by input text.
DERIVED_TRAIN_HELD_TEST = 0.2


def load_task(
    spec: str | Path,
    data_dir: str | Path | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    test_seed: int | None = None,
) -> Task:
    """Load one task; max_train / max_test keep a seeded random sample (deterministic given seed).

    ``test_seed`` (default: ``seed``) alone decides which examples are test: the test sample and any
    train/test split a loader has to make. Runs with different seeds and one test_seed are scored on
    the same test examples, so their spread is the training's, not the test sample's."""
    spec = str(spec)
    tseed = seed if test_seed is None else test_seed
    if spec.startswith(BIGBENCH_PREFIX):
        task = bigbench.load_bigbench_task(spec.removeprefix(BIGBENCH_PREFIX), seed=tseed)
    else:
        task = load_folder(resolve_folder(spec, data_dir), seed=tseed)
    return _apply_caps(task, max_train, max_test, seed, tseed)


def load_tasks(
    specs: list[str],
    data_dir: str | Path | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    test_seed: int | None = None,
) -> list[Task]:
    """Load several tasks in order; BIG-bench ones share one pass over the sdist (``test_seed``: see
    load_task)."""
    tseed = seed if test_seed is None else test_seed
    bb_names = [s.removeprefix(BIGBENCH_PREFIX) for s in map(str, specs) if s.startswith(BIGBENCH_PREFIX)]
    bb = (
        dict(zip(bb_names, bigbench.load_bigbench_tasks(bb_names, seed=tseed), strict=True))
        if bb_names
        else {}
    )
    tasks = []
    for spec in map(str, specs):
        if spec.startswith(BIGBENCH_PREFIX):
            task = bb[spec.removeprefix(BIGBENCH_PREFIX)]
        else:
            task = load_folder(resolve_folder(spec, data_dir), seed=tseed)
        tasks.append(_apply_caps(task, max_train, max_test, seed, tseed))
    return tasks


def resolve_folder(spec: str, data_dir: str | Path | None = None) -> Path:
    """A task folder: the path itself, data_dir/spec, or a (unique-prefix) name under data_dir's benchmarks."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.is_file() and path.name in ("task.json", "train.json", "train.jsonl"):
        return path.parent
    if data_dir is None:
        raise DataError(spec, "no such task folder (pass a data dir to look tasks up by name)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(root, "data dir does not exist")
    for base in (root, root / "CL_Benchmark"):
        if (base / spec).is_dir():
            return base / spec
    candidates = _task_folders(root)
    names = sorted({p.name for p in candidates})
    exact = [p for p in candidates if p.name == spec]
    prefixed = [p for p in candidates if p.name.startswith(spec)]
    # "task15" would match task1510/task1572/task1590; prefer a match at a "_" boundary, then any prefix
    bounded = [p for p in prefixed if p.name.startswith(spec + "_")]
    for matches in (exact, bounded, prefixed):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(sorted(str(p.relative_to(root)) for p in matches)[:10])
            raise DataError(root, f"task name {spec!r} is ambiguous: {listed}")
    close = [n for n in names if spec in n][:5] or difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    hint = f"; close matches: {', '.join(close)}" if close else f"; known tasks: {', '.join(names[:40])}"
    raise DataError(root, f"unknown task {spec!r}{hint if names else '; no task folders found there'}")


def _task_folders(root: Path) -> list[Path]:
    bases = [root, root / "CL_Benchmark"]
    return sorted(
        p
        for base in bases
        for bench in BENCHMARK_DIRS
        if (base / bench).is_dir()
        for p in (base / bench).iterdir()
        if p.is_dir()
    )


def load_folder(folder: Path, *, seed: int = 0) -> Task:
    """Load a task folder in whichever layout it uses."""
    if not folder.is_dir():
        raise DataError(folder, "task folder does not exist")
    if (
        (folder / "train.json").exists()
        or (folder / "test.json").exists()
        or (folder / "labels.json").exists()
    ):
        return _load_cl(folder, seed)
    if (folder / "train.jsonl").exists() or (folder / "test.jsonl").exists():
        return _load_generic(folder)
    if (folder / "task.json").exists():
        return bigbench.task_from_json(read_json(folder / "task.json"), folder / "task.json", seed=seed)
    raise DataError(
        folder, "no task data: expected train.json/test.json, train.jsonl/test.jsonl or task.json"
    )


def _load_cl(folder: Path, seed: int) -> Task:
    kind = BENCHMARK_DIRS.get(folder.parent.name) or (
        "long" if (folder / "labels.json").exists() else "superni"
    )
    train_path = folder / "train.json"
    test_path = next((p for p in (folder / "test.json", folder / "dev.json") if p.exists()), None)
    if not train_path.exists():
        if test_path is None:
            present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise DataError(train_path, f"train.json is missing, and so are test.json and dev.json (this copy of "
                                        f"the benchmark holds only: {present}): task {folder.name} cannot run")
        return _derive_train(folder, kind, test_path, seed)
    definition, train = _read_cl_file(train_path)
    notes = []
    if test_path is None:  # dev.json is the same file as test.json in this benchmark, so it may stand in
        train, test = split_off(train, DERIVED_TEST_FRACTION, seed)
        if not test:
            raise DataError(train_path, "test.json is missing and train is too small to hold part of it back")
        notes.append(
            f"test derived from held-back {DERIVED_TEST_FRACTION:.0%} of train (seed {seed}): "
            f"{folder / 'test.json'} is missing"
        )
    else:
        _, test = _read_cl_file(test_path)
    return _cl_task(folder, kind, definition, train, test, notes)


def _cl_task(folder: Path, kind: str, definition: str, train: list[Example], test: list[Example],
             notes: list[str]) -> Task:
    """A CL_Benchmark task: SuperNI scored by ROUGE-L, Long Sequence by exact match over its labels."""
    return Task(
        name=folder.name,
        definition=definition,
        metric="exact_match" if kind == "long" else "rougeL",
        train=train,
        test=test,
        template=kind,
        labels=_read_labels(folder / "labels.json") if kind == "long" else None,
        benchmark=kind,
        source=str(folder),
        notes=notes,
    )


def _derive_train(folder: Path, kind: str, test_path: Path, seed: int) -> Task:
    """train.json is missing but a test file is there (dbpedia in the shared copy): a seeded share of
    the test file stays test, the rest becomes train, minus any example whose input text is also a
    test input, so no test input is ever trained on. Said in the task's notes (and so in results.json)."""
    definition, pool = _read_cl_file(test_path)
    train, test = split_off(pool, DERIVED_TRAIN_HELD_TEST, seed)
    test_inputs = {e.input.strip() for e in test}
    kept = [e for e in train if e.input.strip() not in test_inputs]
    if not kept or not test:
        raise DataError(test_path, "train.json is missing and the test file is too small to derive a train split")
    dropped = len(train) - len(kept)
    note = (f"train derived from {test_path.name} (train.json is missing): {len(test)} of its {len(pool)} "
            f"examples (seeded {DERIVED_TRAIN_HELD_TEST:.0%}, seed {seed}) are the test set, the other "
            f"{len(kept)} train" + (f" ({dropped} dropped: their input is also a test input)" if dropped else "")
            + "; disjoint by input text")
    return _cl_task(folder, kind, definition, kept, test, [note])


def _read_cl_file(path: Path) -> tuple[str, list[Example]]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(
            path, f"expected a JSON object with 'Definition' and 'Instances', got {type(data).__name__}"
        )
    definition = data.get("Definition", [])
    if isinstance(definition, str):
        definition = [definition]
    if not isinstance(definition, list) or not all(isinstance(d, str) for d in definition):
        raise DataError(path, "'Definition' must be a list of strings")
    if "Instances" not in data:
        raise DataError(path, "no 'Instances' field")
    instances = data["Instances"]
    if not isinstance(instances, list):
        raise DataError(path, f"'Instances' must be a list, got {type(instances).__name__}")
    if not instances:
        raise DataError(path, "empty task: 'Instances' is empty")
    examples = [make_example(item, path, f"instance {i}") for i, item in enumerate(instances)]
    return "\n".join(d.strip() for d in definition).strip(), examples


def _read_labels(path: Path) -> list[str]:
    labels = read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(path, "labels.json must be a non-empty list of strings")
    return labels


def _load_generic(folder: Path) -> Task:
    meta: Any = read_json(folder / "task.json") if (folder / "task.json").exists() else {}
    meta_path = folder / "task.json"
    if not isinstance(meta, dict):
        raise DataError(meta_path, "task.json must hold a JSON object")
    definition = meta.get("definition", "")
    metric = meta.get("metric", "rougeL")
    if not isinstance(definition, str):
        raise DataError(meta_path, "'definition' must be a string")
    if metric not in METRICS:
        raise DataError(meta_path, f"unknown metric {metric!r}; use one of: {', '.join(METRICS)}")
    return Task(
        name=str(meta.get("name") or folder.name),
        definition=definition,
        metric=metric,
        train=_read_jsonl(folder / "train.jsonl"),
        test=_read_jsonl(folder / "test.jsonl"),
        template="plain",
        benchmark="folder",
        source=str(folder),
    )


def _read_jsonl(path: Path) -> list[Example]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(path, "file is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read file: {e}") from None
    examples = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"malformed JSON on line {lineno}: {e.msg}") from None
        examples.append(make_example(item, path, f"line {lineno}"))
    if not examples:
        raise DataError(path, "empty task: no examples")
    return examples


def _apply_caps(task: Task, max_train: int | None, max_test: int | None, seed: int,
                test_seed: int | None = None) -> Task:
    task.train = cap(task.train, max_train, seed)
    task.test = cap(task.test, max_test, seed if test_seed is None else test_seed)
    return task
