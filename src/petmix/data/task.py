"""The in-memory form of one task: its examples, instruction, metric and prompt template."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petmix.errors import DataError

METRICS = ("rougeL", "exact_match")


@dataclass
class Example:
    input: str
    outputs: list[str]  # references; outputs[0] is the training target

    @property
    def target(self) -> str:
        return self.outputs[0]


@dataclass
class Task:
    name: str
    definition: str
    metric: str  # "rougeL" | "exact_match"
    train: list[Example]
    test: list[Example]
    template: str  # "superni" | "long" | "plain" (key into templates.TEMPLATES)
    labels: list[str] | None = None
    benchmark: str = "folder"  # "superni" | "long" | "folder" | "bigbench"
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def heldout_split(
        self, fraction: float = 0.1, seed: int = 0, max_n: int | None = None
    ) -> tuple[list[Example], list[Example]]:
        """(train_part, held_out), both carved from train: a model-selection split that never touches test."""
        rest, held = split_off(self.train, fraction, seed, max_n)
        return rest, held


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """k of range(n) chosen at random with `seed`, kept in their original order."""
    return sorted(random.Random(seed).sample(range(n), k))


def split_off(
    examples: list[Example], fraction: float, seed: int, max_n: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Seeded (rest, part) split; part holds round(fraction * n) examples (at least 1, at most max_n)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    n = len(examples)
    k = min(max(1, round(fraction * n)), n - 1) if n > 1 else 0
    if max_n is not None:
        k = min(k, max_n)
    chosen = set(sample_indices(n, k, seed))
    part = [e for i, e in enumerate(examples) if i in chosen]
    rest = [e for i, e in enumerate(examples) if i not in chosen]
    return rest, part


def cap(examples: list[Example], max_n: int | None, seed: int) -> list[Example]:
    """A seeded random sample of at most max_n examples (not the first max_n: files are often sorted)."""
    if max_n is None or len(examples) <= max_n:
        return list(examples)
    return [examples[i] for i in sample_indices(len(examples), max_n, seed)]


def read_json(path: Path) -> Any:
    """Parse a JSON file; DataError names the file and, for bad JSON, the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "file is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read file: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def make_example(item: Any, path: Path, where: str, output_key: str = "output") -> Example:
    """Validate one {input, output} record; `where` says which record (e.g. "instance 3") for errors."""
    if not isinstance(item, dict):
        raise DataError(path, f"{where} must be an object, got {type(item).__name__}")
    for key in ("input", output_key):
        if key not in item:
            raise DataError(path, f"{where} has no {key!r} field")
    text, out = item["input"], item[output_key]
    if not isinstance(text, str):
        raise DataError(path, f"{where}: 'input' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(path, f"{where}: 'input' is empty (every example needs an input to answer)")
    outputs = [out] if isinstance(out, str) else out
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise DataError(path, f"{where}: {output_key!r} must be a string or a list of strings")
    if not outputs:
        raise DataError(path, f"{where}: {output_key!r} is an empty list")
    return Example(text, list(outputs))
