"""The stream trainer: what changes at each stage, resume after a kill, the results contract."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from petmix.backbone import load_backbone
from petmix.data.task import Example, Task
from petmix.errors import PetmixError
from petmix.runs import read_json
from petmix.train import TrainConfig, Trainer


def make_tasks(n: int = 3, n_train: int = 12, n_test: int = 3) -> list[Task]:
    words = ["yes", "no", "cat", "mat"]
    tasks = []
    for t in range(n):
        w = words[t]
        ex = [Example(f"say {w} number {i} " + "x" * (i % 3), [w]) for i in range(n_train + n_test)]
        tasks.append(Task(f"task{t}", f"Answer {w}.", "exact_match", ex[:n_train], ex[n_train:], "plain"))
    return tasks


def run(path, out, method="sapt-lora", **kw):
    # ARM with real inputs keeps these tests independent of the generator (tested in test_replay.py).
    settings = {"epochs": 1, "batch_size": 4, "lr": 5e-3, "max_new_tokens": 3, "replay_source": "real", **kw}
    cfg = TrainConfig(method=method, model=str(path), **settings)
    return Trainer(cfg, make_tasks(), out).run()


def block(state, i):
    return {k: v for k, v in state.items() if k.startswith(f"lora.{i}.")}


@pytest.mark.parametrize("method", ["sapt-lora", "inc-lora", "per-task-lora"])
def test_only_the_current_block_changes(tiny_model_path, tmp_path, method):
    out = tmp_path / "run"
    run(tiny_model_path, out, method=method)
    stages = [load_file(out / "checkpoints" / f"stage-{s}.safetensors") for s in (1, 2, 3)]
    for s in range(3):
        assert len({k.split(".")[1] for k in stages[s] if k.startswith("lora.")}) == s + 1
        for i in range(s):  # earlier blocks are bit-identical after later stages
            for k, v in block(stages[i], i).items():
                assert torch.equal(v, stages[s][k]), (s, k)
        new_b = [v for k, v in block(stages[s], s).items() if k.endswith(".B")]
        assert any(torch.count_nonzero(b) > 0 for b in new_b)  # the current block did train
    if method == "sapt-lora":  # the default prototype router: old keys frozen, the query projection too
        for s in range(1, 3):
            for i in range(s):
                assert torch.equal(stages[i][f"router.keys.{i}"], stages[s][f"router.keys.{i}"])
            assert torch.equal(stages[s - 1]["router.query.1.weight"], stages[s]["router.query.1.weight"])
            assert not torch.count_nonzero(stages[s]["router.query.1.weight"])  # q = LayerNorm(f) throughout


def test_paper_router_trains_the_shared_query_projection(tiny_llama_path, tmp_path):
    out = tmp_path / "run"
    run(tiny_llama_path, out, router="paper")
    stages = [load_file(out / "checkpoints" / f"stage-{s}.safetensors") for s in (1, 2, 3)]
    for s in range(1, 3):
        for i in range(s):  # old keys frozen, the shared query projection keeps training
            assert torch.equal(stages[i][f"router.keys.{i}"], stages[s][f"router.keys.{i}"])
        assert not torch.equal(stages[s - 1]["router.query.0.weight"], stages[s]["router.query.0.weight"])


def test_seq_lora_trains_one_block_throughout(tiny_llama_path, tmp_path):
    out = tmp_path / "run"
    run(tiny_llama_path, out, method="seq-lora")
    s1 = load_file(out / "checkpoints" / "stage-1.safetensors")
    s3 = load_file(out / "checkpoints" / "stage-3.safetensors")
    assert {k.split(".")[1] for k in s3} == {"0"}
    assert any(not torch.equal(v, s3[k]) for k, v in s1.items())


def test_backbone_stays_frozen(tiny_llama_path, tmp_path):
    before = {k: v.clone() for k, v in load_backbone(str(tiny_llama_path)).model.state_dict().items()}
    cfg = TrainConfig(method="sapt-lora", model=str(tiny_llama_path), batch_size=4, lr=5e-3, max_new_tokens=2,
                      replay_source="real")
    trainer = Trainer(cfg, make_tasks(2), tmp_path / "run")
    trainer.run()
    for name, layer in trainer.mix.pool.layers.items():
        assert torch.equal(layer.base.weight, before[f"{name}.weight"]), name
    for name, p in trainer.backbone.model.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base.", ".")
            assert torch.equal(p, before[key]), name


def test_results_contract(tiny_llama_path, tmp_path):
    out = tmp_path / "run"
    res = run(tiny_llama_path, out)
    disk = read_json(out / "results.json")
    assert disk["tasks"] == ["task0", "task1", "task2"]
    m = disk["matrix"]
    assert len(m) == 3 and all(len(r) == 3 for r in m)
    assert m[0][1] is None and m[0][2] is None and m[1][2] is None  # not yet seen
    assert set(disk["metrics"]) == {"AP", "F.Ra", "FWT", "BWT"} and disk["metrics"]["FWT"] is None
    assert res["metrics"] == disk["metrics"]
    rec = [line for line in (out / "predictions" / "task0.jsonl").read_text().splitlines()]
    assert len(rec) == 3
    stage1 = (out / "predictions" / "stage-1" / "task0.jsonl").read_text().splitlines()
    import json

    row = json.loads(stage1[0])
    assert set(row) >= {"input", "prediction", "references", "score", "router_weights"}
    assert len(row["router_weights"]) == 1 and len(json.loads(rec[0])["router_weights"]) == 3
    assert len(disk["stages"][2]["train_router_weights"]) == 3


def test_single_task_results_give_fwt(tiny_llama_path, tmp_path):
    per_task = run(tiny_llama_path, tmp_path / "pt", method="per-task-lora")
    res = run(tiny_llama_path, tmp_path / "sapt", single_task_results=str(tmp_path / "pt"))
    s = [per_task["matrix"][i][i] for i in range(3)]
    assert res["single_task"] == s
    want = sum(res["matrix"][i][i] - s[i] for i in range(3)) / 3
    assert res["metrics"]["FWT"] == pytest.approx(want)


def test_resume_after_kill_equals_uninterrupted(tiny_model_path, tmp_path, monkeypatch):
    kw = {"checkpoint_every": 1, "epochs": 2}
    whole = run(tiny_model_path, tmp_path / "whole", **kw)

    calls = {"n": 0}
    original = Trainer._save_state

    def killing_save(self, progress, optimizer, stats=None):
        original(self, progress, optimizer, stats)
        calls["n"] += 1
        if progress["stage"] == 1 and not progress["stage_done"] and progress["step"] == 3:
            raise KeyboardInterrupt("simulated kill mid-stage")

    monkeypatch.setattr(Trainer, "_save_state", killing_save)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_path, tmp_path / "killed", **kw)
    monkeypatch.setattr(Trainer, "_save_state", original)
    assert read_json(tmp_path / "killed" / "state" / "trainer.json")["progress"]["step"] == 3
    resumed = run(tiny_model_path, tmp_path / "killed", **kw)

    assert resumed["matrix"] == whole["matrix"]
    a = load_file(tmp_path / "whole" / "adapters.safetensors")
    b = load_file(tmp_path / "killed" / "adapters.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for sa, sb in zip(whole["stages"], resumed["stages"]):
        assert sa["steps"] == sb["steps"] and sa["mean_loss"] == pytest.approx(sb["mean_loss"])


def test_resume_refuses_other_settings(tiny_llama_path, tmp_path):
    run(tiny_llama_path, tmp_path / "r")
    with pytest.raises(PetmixError, match="other settings"):
        run(tiny_llama_path, tmp_path / "r", lora_r=8)


def test_kept_runs_ignore_other_methods_options():
    """A run records every option; a change in another method's (its default, say) leaves the run valid."""
    from petmix.train import settings_diff

    old = TrainConfig.from_dict({"method": "o-lora"}).to_dict()
    assert settings_diff(old, TrainConfig.from_dict({"method": "o-lora", "lwf_alpha": 0.5}).to_dict()) == []
    assert settings_diff(old, TrainConfig.from_dict({"method": "o-lora", "olora_lambda1": 2.5}).to_dict()) == [
        "olora_lambda1"]
    assert settings_diff(old, TrainConfig.from_dict({"method": "o-lora", "lora_r": 2}).to_dict()) == ["lora_r"]


def test_mtl_is_one_joint_stage(tiny_llama_path, tmp_path):
    res = run(tiny_llama_path, tmp_path / "mtl", method="mtl-lora")
    assert len(res["matrix"]) == 1 and None not in res["matrix"][0]
    assert res["metrics"]["BWT"] is None and res["stage_names"] == ["joint"]


def test_config_validation():
    with pytest.raises(PetmixError, match="unknown keys"):
        TrainConfig.from_dict({"epochz": 1})
    with pytest.raises(PetmixError, match="unknown method"):
        TrainConfig.from_dict({"method": "nope"})
    cfg = TrainConfig.from_dict({"tasks": "a,b", "batch-size": 2})
    assert cfg.tasks == ["a", "b"] and cfg.batch_size == 2


def test_data_parallel_under_accelerate_launch(tiny_llama_path, tmp_path):
    """Two CPU processes (gloo): batches are split, gradients averaged, the main process writes."""
    import json
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    for name, word in (("alpha", "yes"), ("beta", "no")):
        (data / name).mkdir(parents=True)
        for split in ("train", "test"):
            lines = [json.dumps({"input": f"{name} item {i}", "output": word}) for i in range(10)]
            (data / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "petmix.cli", "train", "--model",
           str(tiny_llama_path), "--data", str(data), "--tasks", "alpha,beta", "--epochs", "1", "--batch-size", "4",
           "--replay-source", "real", "--max-new-tokens", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_json(out / "results.json")
    assert len(res["matrix"]) == 2 and res["stages"][1]["steps"] == 3  # 9 train examples / batch 4
    assert proc.stdout.count("AP ") == 1  # one report, from the main process


def test_config_numbers_written_as_yaml_strings_are_read_as_numbers():
    from petmix.errors import PetmixError

    cfg = TrainConfig.from_dict({"lr": "3e-4", "max_train": "16"})
    assert cfg.lr == 3e-4 and cfg.max_train == 16
    with pytest.raises(PetmixError, match="lr: must be a number"):
        TrainConfig.from_dict({"lr": "fast"})


@pytest.mark.parametrize("method", ["per-task-lora", "prog-prompt"])
def test_unchanged_task_id_evaluations_are_reused_with_the_same_answers(tiny_llama_path, tmp_path, method, caplog):
    """Task-id methods whose earlier blocks are frozen: an earlier task's answers after a later stage are
    those it gave before, so they are reused; the run's results and predictions equal a run that
    evaluates everything again."""
    caplog.set_level("INFO", logger="petmix.train")
    fresh = run(tiny_llama_path, tmp_path / "fresh", method, lr=5e-2)  # enough to change the answers
    Trainer.reuse_unchanged_evals = False
    try:
        again = run(tiny_llama_path, tmp_path / "again", method, lr=5e-2)
    finally:
        Trainer.reuse_unchanged_evals = True
    assert fresh["matrix"] == again["matrix"]
    for stage in (1, 2, 3):
        for f in sorted((tmp_path / "again" / "predictions" / f"stage-{stage}").glob("*.jsonl")):
            assert (tmp_path / "fresh" / "predictions" / f"stage-{stage}" / f.name).read_text() == f.read_text()
    reused = [r for r in caplog.records if "predictions are reused" in r.getMessage()]
    assert len(reused) == 3  # task 1 after stages 2 and 3, task 2 after stage 3; none in the run without reuse


def test_reuse_of_task_id_evaluations_survives_a_resume(tiny_llama_path, tmp_path, monkeypatch, caplog):
    """The digests live in stages.json, so a run stopped between stages still reuses after resuming."""
    import petmix.train as train_module

    caplog.set_level("INFO", logger="petmix.train")
    whole = run(tiny_llama_path, tmp_path / "whole", "per-task-lora", lr=5e-2)
    hits = {"n": 0}

    def stop_after_stage_2(name: str) -> None:
        if name == "stage-end":
            hits["n"] += 1
            if hits["n"] == 2:
                raise KeyboardInterrupt  # as Ctrl-C between stages
    monkeypatch.setattr(train_module, "crash_point", stop_after_stage_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama_path, tmp_path / "cut", "per-task-lora", lr=5e-2)
    monkeypatch.undo()
    caplog.clear()
    caplog.set_level("INFO", logger="petmix.train")
    resumed = run(tiny_llama_path, tmp_path / "cut", "per-task-lora", lr=5e-2)
    assert resumed["matrix"] == whole["matrix"]
    assert len([r for r in caplog.records if "predictions are reused" in r.getMessage()]) == 2  # stage 3: tasks 1, 2
