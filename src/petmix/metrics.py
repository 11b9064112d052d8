"""Evaluation metrics: per-example scores and continual-learning summaries.

Per-example scores are in percent (0-100), as in Super-NaturalInstructions.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

from petmix.errors import PetmixError

METRICS = ("rougeL", "exact_match")

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # Same setup as SuperNI's compute_metrics.py (non-xlingual branch):
    # RougeScorer(['rougeL'], use_stemmer=True) with rouge-score's default tokenizer
    # (lowercase, keep [a-z0-9] only, Porter stemming). Built once; it is reusable.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_refs(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise PetmixError("references must be a list of strings, not a single string")
    if len(references) == 0:
        raise PetmixError("an example has no reference answers")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in percent, max over the references (as SuperNI scores it)."""
    _check_refs(references)
    scorer = _scorer()
    # rouge-score's signature is score(target, prediction).
    best = max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)
    return 100.0 * best


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, collapse spaces.

    SuperNI's variant keeps articles; the petmix spec asks for the SQuAD one.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100.0 if the normalised prediction equals any normalised reference, else 0.0."""
    _check_refs(references)
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(ref) for ref in references) else 0.0


def _as_refs(refs: str | Sequence[str]) -> Sequence[str]:
    # Classification data often has a single gold label per example; accept it bare.
    return [refs] if isinstance(refs, str) else refs


def _check_lengths(predictions: Sequence[str], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise PetmixError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise PetmixError("no predictions to score")


def accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean exact match (percent) over examples; each reference is a string or a list of them."""
    _check_lengths(predictions, references)
    total = sum(exact_match(p, _as_refs(r)) for p, r in zip(predictions, references, strict=True))
    return total / len(predictions)


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Score one example with the metric named ``"rougeL"`` or ``"exact_match"``."""
    if metric == "rougeL":
        return rouge_l(prediction, references)
    if metric == "exact_match":
        return exact_match(prediction, references)
    raise PetmixError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def task_score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean per-example ``score`` over a task's examples."""
    if metric not in METRICS:  # fail before scoring anything
        score(metric, "", [""])
    _check_lengths(predictions, references)
    return sum(score(metric, p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


# --- continual-learning metrics -------------------------------------------------------


def _present(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cl_metrics(
    matrix: Sequence[Sequence[float | None]],
    single_task: Sequence[float | None] | None = None,
) -> dict[str, float | None]:
    """AP, F.Ra, FWT and BWT from ``matrix[i][j]`` = score on task j after training stage i.

    With T stages (0-based here, last stage L = T-1):

    - AP   = mean_j a[L][j]
    - F.Ra = mean_{j<L} ( max_{j<=l<L} a[l][j] - a[L][j] )
    - FWT  = mean_i a[i][i] - single_task[i]   (None without ``single_task``)
    - BWT  = mean_{i<L} a[L][i] - a[i][i]       (divides by T-1, not T)

    Missing entries (None or NaN, or a row shorter than the matrix) are skipped: each mean
    is over the terms whose entries are all present, and a metric with no terms is None.
    So a 1x1 matrix gives F.Ra and BWT None.

    A run in progress may give R rows for C > R tasks: the metrics then use the R stages
    present, i.e. AP over tasks 0..R-1 of the last row, F.Ra and BWT over j < R-1, FWT over
    i < R. Tasks not yet trained on are ignored even if the last row scores them.
    """
    rows = len(matrix)
    cols = max((len(r) for r in matrix), default=0)
    if rows > cols:
        raise PetmixError(f"score matrix has {rows} stages but only {cols} tasks")
    none: dict[str, float | None] = {"AP": None, "F.Ra": None, "FWT": None, "BWT": None}
    if rows == 0:
        return none

    def a(i: int, j: int) -> float | None:
        row = matrix[i]
        v = row[j] if j < len(row) else None
        return v if _present(v) else None

    last = rows - 1
    ap = [v for j in range(rows) if (v := a(last, j)) is not None]

    fra: list[float] = []
    bwt: list[float] = []
    for j in range(last):
        final = a(last, j)
        if final is None:
            continue
        seen = [v for stage in range(j, last) if (v := a(stage, j)) is not None]
        if seen:
            fra.append(max(seen) - final)
        learned = a(j, j)
        if learned is not None:
            bwt.append(final - learned)

    fwt: list[float] | None = None
    if single_task is not None:
        fwt = []
        for i in range(min(rows, len(single_task))):
            v, s = a(i, i), single_task[i]
            if v is not None and s is not None and _present(s):
                fwt.append(v - s)

    # Unlike SAPT's score.py, FWT uses the given single-task scores (it hard-codes 50.94)
    # and BWT divides by T-1 terms (it divides by T).
    return {
        "AP": _mean(ap),
        "F.Ra": _mean(fra),
        "FWT": _mean(fwt) if fwt is not None else None,
        "BWT": _mean(bwt),
    }


def single_row_metrics(row: Sequence[float | None]) -> dict[str, float | None]:
    """Metrics of one evaluation of every task (zero-shot, or a joint multi-task model): AP is the
    mean over all tasks; forgetting and transfer need a sequence of stages, so they are None."""
    vals = [v for v in row if v is not None and not math.isnan(v)]
    return {"AP": sum(vals) / len(vals) if vals else None, "F.Ra": None, "FWT": None, "BWT": None}


ROUTING_DEFINITION = ("routing accuracy: the share of a task's test inputs whose largest router weight is on "
                      "that task's own block; own weight: the mean weight on the own block")


def routing_accuracy(weights: Sequence[Sequence[float]], own: int) -> dict[str, float | int | None]:
    """Routing accuracy (percent) and mean own-block weight of one task's inputs.

    ``weights`` holds one router weight vector per test input; ``own`` is the index of the block trained
    on that task. A tie for the largest weight counts as a miss unless the own block is the only maximum,
    so a router that gives every block the same weight scores 0, not 100.
    """
    rows = [list(w) for w in weights if w is not None and len(w) > own]
    if not rows:
        return {"accuracy": None, "own_weight": None, "n": 0}
    hits = 0
    for w in rows:
        top = max(w)
        hits += int(w[own] == top and sum(1 for v in w if v == top) == 1)
    return {"accuracy": round(100.0 * hits / len(rows), 4),
            "own_weight": round(sum(w[own] for w in rows) / len(rows), 6), "n": len(rows)}
