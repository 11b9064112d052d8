from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer

from petmix import metrics
from petmix.errors import PetmixError
from petmix.metrics import accuracy, cl_metrics, exact_match, rouge_l, score, task_score

NAN = float("nan")


def approx(d: dict[str, float | None]) -> dict[str, object]:
    return {k: (None if v is None else pytest.approx(v)) for k, v in d.items()}


# --- continual-learning metrics -------------------------------------------------------


def test_cl_metrics_3x3() -> None:
    m = [
        [80, 10, 20],
        [70, 85, 30],
        [60, 75, 90],
    ]
    got = cl_metrics(m, single_task=[82, 80, 88])
    assert got == approx(
        {
            "AP": 75.0,  # (60 + 75 + 90) / 3
            "F.Ra": 15.0,  # (max(80, 70) - 60 + max(85) - 75) / 2 = (20 + 10) / 2
            "FWT": 5 / 3,  # ((80 - 82) + (85 - 80) + (90 - 88)) / 3 = 5 / 3
            "BWT": -15.0,  # ((60 - 80) + (75 - 85)) / 2   -- T-1 terms, not T
        }
    )


def test_cl_metrics_4x4_max_not_on_diagonal() -> None:
    m = [
        [50, 0, 0, 0],
        [40, 60, 0, 0],
        [55, 55, 70, 0],
        [30, 50, 65, 80],
    ]
    got = cl_metrics(m)
    assert got == approx(
        {
            "AP": 56.25,  # (30 + 50 + 65 + 80) / 4 = 225 / 4
            # j0: max(50, 40, 55) - 30 = 25; j1: max(60, 55) - 50 = 10; j2: 70 - 65 = 5
            "F.Ra": 40 / 3,
            "FWT": None,  # no single-task scores
            "BWT": -35 / 3,  # ((30 - 50) + (50 - 60) + (65 - 70)) / 3
        }
    )


def test_cl_metrics_missing_entries() -> None:
    m = [
        [80, None, None],
        [NAN, 85, None],
        [60, None, 90],
    ]
    got = cl_metrics(m, single_task=[None, 80, 88])
    assert got == approx(
        {
            "AP": 75.0,  # (60 + 90) / 2, a[2][1] missing
            "F.Ra": 20.0,  # j0: max(80, NaN skipped) - 60; j1 skipped (final missing)
            "FWT": 3.5,  # i0 skipped (no single-task); ((85 - 80) + (90 - 88)) / 2
            "BWT": -20.0,  # j0: 60 - 80; j1 skipped
        }
    )


def test_cl_metrics_1x1() -> None:
    got = cl_metrics([[70.0]], single_task=[60.0])
    assert got == {"AP": 70.0, "F.Ra": None, "FWT": 10.0, "BWT": None}


def test_cl_metrics_partial_run() -> None:
    # 2 stages done of 4 tasks; tasks 2-3 not yet trained are ignored.
    m = [
        [80, 5, 6, 7],
        [70, 85, 9, 9],
    ]
    got = cl_metrics(m, single_task=[75, 80, 1, 1])
    assert got == approx(
        {
            "AP": 77.5,  # (70 + 85) / 2
            "F.Ra": 10.0,  # j0: 80 - 70
            "FWT": 5.0,  # ((80 - 75) + (85 - 80)) / 2
            "BWT": -10.0,  # 70 - 80
        }
    )


def test_cl_metrics_all_missing_and_bad_shape() -> None:
    assert cl_metrics([]) == {"AP": None, "F.Ra": None, "FWT": None, "BWT": None}
    got = cl_metrics([[None, None], [None, None]], single_task=[1.0, 2.0])
    assert got == {"AP": None, "F.Ra": None, "FWT": None, "BWT": None}
    with pytest.raises(PetmixError):
        cl_metrics([[1.0], [2.0]])  # more stages than tasks


# --- ROUGE-L --------------------------------------------------------------------------

ROUGE_CASES = [
    ("The cats are running", ["a cat ran", "cats running fast"]),
    ("", ["something here"]),
    ("Hello, world!", ["hello world"]),
    ("positive", ["Positive."]),
    ("the quick brown fox", ["quick fox", "the slow brown dog", "fox brown quick"]),
    ("answer: 42 (approx.)", ["42"]),
]


@pytest.mark.parametrize(("pred", "refs"), ROUGE_CASES)
def test_rouge_l_matches_rouge_score(pred: str, refs: list[str]) -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100 * max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert rouge_l(pred, refs) == pytest.approx(expected)
    assert score("rougeL", pred, refs) == pytest.approx(expected)


def test_rouge_l_values_and_cached_scorer() -> None:
    assert rouge_l("", ["anything"]) == 0.0
    assert rouge_l("Hello, world!", ["hello world"]) == pytest.approx(100.0)
    assert rouge_l("cats running", ["cat runs"]) == pytest.approx(100.0)  # stemmed
    assert metrics._scorer() is metrics._scorer()


def test_rouge_l_rejects_bad_references() -> None:
    with pytest.raises(PetmixError):
        rouge_l("x", [])
    with pytest.raises(PetmixError):
        rouge_l("x", "x")  # type: ignore[arg-type]


# --- exact match, accuracy, dispatch --------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "refs", "expected"),
    [
        ("The Cat.", ["cat"], 100.0),
        ("an  apple\tpie", ["Apple pie!"], 100.0),
        ("no", ["yes", "No"], 100.0),
        ("cats", ["cat"], 0.0),
        ("theory", ["ory"], 0.0),  # "the" only removed as a whole word
        ("", ["the"], 100.0),
        ("", ["x"], 0.0),
    ],
)
def test_exact_match(pred: str, refs: list[str], expected: float) -> None:
    assert exact_match(pred, refs) == expected
    assert score("exact_match", pred, refs) == expected


def test_accuracy_and_task_score() -> None:
    assert accuracy(["yes", "No."], ["yes", "yes"]) == 50.0
    assert accuracy(["a b", "c"], [["x", "b"], ["d"]]) == 50.0  # "a b" -> "b" matches; "c" != "d"
    assert task_score("exact_match", ["The end", "x"], [["end"], ["y"]]) == 50.0
    # mean of 100 and 0
    assert task_score("rougeL", ["hello world", ""], [["hello world"], ["z"]]) == pytest.approx(50.0)
    with pytest.raises(PetmixError):
        accuracy(["a"], [])
    with pytest.raises(PetmixError):
        task_score("exact_match", [], [])


def test_unknown_metric_raises() -> None:
    with pytest.raises(PetmixError, match="unknown metric"):
        score("bleu", "a", ["a"])
    with pytest.raises(PetmixError, match="unknown metric"):
        task_score("bleu", ["a"], [["a"]])


def test_nan_is_treated_as_missing() -> None:
    got = cl_metrics([[NAN]])
    assert got["AP"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in got.values())
