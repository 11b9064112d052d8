"""Tables a reviewer can trust: statistics over seeds, noise marks, floors, tuning on train only."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from test_train import make_tasks

from petmix.cli import _train_config, build_parser, main
from petmix.compare import Entry, run_comparison
from petmix.data.task import Example, Task
from petmix.errors import PetmixError
from petmix.floors import is_classification, majority_floor
from petmix.runs import read_json
from petmix.stats import Summary, within_noise
from petmix.tune import validation_tasks

CL = Path(__file__).parent / "fixtures" / "cl_layout"


def test_mean_and_sample_std_on_a_hand_made_case():
    s = Summary.of([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # squares of deviations 2.25+0.25+0.25+2.25 = 5, / (n-1)
    assert s.std == pytest.approx(statistics.stdev([1, 2, 3, 4]))
    assert Summary.of([40.0, None, 44.0]) == Summary(42.0, pytest.approx(math.sqrt(8)), 2)  # None: not run
    assert Summary.of([7.0]).std is None and Summary.of([]).mean is None
    assert Summary.of([50.0, 52.0, 54.0]).cell() == "52.00 ± 2.00"
    # within noise: |diff| < std_a + std_b
    a, b, c = Summary.of([50.0, 52.0, 54.0]), Summary.of([53.0, 55.0, 57.0]), Summary.of([60.0, 61.0, 62.0])
    assert within_noise(a, b) is True  # |52 - 55| = 3 < 2 + 2
    assert within_noise(a, c) is False  # |52 - 61| = 9 >= 2 + 1
    assert within_noise(a, Summary.of([60.0])) is None  # one seed: no spread, no verdict


def test_majority_floor_is_the_most_frequent_train_answer_scored_on_test():
    train = [Example(f"x{i}", [a]) for i, a in enumerate(["yes", "no", "yes", "yes", "maybe"] * 2)]
    test = [Example("t1", ["yes"]), Example("t2", ["no"]), Example("t3", ["yes"]), Example("t4", ["no"])]
    task = Task("t", "", "exact_match", train, test, "plain")
    floor = majority_floor([task])
    assert floor["per_task"]["t"]["answer"] == "yes" and floor["metrics"]["AP"] == 50.0
    assert is_classification(task)
    assert not is_classification(Task("g", "", "rougeL", [Example(f"x{i}", [f"text {i}"]) for i in range(10)], test,
                                      "plain"))


def test_compare_over_seeds_reports_mean_std_floors_and_resumes(tiny_llama_path, tmp_path):
    base = {"model": str(tiny_llama_path), "epochs": 1, "batch_size": 4, "lr": 5e-3, "max_new_tokens": 2}
    entries = [Entry.parse("seq-lora"), Entry.parse("inc-lora")]
    out = tmp_path / "cmp"
    run_comparison(entries[:1], base, make_tasks(2), out)  # a single-seed comparison of the earlier layout
    legacy = (out / "seq-lora" / "results.json").stat().st_mtime
    rows = run_comparison(entries, base, make_tasks(2), out, seeds=[0, 1], tasks_for_seed=lambda s: make_tasks(2),
                          floors=True)
    assert (out / "seq-lora" / "results.json").stat().st_mtime == legacy  # read as seed 0, not re-run
    assert (out / "seq-lora" / "seed-1" / "results.json").is_file()
    assert (out / "inc-lora" / "seed-0" / "results.json").is_file() and (out / "inc-lora" / "seed-1").is_dir()
    assert [r["label"] for r in rows] == ["floor: majority label", "floor: zero-shot", "seq-lora", "inc-lora"]
    aps = [read_json(out / "inc-lora" / f"seed-{s}" / "results.json")["metrics"]["AP"] for s in (0, 1)]
    inc = rows[3]
    assert inc["AP"] == pytest.approx(statistics.mean(aps)) and inc["seeds"] == "2"
    assert inc["stats"]["AP"].std == pytest.approx(statistics.stdev(aps))
    table = list(csv.DictReader((out / "table.csv").open()))
    assert float(table[3]["AP sd"]) == pytest.approx(statistics.stdev(aps))
    assert table[0]["method"] == "floor: majority label" and float(table[0]["AP"]) == 100.0  # one answer per task
    md = (out / "table.md").read_text()
    assert "vs best AP" in md and "pairwise" in md and "sample standard deviation" in md
    assert read_json(out / "compare.json")["seeds"] == [0, 1]
    # resuming reads every finished seed and the cached floors; a results.json with routing accuracy shows it
    floor = (out / "floors" / "zero-shot" / "results.json").stat().st_mtime
    path = out / "inc-lora" / "seed-1" / "results.json"
    res = read_json(path)
    res["routing_accuracy"] = {"final": 0.75, "per_stage": [1.0, 0.75]}
    path.write_text(json.dumps(res))
    again = run_comparison(entries, base, make_tasks(2), out, seeds=[0, 1], tasks_for_seed=lambda s: make_tasks(2),
                           floors=True)
    assert path.stat().st_mtime == path.stat().st_mtime and (out / "floors" / "zero-shot" / "results.json").stat().st_mtime == floor
    assert again[3]["routing acc"] == 0.75 and "routing acc" in (out / "table.md").read_text()
    # --no-train tabulates what has finished and trains nothing: a seed or an entry not run says so
    listed = run_comparison([*entries, Entry.parse("o-lora")], base, make_tasks(2), out, seeds=[0, 1, 2],
                            tasks_for_seed=lambda s: make_tasks(2), train=False)
    assert [r["seeds"] for r in listed[:2]] == ["2/3", "2/3"] and "seeds not yet run: 2" in listed[1]["note"]
    assert listed[2] == {"label": "o-lora", "method": "o-lora", "note": "not yet run"}
    assert not (out / "inc-lora" / "seed-2").exists() and not (out / "o-lora").exists()
    assert "not yet run" in (out / "table.md").read_text()
    # a third seed not yet run is shown as missing, not silently averaged away
    partial = run_comparison(entries[1:], base, make_tasks(2), out, seeds=[0, 1, 2],
                             tasks_for_seed=lambda s: make_tasks(2))
    assert partial[0]["seeds"] == "3"  # it ran; the folder accumulates seeds
    with pytest.raises(PetmixError, match="finished run with other settings"):  # never read as these settings
        run_comparison(entries, {**base, "lr": 1e-2}, make_tasks(2), out, seeds=[0, 1],
                       tasks_for_seed=lambda s: make_tasks(2))


def _poisoned_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for test in dst.rglob("test.json"):
        data = json.loads(test.read_text())
        for inst in data["Instances"]:
            inst["output"] = "POISON"
        test.write_text(json.dumps(data))
    (dst / "Long_Sequence" / "tinysent" / "dev.json").unlink()
    return dst


def test_tuner_never_reads_test_labels(tiny_llama_path, tmp_path):
    """The same choice and the same validation scores whatever the test labels say (and with --jobs: the
    poisoned copy's candidates train in two worker processes, the clean one's in this one)."""
    poisoned = _poisoned_copy(CL, tmp_path / "poisoned")
    files = {}
    for name, data, jobs in [("clean", CL, "1"), ("poisoned", poisoned, "2")]:
        argv = ["tune", "--methods", "lora", "--model", str(tiny_llama_path), "--data", str(data),
                "--tasks", "tinysent", "--tune-tasks", "1", "--lr-grid", "1e-4,5e-2", "--epochs", "1",
                "--batch-size", "4", "--max-new-tokens", "3", "--jobs", jobs, "--out", str(tmp_path / name)]
        assert main(argv) == 0
        files[name] = yaml.safe_load((tmp_path / name / "tuned.yaml").read_text())["methods"]["lora"]
    for name in files:  # what every candidate was scored on: validation examples carved from train
        for pred in (tmp_path / name / "lora").rglob("predictions/*.jsonl"):
            records = [json.loads(line) for line in pred.read_text().splitlines()]
            assert records and not any("POISON" in r["references"] for r in records)
    assert "[tune lora lr-0.05] petmix.train" in (tmp_path / "poisoned" / "log.txt").read_text()  # a worker's line
    assert files["clean"]["settings"] == files["poisoned"]["settings"]
    assert [c["score"] for c in files["clean"]["candidates"]] == [c["score"] for c in files["poisoned"]["candidates"]]
    assert "test never read" in files["clean"]["selected_on"]["split"] and files["clean"]["command"].startswith("petmix tune")
    # train and compare read the file: the tuned lr replaces the config's, an explicit flag still wins
    tuned = str(tmp_path / "clean" / "tuned.yaml")
    args = build_parser().parse_args(["train", "--method", "lora", "--tuned", tuned, "--out", "x"])
    assert _train_config(args, apply_tuned=True).lr == files["clean"]["settings"]["lr"]
    args = build_parser().parse_args(["train", "--method", "lora", "--tuned", tuned, "--lr", "0.5", "--out", "x"])
    assert _train_config(args, apply_tuned=True).lr == 0.5


def _tune_argv(model: Path, out: Path, jobs: int) -> list[str]:
    return ["tune", "--methods", "lora,seq-lora", "--model", str(model), "--data", str(CL), "--tasks", "tinysent",
            "--tune-tasks", "1", "--jobs", str(jobs), "--out", str(out)]


def test_tune_jobs_searches_every_method_at_once(tiny_llama_path, tmp_path, monkeypatch, capsys):
    """With --jobs, each method's search runs in its own thread and their rounds share the workers: the
    two methods' first rounds must be in flight together (a barrier both have to reach, which a
    method-after-method search never passes), and the choices are those of --jobs 1. A candidate that
    fails ends its own method's search, named; the other method's choice is still written."""
    import threading

    import petmix.parallel as parallel
    import petmix.tune as tune

    def fake_ap(cfg) -> float:
        return 100 - 60 * abs(math.log10(cfg.lr / 1e-3)) - (cfg.method == "seq-lora")  # steps > 25 AP apart

    class FakeTrainer:  # --jobs 1: in this process
        def __init__(self, cfg, tasks, run):
            self.cfg = cfg

        def run(self):
            return {"metrics": {"AP": fake_ap(self.cfg)}}

    meet, first_rounds, fail = threading.Barrier(2, timeout=20), set(), {}

    class FakePool:  # --jobs 2: "workers" that write each run's results where the real ones would
        def __init__(self, jobs):
            assert jobs == 2

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def train(self, runs):
            method = runs[0].cfg.method
            if method not in first_rounds:
                first_rounds.add(method)
                meet.wait()  # BrokenBarrierError unless the other method's first round is waiting too
            out = []
            for run in runs:
                if fail.get(method) == run.cfg.lr:
                    out.append((None, "RuntimeError: boom"))
                    continue
                results = {"matrix": [[0.0]], "metrics": {"AP": fake_ap(run.cfg)}}
                run.where.mkdir(parents=True, exist_ok=True)
                (run.where / "results.json").write_text(json.dumps(results))
                out.append((results, None))
            return out

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    monkeypatch.setattr(parallel, "WorkerPool", FakePool)
    chosen = {}
    for jobs in (1, 2):
        assert main(_tune_argv(tiny_llama_path, tmp_path / f"jobs{jobs}", jobs)) == 0
        data = yaml.safe_load((tmp_path / f"jobs{jobs}" / "tuned.yaml").read_text())["methods"]
        chosen[jobs] = {m: (e["settings"], [(c["settings"], c["score"]) for c in e["candidates"]])
                        for m, e in data.items()}
    assert first_rounds == {"lora", "seq-lora"} and chosen[2] == chosen[1]
    assert chosen[1]["lora"][0] == {"lr": 1e-3}
    capsys.readouterr()
    first_rounds.clear()
    meet.reset()
    fail["seq-lora"] = 3e-3
    assert main(_tune_argv(tiny_llama_path, tmp_path / "failed", 2)) == 2
    assert "tune seq-lora lr-0.003: training failed: RuntimeError: boom" in capsys.readouterr().err
    assert list(yaml.safe_load((tmp_path / "failed" / "tuned.yaml").read_text())["methods"]) == ["lora"]


def test_a_prompt_length_given_to_tune_is_written_with_the_choice(tiny_llama_path, tmp_path, monkeypatch):
    """SAPT-Prompt searches its rate and kl ratio; a --prompt-length given to the tune is part of what was
    scored, so the tuned file carries it and `train --tuned` runs that length, not the method's own. A
    method that searches the length, or has no prompt, is written with its own search only."""
    import petmix.tune as tune

    class FakeTrainer:
        def __init__(self, cfg, tasks, run):
            assert cfg.prompt_length == 7  # every candidate trained at the given length
            self.cfg = cfg

        def run(self):
            return {"metrics": {"AP": 100 - 60 * abs(math.log10(self.cfg.lr / 1e-2))}}  # > 25 AP apart

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    out = tmp_path / "tune"
    argv = ["tune", "--methods", "sapt-prompt,lora", "--model", str(tiny_llama_path), "--data", str(CL),
            "--tasks", "tinysent", "--tune-tasks", "1", "--lr-grid", "3e-3,1e-2", "--option-grid", "0.5",
            "--prompt-length", "7", "--out", str(out)]
    assert main(argv) == 0
    data = yaml.safe_load((out / "tuned.yaml").read_text())["methods"]
    assert data["sapt-prompt"]["settings"] == {"lr": 1e-2, "kl_ratio": 0.5, "prompt_length": 7}
    assert "prompt_length" not in data["lora"]["settings"]  # no prompt: nothing held
    args = build_parser().parse_args(["train", "--method", "sapt-prompt", "--tuned", str(out / "tuned.yaml"), "--out", "x"])
    assert _train_config(args, apply_tuned=True).prompt_length == 7
    assert "prompt_length=7" in tune.tuned_table(out / "tuned.yaml")


class _Untouchable(list):
    def _no(self, *a, **k):
        raise AssertionError("the test split was read")

    __iter__ = __getitem__ = __len__ = __contains__ = _no


def test_validation_split_comes_from_train_only():
    tasks = make_tasks(2, n_train=20)
    for t in tasks:
        t.test = _Untouchable(t.test)
    val = validation_tasks(tasks, 0.25, 0, None, 10)
    for orig, v in zip(tasks, val):
        assert len(v.test) == 5 and len(v.train) == 10
        assert {e.input for e in v.test} <= {e.input for e in orig.train}
        assert not {e.input for e in v.test} & {e.input for e in v.train}


def test_tables_written_while_training_count_runs_finished_earlier(tiny_llama_path, tmp_path, monkeypatch):
    """A long comparison rewrites its tables after every run; seeds finished in an earlier invocation
    appear in them from the first rewrite on, not only once this invocation reaches them."""
    import petmix.compare as compare_module

    base = {"model": str(tiny_llama_path), "epochs": 1, "batch_size": 4, "lr": 5e-3, "max_new_tokens": 2}
    entries = [Entry.parse("seq-lora")]
    out = tmp_path / "cmp"
    run_comparison(entries, base, make_tasks(2), out, seeds=[1], tasks_for_seed=lambda s: make_tasks(2))
    written: list[list[dict]] = []
    real = compare_module.write_tables
    monkeypatch.setattr(compare_module, "write_tables", lambda rows, *a: (written.append(rows), real(rows, *a)))
    run_comparison(entries, base, make_tasks(2), out, seeds=[0, 1], tasks_for_seed=lambda s: make_tasks(2))
    assert written[0][0]["seeds"] == "2"  # after seed 0 trained: seed 1's earlier run already counted


def test_an_entry_still_to_run_is_pending_not_failed():
    from petmix.compare import csv_table, entry_row, markdown_table

    pending = entry_row("seq-lora", {}, {}, [0], True)
    failed = entry_row("o-lora", {}, {0: "RuntimeError: boom"}, [0], True)
    table = markdown_table([pending, failed], ["method", "AP", "note"])
    assert "| seq-lora | - | not yet run |" in table and "FAILED" not in table.splitlines()[2]
    assert "| o-lora | - | FAILED: seed 0: RuntimeError: boom |" in table
    assert "not yet run" in csv_table([pending], ["method", "AP", "note"])


def _tune_beside_a_mismatched_candidate(model: Path, tmp_path: Path, kept: str, lr: float) -> tuple[int, Path]:
    """`petmix tune` (lr grid 1e-4, 5e-2) into a folder already holding a finished candidate ``kept``
    whose recorded settings differ (epochs 7 against 1)."""
    run = tmp_path / "tune" / "lora" / kept
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"matrix": [[50.0]], "metrics": {"AP": 50.0}}))
    (run / "config.json").write_text(json.dumps({"method": "lora", "lr": lr, "epochs": 7, "tasks": ["tinysent"]}))
    argv = ["tune", "--methods", "lora", "--model", str(model), "--data", str(CL), "--tasks", "tinysent",
            "--tune-tasks", "1", "--lr-grid", "1e-4,5e-2", "--epochs", "1", "--batch-size", "4",
            "--max-new-tokens", "3", "--out", str(tmp_path / "tune")]
    return main(argv), run


def test_tuner_refuses_a_finished_candidate_with_other_settings(tiny_llama_path, tmp_path, capsys):
    """A candidate read back (from an earlier run or an archive) must have been trained with these
    settings, or its score would be passed off as theirs."""
    rc, run = _tune_beside_a_mismatched_candidate(tiny_llama_path, tmp_path, "lr-0.0001", 1e-4)
    assert rc == 2
    err = capsys.readouterr().err
    assert str(run) in err and "epochs" in err
    assert not (tmp_path / "tune" / "lora" / "lr-0.05").exists()  # stopped before training anything


def test_tuner_checks_every_kept_candidate_before_training(tiny_llama_path, tmp_path, capsys):
    """A mismatched candidate later in the grid (here the second learning rate) is refused before the
    first candidate trains, not after."""
    rc, run = _tune_beside_a_mismatched_candidate(tiny_llama_path, tmp_path, "lr-0.05", 5e-2)
    assert rc == 2
    err = capsys.readouterr().err
    assert str(run) in err and "epochs" in err
    assert not (tmp_path / "tune" / "lora" / "lr-0.0001").exists()  # nothing trained


def test_an_unset_lr_is_the_methods_own_and_a_set_one_wins(tiny_llama_path, tmp_path, monkeypatch):
    from petmix.compare import entry_values
    from petmix.config import TrainConfig

    assert TrainConfig(method="prompt-tuning").lr == 1e-1  # raw soft prompt
    assert TrainConfig(method="attempt", sources=["x"]).lr == 3e-2  # G trains with its prompt
    assert TrainConfig(method="attempt-m", sources=["x"]).lr == 3e-2
    assert TrainConfig(method="sapt-lora").lr == 3e-3  # its own tuned pick (Method.tuned_lr) ...
    assert TrainConfig(method="seq-lora").lr == 1e-3  # ... over its kind's
    assert TrainConfig(method="p-tuning").lr == 1e-3  # a prompt behind an encoder
    assert TrainConfig(method="p-tuning-v2").lr == 3e-3  # a raw prompt at every layer
    assert TrainConfig(method="prompt-tuning", prompt_depth="deep").lr == 3e-3
    assert TrainConfig(method="prompt-tuning", prompt_encoder="mlp").lr == 1e-3
    assert TrainConfig(method="full-ft").lr == 1e-5
    assert TrainConfig(method="sapt-prompt").lr == 1e-1
    assert TrainConfig(method="seq-prompt").lr == 1e-2
    assert TrainConfig(method="prompt-tuning", lr=0.5).lr == 0.5
    from petmix.tune import LR_GRIDS, lr_grid  # tune searches the grid of the same kind around each default
    for method, kind in [("prompt-tuning", "prompt"), ("attempt", "prompt-attention"), ("p-tuning-v2", "prompt-deep"), ("p-tuning", "prompt-encoder"),
                         ("o-lora", "lora"),
                         ("seq-ft", "full")]:
        assert lr_grid(method, TrainConfig(method=method)) == LR_GRIDS[kind]

    class Stop(Exception):
        pass

    seen: dict[str, float] = {}

    def fake_comparison(entries, base, *args, **kwargs):
        for e in entries:
            seen[e.label] = TrainConfig.from_dict(entry_values(e, base, {}), check_files=False).lr
        raise Stop

    monkeypatch.setattr("petmix.compare.run_comparison", fake_comparison)
    argv = ["compare", "--methods", "prompt-tuning,lora,full-ft,pt-slow=prompt-tuning:lr=1e-3",
            "--tasks", str(Path(__file__).parent / "fixtures" / "generic_folder"), "--model", str(tiny_llama_path)]
    with pytest.raises(Stop):  # no lr set: each entry trains at its own method's rate
        main([*argv, "--out", str(tmp_path / "a")])
    assert seen == {"prompt-tuning": 1e-1, "lora": 1e-3, "full-ft": 1e-5, "pt-slow": 1e-3}
    with pytest.raises(Stop):  # --lr sets every entry's, and an entry's own value still wins
        main([*argv, "--lr", "2e-3", "--out", str(tmp_path / "b")])
    assert seen == {"prompt-tuning": 2e-3, "lora": 2e-3, "full-ft": 2e-3, "pt-slow": 1e-3}
    (tmp_path / "null.yaml").write_text("lr: null\n")  # null is no rate: each entry's own again
    with pytest.raises(Stop):
        main([*argv, "--config", str(tmp_path / "null.yaml"), "--out", str(tmp_path / "c")])
    assert seen == {"prompt-tuning": 1e-1, "lora": 1e-3, "full-ft": 1e-5, "pt-slow": 1e-3}


@pytest.mark.parametrize(("peak", "tried", "chosen"), [
    (0.3, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], 3e-2),   # best at the top each time: two steps up, then the cap
    (3e-3, [3e-4, 1e-3, 3e-3, 1e-2], 3e-3),         # one step up finds the peak's upper neighbour
    (1e-3, [3e-4, 1e-3, 3e-3], 1e-3),               # inside the grid: nothing added
    (1e-4, [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], 1e-4),   # at the bottom: steps down until it has two neighbours
])
def test_tune_steps_past_a_winning_end_of_its_grid(tmp_path, monkeypatch, peak, tried, chosen):
    """A rate at the end of the grid is no choice: the grid grows past it, at most EDGE_STEPS times."""
    import petmix.tune as tune

    trained: list[float] = []

    class FakeTrainer:  # validation AP peaks at ``peak`` (log scale); nothing trains
        def __init__(self, cfg, tasks, run):
            self.lr = cfg.lr

        def run(self):
            trained.append(self.lr)
            return {"metrics": {"AP": 100 - abs(math.log10(self.lr / peak))}}

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    result = tune.tune_method("lora", {}, make_tasks(2, n_train=8, n_test=200), tmp_path)
    assert result["settings"] == {"lr": chosen}
    assert sorted(trained) == pytest.approx(sorted(tried)) and len(set(trained)) == len(trained)  # each once
    assert result["grid"]["lr"] == pytest.approx(tried)
    trained.clear()  # a flat grid (every candidate 0: nothing learned) has no winning end to step past
    monkeypatch.setattr(FakeTrainer, "run", lambda self: trained.append(self.lr) or {"metrics": {"AP": 0.0}})
    flat = tune.tune_method("lora", {}, make_tasks(2, n_train=8, n_test=200), tmp_path / "flat")
    assert sorted(trained) == pytest.approx([3e-4, 1e-3, 3e-3]) and flat["settings"] == {"lr": 3e-4}
    trained.clear()  # a grid given (--lr-grid) is searched as given, even where its end wins
    given = tune.tune_method("lora", {}, make_tasks(2, n_train=8, n_test=200), tmp_path / "given", lrs=[1e-2, 3e-2])
    assert given["grid"]["lr"] == [1e-2, 3e-2] and sorted(trained) == [1e-2, 3e-2]


def test_converge_moves_the_option_past_its_grid_and_the_rate_after_it(tmp_path, monkeypatch):
    """LwF's case: its alpha wins at the bottom of its grid (0.01), and a smaller alpha wants another rate.
    One pass stops at (1e-3, 0.01); --converge steps alpha down past the grid while it wins, then moves
    the rate, and ends when a whole pass moves neither; the record says how far it moved."""
    import petmix.tune as tune

    def ap(lr: float, alpha: float) -> float:  # alpha peaks at 1e-4; the best rate is 3e-3 below alpha 0.005
        best_lr = 3e-3 if alpha < 0.005 else 1e-3
        return 100 - 10 * abs(math.log10(lr / best_lr)) - 10 * abs(math.log10(alpha / 1e-4))

    trained: list[tuple[float, float]] = []

    class FakeTrainer:
        def __init__(self, cfg, tasks, run):
            self.cfg = cfg

        def run(self):
            trained.append((self.cfg.lr, self.cfg.lwf_alpha))
            return {"metrics": {"AP": ap(self.cfg.lr, self.cfg.lwf_alpha)}}

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    tasks = make_tasks(2, n_train=8, n_test=200)
    one = tune.tune_method("lwf", {}, tasks, tmp_path / "one")
    assert one["settings"] == {"lr": 1e-3, "lwf_alpha": 0.01} and "notes" not in one
    trained.clear()
    result = tune.tune_method("lwf", {}, tasks, tmp_path / "converge", converge=True)
    assert result["settings"] == {"lr": 3e-3, "lwf_alpha": pytest.approx(1e-4)}
    assert len(set(trained)) == len(trained)  # each candidate trained once
    assert result["grid"]["lwf_alpha"] == pytest.approx([1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0])
    assert result["grid"]["lr"] == pytest.approx([3e-4, 1e-3, 3e-3, 1e-2])
    assert result["notes"] == ["converge: lr 0.003, lwf_alpha 0.0001 (100.00) over the first pass's lr 0.001, "
                               "lwf_alpha 0.01 (80.00); the last of 2 further passes moved nothing"]
    assert result["score"] == pytest.approx(100.0)
    trained.clear()  # where the first pass chose the best nearby, converge trains only the step past the end
    peak = lambda lr, alpha: 100 - 10 * abs(math.log10(lr / 1e-3)) - 10 * abs(math.log10(alpha / 0.01))  # noqa: E731
    monkeypatch.setattr(FakeTrainer, "run", lambda self: trained.append(1) or {"metrics": {"AP": peak(self.cfg.lr, self.cfg.lwf_alpha)}})
    flat = tune.tune_method("lwf", {}, tasks, tmp_path / "interior", converge=True)
    assert flat["settings"] == {"lr": 1e-3, "lwf_alpha": 0.01} and len(trained) == 3 + 2 + 1  # rates, alphas, 0.001
    assert flat["notes"] == ["converge: the first pass's lr 0.001, lwf_alpha 0.01 (100.00) stands; "
                             "1 further pass moved nothing"]


@pytest.mark.parametrize(("values", "best", "step"), [
    ([0.01, 0.1, 1.0], 0.01, (0.1, 0.001)),        # LwF's alpha
    ([0.1, 0.5, 2.5], 0.1, (0.5, 0.02)),           # O-LoRA's lambda1: its own ratio, 5
    ([500.0, 5000.0, 50000.0], 50000.0, (5000.0, 500000.0)),
    ([5, 10, 20], 20, (10, 40)),                   # prompt length: whole numbers
    ([5, 10, 20], 5, (10, 2)),
    ([1, 2], 1, None),                             # nothing below 1 token
    ([0.01, 0.1, 1.0], 0.1, None),                 # inside
])
def test_an_option_steps_past_an_end_on_its_own_ratio(values, best, step):
    from petmix.tune import option_past_edge

    got = option_past_edge(values, best)
    assert got == (None if step is None else pytest.approx(step))
    assert step is None or type(got[1]) is type(values[0])


@pytest.mark.parametrize(("n_val", "chosen"), [(50, 1e-3), (200, 3e-3)])
def test_scores_less_than_one_validation_answer_apart_tie_and_the_smaller_rate_wins(tmp_path, monkeypatch, n_val, chosen):
    """SAPT-Prompt's case: 55.20 at one rate, 55.22 at the next. On two tasks of 50 validation answers one
    answer moves the AP by up to 1.00 (100 / 2 / 50), so 0.7 apart is no evidence: the smaller rate wins,
    and tuned.yaml says why. With 200 answers per task (0.25 AP each) 0.7 apart decides."""
    import petmix.tune as tune

    ap = {3e-4: 40.0, 1e-3: 55.2, 3e-3: 55.9, 1e-2: 30.0}

    class FakeTrainer:
        def __init__(self, cfg, tasks, run):
            self.lr = cfg.lr

        def run(self):
            return {"metrics": {"AP": ap[self.lr]}}

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    tasks = make_tasks(2, n_train=8, n_test=n_val)
    assert tune.answer_resolution(tasks) == pytest.approx(100 / 2 / n_val)
    result = tune.tune_method("lora", {}, tasks, tmp_path)
    assert result["settings"] == {"lr": chosen}
    assert result["resolution"] == pytest.approx(100 / 2 / n_val)
    if n_val == 50:
        assert result["notes"] == ["lr: 0.001 (55.20) chosen over 0.003 (55.90): less than one validation answer apart "
                                   "(1.00 AP) is a tie, and a tie goes to the first in grid order"]
    else:
        assert "notes" not in result


def test_option_grid_values_take_the_options_type(tmp_path, monkeypatch):
    """`--option-grid 5,20` reaches tune as floats; prompt_length needs whole numbers (5.0 once failed
    the candidate's config check), a float option keeps its values, and 5.5 is refused by name."""
    import petmix.tune as tune

    tried = []

    class FakeTrainer:
        def __init__(self, cfg, tasks, run):
            tried.append(cfg.prompt_length)

        def run(self):
            return {"metrics": {"AP": 50.0}}

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    tune.tune_method("seq-prompt", {}, make_tasks(2, n_train=8, n_test=4), tmp_path, lrs=[1e-2], options=[5.0, 20.0])
    assert set(tried) == {5, 20} and all(isinstance(v, int) for v in tried)  # 5 is also seq-prompt's own default
    assert tune.typed_options(("kl_ratio", [0.1, 0.5]), [2.0]) == [2.0]
    with pytest.raises(PetmixError, match="prompt_length takes whole numbers, not 5.5"):
        tune.typed_options(("prompt_length", [5, 10, 20]), [5.5])


def test_tune_refuses_a_bad_option_value_before_writing(tiny_llama_path, tmp_path, capsys):
    argv = ["tune", "--methods", "seq-prompt", "--model", str(tiny_llama_path), "--data", str(CL), "--tasks",
            "tinysent", "--tune-tasks", "1", "--option-grid", "5.5", "--out", str(tmp_path / "tune")]
    assert main(argv) == 2
    assert "--option-grid: prompt_length takes whole numbers" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()  # not even a log
    assert main([*argv[:-4], "--jobs", "0", *argv[-2:]]) == 2
    assert "--jobs: at least 1" in capsys.readouterr().err and not (tmp_path / "tune").exists()


@pytest.mark.parametrize(("effect", "chosen"), [(0.0, 0.5), (1.0, 2.0), (-1.0, 0.1)])
def test_tuned_option_must_beat_the_default_and_an_inert_one_is_named(tmp_path, monkeypatch, effect, chosen):
    """Option values tie with the default (SAPT's kl_ratio on two tasks, where the router is one-hot):
    the default stays, and the record says the option had no measurable effect."""
    import petmix.tune as tune

    class FakeTrainer:  # AP peaks at lr 1e-3; kl_ratio moves it by ``effect`` per unit of log10
        def __init__(self, cfg, tasks, run):
            self.cfg = cfg

        def run(self):
            ap = 50 - abs(math.log10(self.cfg.lr / 1e-3)) + effect * math.log10(self.cfg.kl_ratio / 0.5)
            return {"metrics": {"AP": ap}}

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    result = tune.tune_method("sapt-lora", {}, make_tasks(2, n_train=8, n_test=200), tmp_path)
    assert result["settings"] == {"lr": 1e-3, "kl_ratio": chosen}
    assert ("notes" in result) == (effect == 0.0)
    if effect == 0.0:
        assert "kl_ratio" in result["notes"][0] and "default 0.5 is kept" in result["notes"][0]
    tune.write_tuned(tmp_path / "tuned.yaml", "sapt-lora", result, {})
    assert ("- sapt-lora: kl_ratio: every value scored the same" in tune.tuned_table(tmp_path / "tuned.yaml")) == (
        effect == 0.0)  # the table petmix tune prints says it too
    one = tune.tune_method("sapt-lora", {}, make_tasks(2, n_train=8, n_test=200), tmp_path / "one", options=[0.5])
    assert "notes" not in one  # one value tried is no evidence either way


@pytest.mark.parametrize(("reflection", "searched"), [([None, 0.0, 0.0], False), ([None, 0.0, 0.2], True),
                                                     ([None, None, None], True)])
def test_an_option_whose_loss_term_stayed_zero_is_not_searched(tmp_path, monkeypatch, reflection, searched):
    """kl_ratio multiplies SAPT's reflection loss: where that loss was ~0 in every stage of the chosen run,
    every kl_ratio trains the same run, so tune does not train the others and says why."""
    import petmix.tune as tune
    from petmix.runs import write_json

    trained: list[dict] = []

    class FakeTrainer:
        def __init__(self, cfg, tasks, run):
            self.cfg, self.run_dir = cfg, run

        def run(self):
            trained.append({"lr": self.cfg.lr, "kl_ratio": self.cfg.kl_ratio})
            write_json(self.run_dir / "stages.json", [{"mean_reflection_loss": v} for v in reflection])
            return {"metrics": {"AP": 50 - abs(math.log10(self.cfg.lr / 1e-3))}}

    monkeypatch.setattr(tune, "Trainer", FakeTrainer)
    result = tune.tune_method("sapt-lora", {}, make_tasks(3, n_train=8, n_test=200), tmp_path)
    assert result["settings"] == {"lr": 1e-3, "kl_ratio": 0.5}
    assert any(t["kl_ratio"] != 0.5 for t in trained) == searched
    assert any("not searched" in n for n in result.get("notes", [])) == (not searched)


def test_docs_tuned_lists_every_method_under_its_kind_and_default():
    """docs/tuned.md's table of default learning rates says what the code does, for every method."""
    from petmix.methods import METHODS
    from petmix.methods.base import DEFAULT_LRS

    rows = [line.split("|")[1:-1] for line in (Path(__file__).parents[1] / "docs" / "tuned.md").read_text().splitlines()
            if line.startswith("| `")]
    listed: dict[str, tuple[str, float]] = {}
    for kind_cell, methods_cell, default_cell, *_ in rows:
        kind = kind_cell.split("`")[1]
        assert float(default_cell) == DEFAULT_LRS[kind]
        for cell in methods_cell.split(","):  # "name", or "name (own: 3e-3)" for a method's own tuned pick
            name, _, own = cell.strip().partition(" (own: ")
            listed[name] = (kind, float(own.rstrip(")")) if own else float(default_cell))
    assert listed == {name: (m.lr_kind(), m.default_lr()) for name, m in METHODS.items()}


def _own_rates(text: str, names: set[str]) -> dict[str, float]:
    """The methods a prose list gives their own rate, e.g. "1e-3 LoRA (3e-3 sapt-lora, per-task-lora; 3e-4
    lwf)": each method name takes the nearest rate before it inside the parentheses after a kind's rate."""
    found: dict[str, float] = {}
    for group in re.findall(r"\(([^()]*)\)", text):
        rate = None
        for token in re.findall(r"[\w.-]+", group):
            if re.fullmatch(r"\d(\.\d+)?e-\d+", token):
                rate = float(token)
            elif token in names and rate is not None:
                found[token] = rate
    return found


def test_lr_help_and_readme_name_every_methods_own_rate():
    """The `lr` flag's help and the README's training bullet list the methods whose default rate is their
    own pick (`Method.tuned_lr`), written by hand: this keeps them equal to the registry."""
    from petmix.config import TrainConfig
    from petmix.methods import METHODS

    own = {name: m.tuned_lr for name, m in METHODS.items() if m.tuned_lr is not None}
    help_text = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == "lr")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    bullet = readme[readme.index("`--lr` (constant"):][:600]
    assert _own_rates(help_text, set(METHODS)) == own
    assert _own_rates(bullet, set(METHODS)) == own


# Where a method's default is not the archived pick, and why (docs/tuned.md says the same).
NOT_DEFAULTS = {
    ("p-tuning", "lr"): "every candidate scored 0 (the residual variant is another setting): no evidence",
    ("p-tuning", "prompt_length"): "likewise",
    ("prompt-tuning", "prompt_length"): "prompt tuning trains the source prompts, whose length the ATTEMPT methods share",
    ("inc-lora", "lr"): "tuned on all five SuperNI tasks (superni5/tune-inc5) it takes 1e-3; two tasks cannot see its forgetting",
}


# The archived tunings that set petmix's defaults (docs/tuned.md), and the others, each with what it is.
DEFAULT_TUNINGS = ["superni5/tune", "superni5/tune-inc5", "attempt/k32/tune", "attempt/k32/tune-residual"]
OTHER_TUNINGS = {
    "long4-avail-order1/tune": "cl_long.sh's own picks for its stream, read with --tuned: a stream may pick "
                               "another value than the default",
    "superni5/tune-converge": "evidence for docs/tuned.md: LwF searched with --converge (its alpha goes to "
                              "0.001, where it scores what seq-LoRA does); the tables ran at the one-pass pick",
    "long4-avail-order1/tune-sapt-prompt-len20": "evidence for docs/results.md: SAPT-Prompt at 20 tokens on "
                                                 "Long's validation split (its search is rate and kl ratio)",
    "long4-avail-order1/tune-sapt-prompt-len40": "the same at 40 tokens",
}


def test_each_methods_defaults_are_its_archived_tuning_picks():
    """Issue 15: a method's default is what `petmix tune` picks on the default model. Every choice of the
    archived tunings that set the defaults is the method's default lr, prompt length or option, except
    where NOT_DEFAULTS says why not; every other archived tuning is named, with what it is for."""
    import yaml

    from petmix.config import TrainConfig
    from petmix.methods import get_method

    root = Path(__file__).parents[1] / "benchmarks" / "results" / "runs"
    archived = {str(p.parent.relative_to(root)) for p in root.glob("**/tuned.yaml")}
    assert archived == {*DEFAULT_TUNINGS, *OTHER_TUNINGS}
    checked = 0
    for path in [root / t / "tuned.yaml" for t in DEFAULT_TUNINGS]:
        for name, result in yaml.safe_load(path.read_text())["methods"].items():
            cfg = TrainConfig(method=name)  # nothing set: every value is the method's default
            m = get_method(name)
            for key, value in result["settings"].items():
                if (name, key) in NOT_DEFAULTS:
                    continue
                default = getattr(cfg, key)
                assert default == pytest.approx(value), f"{path}: {name}'s {key} default {default}, tune chose {value}"
                checked += 1
            assert cfg.prompt_length == m.default_prompt_length()
    assert checked > 20


def test_prompt_length_defaults_to_the_methods_own_and_compare_leaves_it_to_each():
    from petmix.config import TrainConfig

    assert TrainConfig(method="l2p").prompt_length == 20
    assert TrainConfig(method="seq-prompt").prompt_length == 5
    assert TrainConfig(method="sapt-prompt").prompt_length == 10
    assert TrainConfig(method="l2p", prompt_length=7).prompt_length == 7
    assert "prompt_length" not in TrainConfig(method="sapt-lora").shared_settings()  # each entry its own
    assert TrainConfig(method="sapt-lora", prompt_length=7).shared_settings()["prompt_length"] == 7
    help_text = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == "prompt_length")
    from petmix.methods import METHODS

    own = {name: m.tuned_prompt_length for name, m in METHODS.items() if m.tuned_prompt_length is not None}
    listed = {}
    for length, names in re.findall(r"(\d+) ([\w-]+(?: and [\w-]+)*)", help_text.split("(", 1)[1]):
        listed.update(dict.fromkeys(names.split(" and "), int(length)))
    assert listed == own
