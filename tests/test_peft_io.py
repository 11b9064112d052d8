"""From and to PEFT: export round trip (PEFT's logits equal petmix's single block), import into a
new run, and the refusals (exit 2, naming the folder, writing nothing)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import make_tasks

from petmix.api import load
from petmix.backbone import load_backbone
from petmix.cli import main
from petmix.data.collate import encode_answers, encode_prompts, training_batch
from petmix.peft_io import export_run
from petmix.runs import read_json
from petmix.train import TrainConfig, Trainer

peft = pytest.importorskip("peft")


def train(path, out, method="sapt-lora", tasks=None, **kw):
    settings = {"epochs": 1, "batch_size": 4, "lr": 5e-2, "max_new_tokens": 3, "replay_source": "real", **kw}
    Trainer(TrainConfig(method=method, model=str(path), **settings), tasks or make_tasks(2, 5, 2), out).run()
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_path):
    root = tmp_path_factory.mktemp("peft-export")
    run = train(tiny_llama_path, root / "run")
    return run, export_run(run, root / "exp") and root / "exp"


def _batch(backbone):
    tok = backbone.tokenizer
    prompts = encode_prompts(tok, ["say yes number 1", "the cat sat on the mat"], 64)
    answers = encode_answers(tok, ["yes", "cat"], 8)
    return training_batch(tok, prompts, answers, backbone.is_seq2seq)


def _peft_model(path, folder):
    base = load_backbone(str(path)).model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(folder))
    keys = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not keys, keys  # PEFT warns about missing (or unexpected) adapter keys: none may come
    return model


def test_export_round_trip_logits(tiny_model_path, tmp_path, method="sapt-lora"):
    run = train(tiny_model_path, tmp_path / "run", method=method)
    written = export_run(run, tmp_path / "exp")
    tasks = read_json(run / "config.json")["tasks"]
    assert [p.name for p in written if p.is_dir()] == tasks
    mine = load(run)
    batch = _batch(mine.backbone)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    for i, task in enumerate(tasks):
        folder = tmp_path / "exp" / task
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_model_path)
        model = _peft_model(tiny_model_path, folder)
        result = model.load_adapter(str(folder), adapter_name="again")  # the load result names any stray key
        assert not result.missing_keys and not result.unexpected_keys
        model.set_adapter("default")
        weights = torch.zeros(2, mine.mix.num_blocks)
        weights[:, i] = 1.0
        with torch.no_grad():
            ours = mine.backbone.model(**mine.mix.pool.model_inputs(batch, weights)).logits
            mine.mix.clear_weights()
            theirs = model(**inputs).logits
            bare = mine.backbone.model(**inputs).logits  # weights cleared: the backbone alone
        assert not torch.allclose(bare, ours, atol=1e-4)  # the block does change the output
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    files = {p.name for p in (tmp_path / "exp").iterdir()}
    assert "README.md" in files
    assert ("router.safetensors" in files) == (method == "sapt-lora")
    card = (tmp_path / "exp" / "README.md").read_text()
    assert str(tiny_model_path) in card and all(t in card for t in tasks) and "AP" in card


def test_export_refuses_a_non_run_and_a_full_folder(tmp_path, exported):
    run, _ = exported
    assert main(["export", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export", str(run), "--to", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").exists() and not (tmp_path / "x").exists()


def test_import_exported_adapters_into_a_new_run(tiny_llama_path, tmp_path, exported):
    run, exp = exported
    tasks = make_tasks(3, 5, 2)  # the two exported tasks, then a new one
    out = tmp_path / "new"
    spec = f"task0={exp / 'task0'},task1={exp / 'task1'}"
    cfg = TrainConfig.from_dict({"method": "sapt-lora", "model": str(tiny_llama_path), "epochs": 1, "batch_size": 4,
                                 "lr": 5e-2, "max_new_tokens": 3, "replay_source": "real", "import_adapters": spec,
                                 "import_examples": 4})
    Trainer(cfg, tasks, out).run()
    old, new = load_file(run / "adapters.safetensors"), load_file(out / "adapters.safetensors")
    s1 = load_file(out / "checkpoints" / "stage-1.safetensors")
    for k, v in old.items():
        if k.startswith(("lora.0.", "lora.1.")):
            assert torch.equal(v, new[k]), k  # imported blocks, bit for bit, and frozen
    assert any(torch.count_nonzero(v) for k, v in new.items() if k.startswith("lora.2.") and k.endswith(".B"))
    assert not torch.equal(s1["router.keys.0"], torch.zeros_like(s1["router.keys.0"]))
    stages = read_json(out / "stages.json")
    assert stages[0]["steps"] == 1 and stages[2]["steps"] == 1  # 4 examples, batch 4; 4 of the new task's 5 train
    assert len(read_json(out / "results.json")["matrix"]) == 3


def test_import_with_a_smaller_rank_gives_the_same_block(tiny_llama_path, tmp_path, exported):
    """A rank-4 adapter in a rank-6 pool with another alpha: zero-padded, scaling folded into B."""
    _, exp = exported
    cfg = TrainConfig(method="per-task-lora", model=str(tiny_llama_path), lora_r=6, lora_alpha=12.0, epochs=1,
                      batch_size=4, max_new_tokens=2, import_adapters=[f"task0={exp / 'task0'}"])
    trainer = Trainer(cfg, make_tasks(1, 4, 2), tmp_path / "run")
    trainer.run()
    assert read_json(tmp_path / "run" / "stages.json")[0]["steps"] == 0  # nothing to train: the task id routes
    batch = _batch(trainer.backbone)
    with torch.no_grad():
        ours = trainer.backbone.model(**trainer.mix.pool.model_inputs(batch, torch.ones(2, 1))).logits
        trainer.mix.clear_weights()
    theirs = _peft_model(tiny_llama_path, exp / "task0")(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def _cli_train(path, out, spec, *extra):
    return main(["train", "--method", "sapt-lora", "--model", str(path), "--tasks", "task0", "--data", str(out.parent),
                 "--epochs", "1", "--import-adapters", spec, "--out", str(out), *extra])


def test_import_refusals_exit_2_naming_the_folder_and_writing_nothing(tiny_llama_path, tmp_path, exported, capsys):
    _, exp = exported
    missing = tmp_path / "nowhere"
    not_adapter = tmp_path / "plain"
    not_adapter.mkdir()
    (not_adapter / "notes.txt").write_text("hello")
    other_base = tmp_path / "other"
    other_base.mkdir()
    config = json.loads((exp / "task0" / "adapter_config.json").read_text())
    (other_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gpt2"}))
    (other_base / "adapter_model.safetensors").write_bytes((exp / "task0" / "adapter_model.safetensors").read_bytes())
    big_rank = tmp_path / "rank8"
    big_rank.mkdir()
    (big_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    state = load_file(exp / "task0" / "adapter_model.safetensors")
    save_file({k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in state.items()},
              big_rank / "adapter_model.safetensors")
    for folder, why in [(missing, "not found"), (not_adapter, "not a PEFT adapter"), (other_base, "another base model"),
                        (big_rank, "above the pool's rank")]:
        out = tmp_path / f"run-{folder.name}"
        assert _cli_train(tiny_llama_path, out, f"task0={folder}") == 2
        err = capsys.readouterr().err
        assert str(folder) in err and why in err, err
        assert not out.exists()
    out = tmp_path / "run-method"
    assert main(["train", "--method", "seq-lora", "--model", str(tiny_llama_path), "--tasks", "task0",
                 "--import-adapters", f"task0={exp / 'task0'}", "--out", str(out)]) == 2
    assert "one LoRA block per task" in capsys.readouterr().err and not out.exists()


def test_import_of_other_target_modules(tiny_llama_path, tmp_path, exported):
    """An adapter on fewer modules than the pool works; one on modules the pool lacks is refused."""
    _, exp = exported
    state = load_file(exp / "task0" / "adapter_model.safetensors")
    only_q = tmp_path / "only-q"
    only_q.mkdir()
    config = json.loads((exp / "task0" / "adapter_config.json").read_text())
    (only_q / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    save_file({k: v for k, v in state.items() if "q_proj" in k}, only_q / "adapter_model.safetensors")
    cfg = dict(method="per-task-lora", model=str(tiny_llama_path), epochs=1, batch_size=4, max_new_tokens=2)
    trainer = Trainer(TrainConfig(**cfg, import_adapters=[f"task0={only_q}"]), make_tasks(1, 4, 2), tmp_path / "a")
    trainer.run()
    saved = load_file(tmp_path / "a" / "adapters.safetensors")
    assert all(torch.count_nonzero(v) == 0 for k, v in saved.items() if "v_proj" in k)
    from petmix.errors import PetmixError

    with pytest.raises(PetmixError, match="adapter targets 'v_proj'"):
        Trainer(TrainConfig(**cfg, target_modules=["q_proj"], import_adapters=[f"task0={exp / 'task0'}"]),
                make_tasks(1, 4, 2), tmp_path / "b")
