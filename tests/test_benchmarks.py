"""The benchmark scripts still run against the library as it is now (on the tiny model, a few steps).

They import petmix's internals (Mixture, pools, the trainer's batch order), so a refactor that changes
those can break a script nobody runs until hours of benchmark time are lost. No time is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_vs_peft_step_and_pool_size(tiny_llama_path, tmp_path):
    out = tmp_path / "vs_peft.json"
    proc = _run([str(ROOT / "benchmarks/vs_peft.py"), "--model", str(tiny_llama_path), "--parts", "a,c",
                 "--sets", "fixed", "--fixed", "2x24", "--reps", "1", "--precisions", "fp32", "--plain",
                 "--blocks", "1,3", "--out", str(out)], tmp_path)
    assert "ratio to PEFT LoRA, 1 adapter" in proc.stdout
    results = json.loads(out.read_text())["parts a,c"]["results"]
    step = next(v for k, v in results.items() if k.startswith("(a) training step"))
    assert set(step) == {"PEFT LoRA, 1 adapter", "petmix sapt-lora, 15 blocks", "petmix sapt-lora, 15 blocks (plain)"}
    pool = next(v for k, v in results.items() if k.startswith("(c)"))
    assert set(pool) == {"1 blocks", "3 blocks"} and all(len(t) == 1 and t[0] > 0 for t in pool.values())


def test_step_time(tiny_llama_path, tmp_path):
    out = tmp_path / "step_time.json"
    _run([str(ROOT / "benchmarks/step_time.py"), "--model", str(tiny_llama_path), "--blocks", "1,2",
          "--batch-size", "2", "--seq-len", "16", "--reps", "1", "--out", str(out)], tmp_path)
    assert out.is_file()


def test_vs_arrow(tiny_llama_path, tmp_path):
    out = tmp_path / "arrow"
    proc = _run([str(ROOT / "benchmarks/vs_arrow.py"), "--model", str(tiny_llama_path),
                 "--data", str(ROOT / "tests/fixtures/cl_layout"),
                 "--set", "tasks=[task001_tiny_colour_qa, task002_tiny_summary]", "--max-train", "8",
                 "--max-test", "3", "--epochs", "1", "--set", "batch_size=4", "--import-examples", "4",
                 "--top-k", "1", "--out", str(out)], tmp_path)
    for row in ("petmix router (imported blocks)", "oracle (own adapter)", "uniform mixture (1/n)", "PEFT Arrow top_k=1"):
        assert f"| {row} |" in proc.stdout


def test_archive_lets_a_fresh_folder_read_finished_runs_instead_of_training(tiny_llama_path, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import archive
    from test_train import make_tasks

    import petmix.compare as compare

    base = {"model": str(tiny_llama_path), "epochs": 1, "batch_size": 4, "lr": 5e-3, "max_new_tokens": 2}
    entries = [compare.Entry.parse("per-task-lora"), compare.Entry.parse("seq-lora")]
    tasks = make_tasks(2)
    first = compare.run_comparison(entries, base, tasks, tmp_path / "a", seeds=[0], floors=True)
    saved = archive.save(tmp_path / "a", tmp_path / "archive")
    assert not any(p.suffix != ".json" for p in saved)  # no weights, no predictions
    assert {p.name for p in saved} >= {"results.json", "config.json", "stages.json", "majority-seed-0.json", "compare.json"}
    assert archive.restore(tmp_path / "archive", tmp_path / "b")

    def refuse(*args, **kwargs):
        raise AssertionError("a restored finished run was trained again")

    monkeypatch.setattr(compare, "Trainer", refuse)
    monkeypatch.setattr("petmix.backbone.load_backbone", refuse)
    again = compare.run_comparison(entries, base, tasks, tmp_path / "b", seeds=[0], floors=True)
    assert [(r["label"], r["AP"]) for r in again] == [(r["label"], r["AP"]) for r in first]
    assert archive.restore(tmp_path / "archive", tmp_path / "b") == []  # never overwrites
    kept = {p: p.read_bytes() for p in (tmp_path / "archive").rglob("results.json")}
    assert any(b'"sha256:' in v for v in kept.values())  # definitions kept as digests
    archive.save(tmp_path / "b", tmp_path / "archive")  # a restored run saved again stays as it was kept
    assert {p: p.read_bytes() for p in (tmp_path / "archive").rglob("results.json")} == kept


def test_the_archive_folder_is_not_git_ignored():
    """The archive only helps a fresh clone if it is committed: `runs/` is ignored, the archive under
    benchmarks/results/runs/ must not be (it was, for a whole session, unnoticed)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probe = "benchmarks/results/runs/some-table/some-entry/seed-0/results.json"
    proc = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert proc.returncode == 1, f"{probe} is git-ignored"
    proc = subprocess.run(["git", "check-ignore", "-q", "runs/bench/x/results.json"], cwd=ROOT)
    assert proc.returncode == 0, "run folders under runs/ should stay ignored"


def test_a_folder_put_back_from_the_archive_is_accepted_as_out(tmp_path):
    """A comparison run with --no-floors leaves only its entries' run folders (and compare.json, which the
    archive now keeps too); either way `--out` must accept the restored folder, and still refuse a
    foreign one."""
    from petmix.errors import PetmixError
    from petmix.runs import check_out_dir

    restored = tmp_path / "restored"
    (restored / "sapt-lora" / "seed-0").mkdir(parents=True)
    (restored / "sapt-lora" / "seed-0" / "config.json").write_text("{}")
    assert check_out_dir(str(restored)) == restored
    single = tmp_path / "single"
    (single / "sapt-lora").mkdir(parents=True)
    (single / "sapt-lora" / "config.json").write_text("{}")
    assert check_out_dir(str(single)) == single
    foreign = tmp_path / "foreign"
    (foreign / "photos").mkdir(parents=True)
    (foreign / "photos" / "config.json.bak").write_text("x")
    with pytest.raises(PetmixError, match="not a petmix run"):
        check_out_dir(str(foreign))


def test_archive_keeps_a_tuning_folder_choices_and_candidates(tmp_path):
    """`petmix tune`'s folder: finished candidates (runs) and tuned.yaml survive a fresh clone; an
    unfinished candidate is not kept."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import archive

    tune = tmp_path / "tune"
    for name, rows in (("lr-0.001", 2), ("lr-0.003", 1)):
        run = tune / "lora" / name
        run.mkdir(parents=True)
        results = {"tasks": ["a", "b"], "stage_names": ["a", "b"], "matrix": [[1.0]] * rows, "metrics": {"AP": 1.0}}
        (run / "results.json").write_text(json.dumps(results))
        (run / "config.json").write_text(json.dumps({"lr": float(name[3:])}))
    (tune / "tuned.yaml").write_text("methods:\n  lora:\n    settings: {lr: 0.001}\n")
    saved = archive.save(tune, tmp_path / "archive")
    assert {str(p.relative_to(tmp_path / "archive")) for p in saved} == {
        "lora/lr-0.001/results.json", "lora/lr-0.001/config.json", "tuned.yaml"}
    archive.restore(tmp_path / "archive", tmp_path / "fresh")
    assert (tmp_path / "fresh" / "tuned.yaml").read_text() == (tune / "tuned.yaml").read_text()
    assert (tmp_path / "fresh" / "lora" / "lr-0.001" / "results.json").is_file()
    assert not (tmp_path / "fresh" / "lora" / "lr-0.003").exists()
    # another tuning (another process or clone) of other methods into the same archive keeps both choices
    other = tmp_path / "other"
    other.mkdir()
    (other / "tuned.yaml").write_text("# header\nmethods:\n  bitfit:\n    settings: {lr: 0.003}\n"
                                      "  lora:\n    settings: {lr: 0.0003}\n")
    archive.save(other, tmp_path / "archive")
    kept = yaml.safe_load((tmp_path / "archive" / "tuned.yaml").read_text())["methods"]
    assert kept == {"lora": {"settings": {"lr": 0.0003}}, "bitfit": {"settings": {"lr": 0.003}}}  # no stamps: new
    assert (tmp_path / "archive" / "tuned.yaml").read_text().startswith("# header")
    # a folder that restored an older copy of a method it did not tune does not undo a later choice
    stamped = "methods:\n  lora:\n    settings: {lr: 0.001}\n    tuned_at: '2026-12-04T08:00:00+00:00'\n"
    (other / "tuned.yaml").write_text(stamped)
    archive.save(other, tmp_path / "archive")
    (other / "tuned.yaml").write_text(stamped.replace("0.001", "0.01").replace("08:00", "07:00"))
    archive.save(other, tmp_path / "archive")
    kept = yaml.safe_load((tmp_path / "archive" / "tuned.yaml").read_text())["methods"]
    assert kept["lora"]["settings"] == {"lr": 0.001} and kept["bitfit"] == {"settings": {"lr": 0.003}}


def test_flop_floor_counts_a_hand_made_model(tiny_llama_path, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flop_floor

    cfg = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "vocab_size": 10}
    c = flop_floor.counts(cfg, seq=3, r=1)
    linear = 4 * (4 + 2 + 2) + 4 * 4 + 3 * 4 * 8  # q k v o, gated MLP
    assert c["body"] == 4 * linear + 12 * 2 * 4  # fwd + bwd to inputs; attention: context 2, 4 dims
    assert c["head"] == 4 * 4 * 10 and c["lora_rank"] == 4 * ((4 + 4) + (4 + 2))
    # PEFT computes the head everywhere, petmix only at labelled positions: less work with one block
    assert flop_floor.step_flop(c, 6, 2, 1) < flop_floor.step_flop(c, 6, 6, 1)
    proc = _run([str(ROOT / "benchmarks/flop_floor.py"), "--model", str(tiny_llama_path), "--batch", "2x8",
                 "--labelled", "2"], tmp_path)
    assert "(a) step" in proc.stdout and "(c) step" in proc.stdout


def test_vs_arrow_combines_seeds_into_mean_and_std(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vs_arrow

    def payload(seed: int, ap: float, n_test: int = 3) -> dict:
        row = {"method": "oracle (own adapter)", "AP": ap, "routing_acc": 100.0, "gen_s": 1.0,
               "scores": {"a": ap, "b": ap}}
        return {"tasks": ["a", "b"], "n_test": {"a": n_test, "b": n_test}, "import_examples": 4,
                "logits_max_abs_diff": 0.0, "rows": [row], "settings": {"seed": seed, "test_seed": 0}}

    runs = []
    for seed, ap in enumerate([10.0, 20.0, 30.0]):
        runs.append(tmp_path / f"s{seed}")
        runs[-1].mkdir()
        (runs[-1] / "vs_arrow.json").write_text(json.dumps(payload(seed, ap)))
    table = vs_arrow.combine(runs)
    assert "| oracle (own adapter) | 20.00 ± 10.00 | 100.0 ± 0.0 |" in table and "seeds 0, 1, 2" in table
    (runs[2] / "vs_arrow.json").write_text(json.dumps(payload(2, 30.0, n_test=4)))
    with pytest.raises(SystemExit, match="other tasks or test examples"):
        vs_arrow.combine(runs)


def test_answer_spread_counts_the_most_frequent_answer_of_finished_runs_only(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import answer_spread

    def run(label: str, seed: int, rows: int, answers: list[str]) -> None:
        d = tmp_path / label / f"seed-{seed}"
        (d / "predictions").mkdir(parents=True)
        matrix = [[50.0, None], [None, 50.0]][:rows]
        (d / "results.json").write_text(json.dumps({"method": "prompt-tuning", "tasks": ["a", "b"], "matrix": matrix}))
        (d / "predictions" / "a.jsonl").write_text("".join(json.dumps({"prediction": x}) + "\n" for x in answers))

    run("pt", 0, 2, ["yes", "yes", "yes", "no"])
    run("pt", 1, 2, ["no", "no", "no", "no"])
    run("pt", 2, 1, ["maybe"] * 4)  # unfinished: left out
    assert answer_spread.main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| pt "))
    assert row == "| pt | 2 | 88% 'no/yes', 1.5 distinct | - |"


def test_table_from_logs_summarises_each_entrys_one_seed_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import table_from_logs

    def cell(entry: str, ap: str, routing: str) -> str:  # the shape a one-seed `petmix compare` log ends with
        return "\n".join([
            "12:00:00 INFO petmix.train: stage 1 (a): 22 steps, mean loss 2.70, 26.0 s",
            "| method | seeds | AP | F.Ra | FWT | BWT | routing acc | trainable/task | wall s | vs best AP | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            "| per-task-lora | 1 | 50.00 | 0.00 | - | 0.00 | - | 10 | 1.0 | best | reference |",
            f"| {entry} | 1 | {ap} | 1.00 | -2.00 | -1.00 | {routing} | 10 | 1.0 |  | |",
            "",
            "| | per-task-lora | " + entry + " |",
            "|---|---|---|",
            f"| {entry} | . |  |",  # the pairwise table repeats the name: not a results row
        ])

    floor = "| floor: majority label | 1 | 20.00 | - | - | - | - | 0 | - | - | most frequent |\n"
    for seed, (a, b) in enumerate([("40.00", "30.00"), ("44.00", "31.00"), ("42.00", "35.00")]):
        (tmp_path / f"good-{seed}.log").write_text(cell("good", a, "99.00"))
        (tmp_path / f"weak-{seed}.log").write_text(cell("weak", b, "-").replace("|---|\n", "|---|\n" + floor, seed == 0))
    lines = table_from_logs.table(tmp_path).splitlines()
    assert lines.pop(2) == "| floor: majority label | 0 | 20.00 | - | - | - | - |  | 20.00 |"  # from the one cell with floors
    assert lines[2] == ("| good | 0,1,2 | 42.00 ± 2.00 | 1.00 ± 0.00 | -2.00 ± 0.00 | -1.00 ± 0.00 | 99.00 ± 0.00 "
                        "| best | 40.00 / 44.00 / 42.00 |")
    assert lines[3].startswith("| weak | 0,1,2 | 32.00 ± 2.65 |") and "| - | < |" in lines[3]  # 10 apart > 2 + 2.65
    (tmp_path / "weak-3.log").write_text("12:00:00 INFO petmix.train: stage 1 (a): killed before its table")
    with pytest.raises(SystemExit, match="weak-3.log: no finished row"):
        table_from_logs.table(tmp_path)
