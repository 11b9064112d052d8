"""ATTEMPT, ATTEMPT-m, SPoT, source prompts and the single-task PET methods."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_tasks

from petmix.backbone import load_backbone
from petmix.blocks.prompt import PromptConfig
from petmix.data.collate import encode_prompts, prompt_batch
from petmix.methods import get_method
from petmix.methods.spot import most_similar, prompt_similarity
from petmix.mixture import Mixture
from petmix.router import AttemptAttention
from petmix.runs import read_json, save_tensors
from petmix.sources import library_table, resolve_sources, write_library
from petmix.train import TrainConfig, Trainer


def test_attention_module_matches_a_hand_computation():
    torch.manual_seed(0)
    d, hidden, m, length = 6, 3, 2, 4
    g = AttemptAttention(d, hidden)
    with torch.no_grad():
        g.norm.weight.uniform_(0.5, 1.5)
        g.norm.bias.uniform_(-0.1, 0.1)
    embeds = torch.randn(2, 5, d)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    sources, targets = torch.randn(m, length, d), torch.randn(2, length, d)
    got = g(embeds, mask, sources, targets)
    for b in range(2):
        x = embeds[b, : int(mask[b].sum())].max(0).values  # max-pool over real tokens only
        z = g.up.weight @ torch.nn.functional.silu(g.down.weight @ x)
        h = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + 1e-5) * g.norm.weight + g.norm.bias
        prompts = [sources[0], sources[1], targets[b]]
        scores = torch.stack([p.max(0).values @ h for p in prompts]) / (d * math.e)
        torch.testing.assert_close(got[b], torch.softmax(scores, 0), rtol=1e-5, atol=1e-6)
    assert g.temperature == pytest.approx(d * math.e)  # 2087 for d = 768
    assert AttemptAttention(768).temperature == pytest.approx(2087.6, abs=0.1)


def test_token_level_attention_scores_each_prompt_token():
    torch.manual_seed(1)
    g = AttemptAttention(4, 2, token_level=True)
    embeds, mask = torch.randn(1, 3, 4), torch.ones(1, 3)
    sources, targets = torch.randn(2, 5, 4), torch.randn(1, 5, 4)
    a = g(embeds, mask, sources, targets)
    assert a.shape == (1, 3, 5)
    torch.testing.assert_close(a.sum(1), torch.ones(1, 5))
    h = g.hidden(embeds, mask)[0]
    want = torch.softmax(torch.stack([sources[0, 2] @ h, sources[1, 2] @ h, targets[0, 2] @ h]) / g.temperature, 0)
    torch.testing.assert_close(a[0, :, 2], want)


@pytest.fixture
def source_files(tiny_llama_path, tmp_path):
    backbone = load_backbone(str(tiny_llama_path))
    d = backbone.hidden_size
    paths = []
    for k, name in enumerate(["mnli", "sst2"]):
        path = tmp_path / "lib" / f"{name}.safetensors"
        save_tensors(path, {"prompt": torch.full((10, d), float(k + 1)) + 0.01 * torch.randn(10, d)})
        paths.append(path)
    write_library(tmp_path / "lib", [{"file": p.name, "task": p.stem, "score": 50.0} for p in paths])
    return tmp_path / "lib", paths


def test_instance_prompt_is_target_plus_attention_weighted_sum(tiny_llama_path, source_files):
    lib, paths = source_files
    backbone = load_backbone(str(tiny_llama_path))
    cfg = PromptConfig(length=10, sources=[str(p) for p in paths])
    mix = Mixture(backbone, cfg, routing="source-attention")
    mix.add_task()  # target of task 0
    mix.add_task()  # target of task 1
    assert mix.num_sources == 2 and mix.pool.source_names == ["mnli", "sst2"]
    tok = backbone.tokenizer
    batch = prompt_batch(tok, encode_prompts(tok, ["say yes", "say cat now"], 32), left=True)
    routing = mix.route(batch["input_ids"], batch["source_mask"], task_index=1)
    w, a = routing.weights, routing.reported
    torch.testing.assert_close(a.sum(1), torch.ones(2))  # attention over 2 sources + own target
    assert float(a[:, 2].abs().sum().detach()) == 0.0  # the other task's target is not a candidate
    inputs = mix.pool.model_inputs(batch, w)
    pools = mix.pool.prompts
    for b in range(2):
        want = pools[3] + a[b, 0] * pools[0] + a[b, 1] * pools[1] + a[b, 3] * pools[3]
        pads = int((batch["attention_mask"][b] == 0).sum())
        torch.testing.assert_close(inputs["inputs_embeds"][b, pads:pads + 10], want.detach())
    # ATTEMPT-m: one task id per input picks each one's target prompt
    w2 = mix.weights_for(batch["input_ids"], batch["source_mask"], task_index=torch.tensor([0, 1]))
    assert w2[0, 3] == 0 and w2[0, 2] > 1 and w2[1, 2] == 0 and w2[1, 3] > 1


@pytest.mark.parametrize("train_layer_norm", [True, False])
def test_attempt_trains_only_the_target_prompt_and_g(tiny_llama_path, source_files, tmp_path, train_layer_norm):
    lib, paths = source_files
    cfg = TrainConfig(method="attempt", model=str(tiny_llama_path), batch_size=4, lr=1e-2, max_new_tokens=2,
                      sources=[str(lib)], prompt_init="mnli", attempt_train_layer_norm=train_layer_norm)
    trainer = Trainer(cfg, make_tasks(2), tmp_path / "run")
    trainable = get_method("attempt").begin_task(trainer.mix, 0)
    names = {n for n, p in trainer.mix.named_parameters() if p.requires_grad}
    assert any(n.startswith("prompts.2") for n in names) and not any(n.startswith(("prompts.0", "prompts.1")) for n in names)
    assert {"router.down.weight", "router.up.weight"} <= names
    assert ("router.norm.weight" in names) == train_layer_norm
    assert not any(n.startswith("model.") for n in names)
    # the target starts as the named source prompt (loaded from the library)
    torch.testing.assert_close(trainer.mix.pool.prompts[2].detach(), load_file(paths[0])["prompt"])
    d = trainer.backbone.hidden_size
    assert sum(p.numel() for p in trainable) == 10 * d + 2 * 100 * d + (2 * d if train_layer_norm else 0)


def test_attempt_and_attempt_m_runs(tiny_llama_path, source_files, tmp_path):
    lib, _ = source_files
    base = dict(model=str(tiny_llama_path), batch_size=4, lr=1e-2, max_new_tokens=2, sources=[str(lib)])
    single = Trainer(TrainConfig(method="attempt", **base), make_tasks(2), tmp_path / "a").run()
    assert single["independent"] and single["sources"] == ["mnli", "sst2"]
    assert single["matrix"][1][0] is None and single["matrix"][1][1] is not None  # each task scored by its own model
    rec = read_json(tmp_path / "a" / "results.json")
    assert rec["metrics"]["AP"] == pytest.approx(sum(single["matrix"][i][i] for i in range(2)) / 2)
    preds = (tmp_path / "a" / "predictions" / "task1.jsonl").read_text().splitlines()
    assert len(read_json_line(preds[0])["router_weights"]) == 4  # 2 sources + 2 targets (the attention a)
    multi = Trainer(TrainConfig(method="attempt-m", **base), make_tasks(3), tmp_path / "m").run()
    assert multi["stage_names"] == ["joint"] and all(v is not None for v in multi["matrix"][0])
    state = load_file(tmp_path / "m" / "adapters.safetensors")
    assert {k for k in state if k.startswith("prompt.")} == {f"prompt.{i}" for i in range(5)}
    assert (tmp_path / "m" / "prompts" / "task2.safetensors").is_file()


def read_json_line(line: str) -> dict:
    import json

    return json.loads(line)


def test_spot_starts_from_the_most_similar_source(tiny_llama_path, source_files, tmp_path):
    lib, paths = source_files
    probe = torch.full((10, 4), 2.0) + torch.randn(10, 4) * 0.01
    name, scores = most_similar(probe, {"a": -probe, "b": probe * 3})
    assert name == "b" and scores["a"] == pytest.approx(-1.0, abs=1e-4)
    assert prompt_similarity(probe, probe) == pytest.approx(1.0)
    cfg = TrainConfig(method="spot", model=str(tiny_llama_path), batch_size=4, lr=1e-2, max_new_tokens=2,
                      sources=[str(lib)], spot_probe_steps=2, epochs=0.01)
    trainer = Trainer(cfg, make_tasks(1), tmp_path / "run")
    res = trainer.run()
    choice = read_json(tmp_path / "run" / "spot.json")["task0"]
    assert res["stages"][0]["spot_source"] == choice["source"] == max(choice["similarity"], key=choice["similarity"].get)
    # one step at lr 1e-2 after the transfer: the prompt is still next to the chosen source
    src = load_file(lib / f"{choice['source']}.safetensors")["prompt"]
    assert (trainer.mix.pool.prompts[0].detach() - src).abs().max() < 0.05


def test_prompt_tuning_exports_reusable_prompts_and_library(tiny_llama_path, tmp_path):
    cfg = TrainConfig(method="prompt-tuning", model=str(tiny_llama_path), batch_size=4, lr=1e-2, max_new_tokens=2)
    Trainer(cfg, make_tasks(2), tmp_path / "run").run()
    meta = read_json(tmp_path / "run" / "prompts" / "task1.json")
    assert meta["task"] == "task1" and meta["length"] == 10 and meta["method"] == "prompt-tuning"
    assert meta["score"] is not None and meta["backbone_path"]
    assert [p.name for p in resolve_sources([str(tmp_path / "run" / "prompts")])] == ["task0.safetensors", "task1.safetensors"]
    write_library(tmp_path / "run" / "prompts", [{"file": "task1.safetensors", "task": "task1", "score": 1.0}])
    assert [p.stem for p in resolve_sources([str(tmp_path / "run" / "prompts")])] == ["task1"]
    assert "| task1.safetensors | task1 |" in library_table(tmp_path / "run" / "prompts")


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2", "bitfit", "lora", "full-ft"])
def test_pet_methods_learn_each_task_from_the_same_start(tiny_llama_path, tmp_path, method):
    cfg = TrainConfig(method=method, model=str(tiny_llama_path), batch_size=4, lr=1e-2, max_new_tokens=2)
    trainer = Trainer(cfg, make_tasks(2), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.backbone.model.state_dict().items()}
    res = trainer.run()
    assert res["independent"] and res["trainable_params_per_task"] > 0
    assert [sum(v is not None for v in row) for row in res["matrix"]] == [1, 1]
    after = trainer.backbone.model.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    if method == "full-ft":
        assert changed  # the backbone itself trains; stage 2 started again from the pretrained weights
        get_method(method).begin_task(trainer.mix, 2)  # a next task starts from the pretrained weights
        restored = trainer.backbone.model.state_dict()
        assert all(torch.equal(before[k], restored[k]) for k in before)
    elif method != "bitfit":
        assert not changed  # adapters and prompts only


def test_deep_prompts_reach_every_layer_and_generation_keeps_positions(tiny_llama_path):
    backbone = load_backbone(str(tiny_llama_path))
    mix = Mixture(backbone, PromptConfig(length=3, depth="deep"), "task")
    mix.add_task()
    assert mix.pool.prompts[0].shape[0] == backbone.model.config.num_hidden_layers
    tok = backbone.tokenizer
    ids = encode_prompts(tok, ["Input: the cat\nOutput: ", "Input: two plus two, longer one?\nOutput: "], 64)
    batch = prompt_batch(tok, ids, left=True)
    kwargs, _ = mix.prepare_fn(0)(batch)
    logits = backbone.model(**kwargs).logits
    with torch.no_grad():
        mix.pool.prompts[0][1] += 1.0  # change only the second layer's prompt
    kwargs2, _ = mix.prepare_fn(0)(batch)
    assert not torch.allclose(backbone.model(**kwargs2).logits, logits)  # the deep prompt is used
    mix.clear_weights()
    kwargs, _ = mix.prepare_fn(0)(batch)
    out_both = backbone.model.generate(**kwargs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    alone, _ = mix.prepare_fn(0)(prompt_batch(tok, ids[:1], left=True))
    out_alone = backbone.model.generate(**alone, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    mix.clear_weights()
    assert out_both[0].tolist() == out_alone[0].tolist()


def test_report_draws_attention_over_source_prompts(tiny_llama_path, source_files, tmp_path):
    from petmix.report import render_report, source_attention, write_heatmaps

    lib, _ = source_files
    cfg = TrainConfig(method="attempt", model=str(tiny_llama_path), batch_size=4, lr=1e-2, max_new_tokens=2,
                      sources=[str(lib)])
    res = Trainer(cfg, make_tasks(2), tmp_path / "run").run()
    rows = source_attention(tmp_path / "run", res)
    assert len(rows) == 2 and all(len(r) == 3 and abs(sum(r) - 1) < 1e-4 for r in rows)
    assert [p.name for p in write_heatmaps(tmp_path / "run")] == ["matrix.png", "attention.png"]
    text = render_report(tmp_path / "run")
    assert "| task | mnli | sst2 | own target |" in text and "single-task method" in text


def test_sources_cli_trains_and_lists_a_library(tiny_llama_path, tmp_path, capsys):
    from test_backbone_eval import _write_folder

    from petmix.cli import main

    data = tmp_path / "data"
    for name in ("alpha", "beta"):
        _write_folder(data, name, n=6)
    lib = tmp_path / "lib"
    assert main(["sources", "train", "--model", str(tiny_llama_path), "--data", str(data), "--tasks", "alpha,beta",
                 "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "2", "--out", str(lib)]) == 0
    index = read_json(lib / "index.json")["prompts"]
    assert [e["task"] for e in index] == ["alpha", "beta"] and all(e["score"] is not None for e in index)
    assert (lib / "alpha.safetensors").is_file()
    capsys.readouterr()
    assert main(["sources", "list", str(lib)]) == 0
    assert "| beta.safetensors | beta |" in capsys.readouterr().out
    # the library feeds ATTEMPT: its prompts become the frozen sources
    assert [p.stem for p in resolve_sources([str(lib)])] == ["alpha", "beta"]


@pytest.mark.parametrize("method", ["attempt", "full-ft", "l2p"])
def test_load_a_run_and_predict(tiny_llama_path, source_files, tmp_path, method):
    import petmix

    lib, _ = source_files
    cfg = TrainConfig(method=method, model=str(tiny_llama_path), batch_size=4, lr=1e-2, max_new_tokens=2,
                      sources=[str(lib)] if method == "attempt" else [], l2p_pool_size=3, l2p_top_k=2)
    trainer = Trainer(cfg, make_tasks(2), tmp_path / "run")
    trainer.run()
    model = petmix.load(tmp_path / "run")
    prompt = "Answer yes.\nsay yes number 40"
    if method == "l2p":
        (ans,) = model.generate([prompt])
        assert sorted(ans.router_weights.values()) == [0.0, 1.0, 1.0]  # two of three prompts selected
        return
    first, second = model.generate([prompt], task="task0")[0], model.generate([prompt], task="task1")[0]
    if method == "attempt":
        assert set(first.router_weights) == {"source:mnli", "source:sst2", "task0", "task1"}
        assert first.router_weights["task1"] == 0.0 and second.router_weights["task0"] == 0.0
    else:  # one model per task: task0's answer comes from stage 1's weights
        state = load_file(tmp_path / "run" / "checkpoints" / "stage-1.safetensors")
        name, w = next(iter(state.items()))
        model.generate([prompt], task="task0")
        assert torch.equal(dict(model.mix.named_parameters())["model." + name.split(".", 1)[1]].detach(), w)


def test_attempt_temperature_option_sharpens_the_attention():
    torch.manual_seed(0)
    embeds, mask = torch.randn(1, 4, 8), torch.ones(1, 4)
    sources, targets = torch.randn(3, 2, 8), torch.randn(1, 2, 8)
    paper = AttemptAttention(8)
    sharp = AttemptAttention(8, temperature=0.5)
    sharp.load_state_dict(paper.state_dict())
    a, b = paper(embeds, mask, sources, targets), sharp(embeds, mask, sources, targets)
    assert b.max() > a.max() and torch.equal(a.argmax(1), b.argmax(1))


def test_attempt_m_trains_every_task_target_prompt(tiny_llama_path, source_files, tmp_path):
    """The joint stage mixes tasks in a batch: each input must train its own task's target prompt (an
    earlier trainer passed the stage's index, 0, which overrode the per-input ids: only task 0's prompt
    learned, from every task's examples, and the others were scored with untrained prompts)."""
    lib, _ = source_files
    cfg = TrainConfig(method="attempt-m", model=str(tiny_llama_path), batch_size=6, lr=5e-2, max_new_tokens=2,
                      sources=[str(lib)])
    tasks = make_tasks(3)
    fresh = Trainer(cfg, tasks, tmp_path / "fresh")
    fresh.method.begin_task(fresh.mix, 0, len(tasks))
    m = fresh.mix.num_sources
    before = [fresh.mix.pool.prompts[m + k].detach().clone() for k in range(len(tasks))]
    Trainer(cfg, tasks, tmp_path / "m").run()
    after = load_file(tmp_path / "m" / "adapters.safetensors")
    for k in range(len(tasks)):
        assert not torch.allclose(after[f"prompt.{m + k}"], before[k]), f"target prompt of task {k} did not train"


def test_a_run_records_its_source_prompts_and_refuses_other_ones_of_the_same_name(source_files, tmp_path):
    """Source prompts retrained into the same folder (another machine, another thread count) are other
    prompts: a kept run made with the first ones is not read as a run with the new ones."""
    from petmix.runs import write_json
    from petmix.train import run_identity, run_settings_diff

    lib, paths = source_files
    cfg = TrainConfig(method="attempt", sources=[str(lib)])
    identity = run_identity(cfg, ["rte"])
    assert set(identity["source_digests"]) == {"mnli.safetensors", "sst2.safetensors"}
    run = tmp_path / "run"
    write_json(run / "config.json", identity)
    assert run_settings_diff(run, cfg, ["rte"]) == []
    save_tensors(paths[1], {"prompt": torch.zeros(10, 4)})  # sst2 retrained: same name, other prompt
    assert run_settings_diff(run, cfg, ["rte"]) == ["source_digests"]
    write_json(run / "config.json", {k: v for k, v in identity.items() if k != "source_digests"})
    assert run_settings_diff(run, cfg, ["rte"]) == []  # a run from before digests were recorded: the rest counts
    assert "source_digests" not in run_identity(TrainConfig(method="lora"), ["rte"])
