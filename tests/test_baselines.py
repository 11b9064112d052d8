"""Continual-learning baselines: each one's defining mechanism."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_tasks

from petmix.methods.ewc import ElasticWeightConsolidation
from petmix.methods.o_lora import orthogonality_loss
from petmix.methods.replay import ExperienceReplay
from petmix.runs import read_json
from petmix.train import TrainConfig, Trainer


def test_orthogonality_loss_zero_for_orthogonal_a_and_grows_with_overlap():
    eye = torch.eye(6)
    a_old = [[eye[:2]]]  # one earlier task, one layer, rank 2: rows e0, e1
    assert float(orthogonality_loss([eye[2:4]], a_old)) == 0.0
    overlap = torch.stack([eye[0] + eye[2], eye[3]])
    assert float(orthogonality_loss([overlap], a_old)) == pytest.approx(1.0)  # |<e0+e2, e0>| = 1
    assert float(orthogonality_loss([2 * overlap], a_old)) == pytest.approx(2.0)


def test_ewc_penalty_zero_at_old_optimum_and_grows_away(tmp_path):
    ewc = ElasticWeightConsolidation(tmp_path, lam=2.0, online=False, gamma=1.0, fisher_batches=1)
    theta = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    fisher = [torch.tensor([1.0, 3.0]), torch.tensor([[2.0]])]
    ewc.add_task(0, theta, fisher)
    assert float(ewc.penalty(theta)) == 0.0
    moved = [theta[0] + torch.tensor([0.1, 0.0]), theta[1]]
    assert float(ewc.penalty(moved)) == pytest.approx(0.5 * 2.0 * 1.0 * 0.01)  # lam/2 * F * d^2
    further = [theta[0] + torch.tensor([0.1, 0.2]), theta[1] + 0.3]
    assert float(ewc.penalty(further)) == pytest.approx(0.5 * 2.0 * (0.01 + 3 * 0.04 + 2 * 0.09))
    ewc.add_task(0, theta, fisher)  # a resumed stage replaces its anchor, never doubles it
    assert len(ewc.terms()) == 1


def test_online_ewc_keeps_one_anchor_with_decayed_fisher(tmp_path):
    ewc = ElasticWeightConsolidation(tmp_path, lam=1.0, online=True, gamma=0.5, fisher_batches=1)
    ewc.add_task(0, [torch.tensor([0.0])], [torch.tensor([4.0])])
    ewc.add_task(1, [torch.tensor([1.0])], [torch.tensor([1.0])])
    (anchor, fisher), = ewc.terms()
    assert anchor[0].item() == 1.0 and fisher[0].item() == pytest.approx(0.5 * 4.0 + 1.0)


def test_replay_cycles_through_the_buffer_deterministically(tmp_path):
    replay = ExperienceReplay(tmp_path, per_task=3, per_batch=2, seed=0)
    assert replay.extra_examples(0) == []
    replay.kept = {0: [([1], [2]), ([3], [4]), ([5], [6])]}
    assert replay.extra_examples(0) == [([1], [2]), ([3], [4])]
    assert replay.extra_examples(1) == [([5], [6]), ([1], [2])]


@pytest.mark.parametrize("method", ["o-lora", "ewc", "replay"])
def test_baselines_train_on_a_stream(tiny_llama_path, tmp_path, method):
    cfg = TrainConfig(method=method, model=str(tiny_llama_path), batch_size=4, lr=5e-3, max_new_tokens=2,
                      ewc_fisher_batches=2, buffer_per_task=4)
    res = Trainer(cfg, make_tasks(3), tmp_path / "run").run()
    assert len(res["matrix"]) == 3 and res["metrics"]["AP"] is not None
    stages = res["stages"]
    hook = {"o-lora": "orthogonality", "ewc": "ewc", "replay": "replay"}[method]
    if method != "replay":
        assert stages[0][f"mean_{hook}_loss"] is None and stages[1][f"mean_{hook}_loss"] > 0
    if method == "o-lora":
        blocks = {k.split(".")[1] for k in load_file(tmp_path / "run" / "adapters.safetensors")}
        assert blocks == {"0", "1", "2"}
    if method == "ewc":
        assert len({k.split(".")[1] for k in load_file(tmp_path / "run" / "ewc.safetensors")}) == 3
    if method == "replay":
        assert stages[2]["replay_buffer"] == 12 and "real examples" in stages[0]["replay"]
        assert len(read_json(tmp_path / "run" / "replay_buffer.json")) == 3


# ---- seq-ft, LwF, L2P, LFPT5, progressive prompts -------------------------------------------------

def test_distillation_loss_is_smallest_when_student_matches_teacher():
    from petmix.methods.lwf import distillation_loss

    teacher = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    p = torch.softmax(teacher / 2.0, -1)
    ids, probs = torch.tensor([[0, 1, 2, 3]]), p
    at_teacher = distillation_loss(teacher, ids, probs, 2.0)
    assert float(at_teacher) == pytest.approx(float(-(p * p.log()).sum()))  # the teacher's entropy: KL = 0
    assert float(distillation_loss(torch.tensor([[0.0, 3.0, 0.0, 0.0]]), ids, probs, 2.0)) > float(at_teacher)


def test_key_query_router_selects_the_prompt_whose_key_matches(tiny_llama_path):
    from petmix.backbone import load_backbone
    from petmix.blocks.prompt import PromptConfig
    from petmix.mixture import Mixture

    backbone = load_backbone(str(tiny_llama_path))
    mix = Mixture(backbone, PromptConfig(length=2, combine="concat"), routing="key-query", top_k=2, pool_size=6)
    for _ in range(6):
        mix.add_task()
    tok = backbone.tokenizer
    ids = torch.tensor([tok("say cat now")["input_ids"][:4], tok("the mat is red")["input_ids"][:4]])
    mask = torch.ones_like(ids)
    q = backbone.features(ids, mask)
    with torch.no_grad():
        mix.router.keys[4].copy_(q[0])
        mix.router.keys[1].copy_(q[1])
    routing = mix.route(ids, mask)
    sel = routing.weights
    assert sel.sum(1).tolist() == [2.0, 2.0]
    assert sel[0, 4] == 1 and sel[1, 1] == 1
    assert float(routing.loss.detach()) < 1.0  # the matching key is at cosine 1
    # The selected prompts are concatenated: 2 prompts x 2 tokens in front of the input.
    inputs = mix.pool.model_inputs({"input_ids": ids, "attention_mask": mask}, sel)
    assert inputs["inputs_embeds"].shape[1] == ids.shape[1] + 4
    assert torch.equal(inputs["inputs_embeds"][0, 2:4], mix.pool.prompts[4].detach())


def test_l2p_training_pulls_keys_toward_the_queries_that_select_them(tiny_llama_path, tmp_path):
    cfg = TrainConfig(method="l2p", model=str(tiny_llama_path), batch_size=4, lr=5e-2, max_new_tokens=2,
                      l2p_pool_size=4, l2p_top_k=1, l2p_lambda=1.0, epochs=3)
    res = Trainer(cfg, make_tasks(2), tmp_path / "run").run()
    s = res["stages"]
    assert res["task_id_at_test"] is False
    assert 0 < s[0]["mean_key_match_loss"] and 0 < s[1]["mean_key_match_loss"]
    weights = s[1]["train_router_weights"]  # selection frequency per prompt: one of four per input
    assert len(weights) == 4 and sum(weights) == pytest.approx(1.0)
    d = 32  # tiny model width
    assert res["trainable_params_per_task"] == 4 * (cfg.prompt_length + 1) * d


def test_progressive_prompts_concatenate_earlier_prompts_and_train_only_the_new_one(tiny_llama_path, tmp_path):
    from petmix.mixture import Mixture  # noqa: F401

    cfg = TrainConfig(method="prog-prompt", model=str(tiny_llama_path), batch_size=4, lr=5e-2, max_new_tokens=2)
    trainer = Trainer(cfg, make_tasks(3), tmp_path / "run")
    res = trainer.run()
    assert res["task_id_at_test"] is True
    mix = trainer.mix
    w = mix.weights_for(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), task_index=1)
    assert w.tolist() == [[1.0, 1.0, 0.0]] * 2
    emb = mix.pool.model_inputs({"input_ids": torch.ones(2, 3, dtype=torch.long),
                                 "attention_mask": torch.ones(2, 3, dtype=torch.long)}, w)["inputs_embeds"]
    assert emb.shape[1] == 3 + 2 * cfg.prompt_length
    stages = [load_file(tmp_path / "run" / "checkpoints" / f"stage-{i}.safetensors") for i in (1, 2, 3)]
    assert torch.equal(stages[0]["prompt.0"], stages[2]["prompt.0"])  # earlier prompts stay frozen
    assert torch.equal(stages[1]["prompt.1"], stages[2]["prompt.1"])
    assert "prompt.2" in stages[2] and "prompt.2" not in stages[1]


def test_seq_ft_partial_unfreeze_trains_only_the_top_layers(tiny_llama_path, tmp_path):
    cfg = TrainConfig(method="seq-ft", model=str(tiny_llama_path), batch_size=4, lr=1e-3, max_new_tokens=2,
                      unfreeze="last:1")
    trainer = Trainer(cfg, make_tasks(2), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.backbone.model.state_dict().items()}
    res = trainer.run()
    after = trainer.backbone.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    n_layers = trainer.backbone.model.config.num_hidden_layers
    assert changed and all(f"layers.{n_layers - 1}." in k or "norm" in k or "lm_head" in k for k in changed)
    assert not any(f"layers.{n_layers - 2}." in k for k in changed)
    saved = load_file(tmp_path / "run" / "adapters.safetensors")
    assert all(k.startswith("full.") for k in saved) and len(saved) < len(before)
    assert res["trainable_params_per_task"] == sum(v.numel() for k, v in saved.items())


def test_lwf_distils_from_the_model_before_the_task(tiny_llama_path, tmp_path):
    cfg = TrainConfig(method="lwf", model=str(tiny_llama_path), batch_size=4, lr=5e-3, max_new_tokens=2, lwf_topk=5)
    res = Trainer(cfg, make_tasks(3), tmp_path / "run").run()
    stages = res["stages"]
    assert stages[0]["mean_lwf_loss"] is None and stages[1]["mean_lwf_loss"] > 0
    teacher = load_file(tmp_path / "run" / "lwf" / "teacher-stage-2.safetensors")
    assert teacher["ids"].shape[1] == 5 and teacher["offsets"][-1] == teacher["ids"].shape[0]
    assert torch.allclose(teacher["probs"].float().sum(1), torch.ones(teacher["ids"].shape[0]), atol=1e-2)


def test_lfpt5_replays_generated_and_model_labelled_samples(tiny_llama_path, tmp_path, monkeypatch):
    import petmix.evaluate
    import petmix.replay.generator as generator

    # The generator is tested in test_replay.py, generation in test_backbone_eval.py. Here: the pseudo-inputs
    # go to the model being trained (its prepare hook, the task's prompt format) and what it answers is replayed.
    fake = ["say yes number 40", "say yes number 41 x"]
    monkeypatch.setattr(generator, "generate_pseudo_inputs", lambda *a, **k: (list(fake), {"kept": 2}))
    calls = []
    real_generate = petmix.evaluate.generate

    def labelling(backbone, prompts, cfg=None, prepare=None, desc=""):
        texts, weights = real_generate(backbone, prompts, cfg, prepare, desc)
        if not desc.startswith("label"):
            return texts, weights  # evaluation
        calls.append((prompts, prepare, texts))
        return ["yes", ""], None  # an empty answer is dropped, not replayed

    monkeypatch.setattr(petmix.evaluate, "generate", labelling)
    cfg = TrainConfig(method="lfpt5", model=str(tiny_llama_path), batch_size=4, lr=5e-2, max_new_tokens=2,
                      buffer_per_batch=3)
    trainer = Trainer(cfg, make_tasks(2), tmp_path / "run")
    res = trainer.run()
    (prompts, prepare, _), = calls  # once: after task 1, none after the last task
    assert prompts == [f"Answer yes.\n{x}" for x in fake] or all(x in p for x, p in zip(fake, prompts))
    assert prepare is not None
    saved = read_json(tmp_path / "run" / "lfpt5_pseudo_samples.json")
    assert list(saved) == ["0"] and saved["0"]["samples"] == [{"input": fake[0], "label": "yes"}]
    assert "generated pseudo-samples" in res["stages"][0]["replay"]
    hook = trainer.hooks[0]
    assert len(hook.buffer) == 1 and hook.extra_examples(0) == [hook.buffer[0]] * 3


def test_replay_total_budget_is_shared_and_balanced_sampling_keeps_every_label(tmp_path):
    from types import SimpleNamespace

    from petmix.data.task import Example, Task

    replay = ExperienceReplay(tmp_path, per_task=99, per_batch=1, seed=0, total=6, sampling="balanced")
    exs = [Example(f"x{i}", ["rare" if i == 0 else "common"]) for i in range(20)]
    tasks = [Task(f"t{k}", "", "exact_match", exs, [], "plain") for k in range(3)]
    trainer = SimpleNamespace(tasks=tasks, splits={t.name: (exs, []) for t in tasks}, main=True,
                              encode=lambda chosen, ts, owners: ([[len(e.input)] for e in chosen],
                                                                 [[e.outputs[0] == "rare"] for e in chosen]))
    replay.after_stage(trainer, 0)
    assert len(replay.kept[0]) == 6 and [True] in [a for _, a in replay.kept[0]]  # the rare label is kept
    replay.after_stage(trainer, 1)
    replay.after_stage(trainer, 2)
    assert [len(replay.kept[k]) for k in range(3)] == [2, 2, 2]  # 6 shared by 3 tasks
    assert ExperienceReplay(tmp_path, 1, 1, 0).kept.keys() == {0, 1, 2}  # persisted for a resumed run


def test_replay_with_full_fine_tuning(tiny_llama_path, tmp_path):
    cfg = TrainConfig(method="replay-ft", model=str(tiny_llama_path), batch_size=4, lr=1e-3, max_new_tokens=2,
                      buffer_per_task=4, unfreeze="last:1")
    res = Trainer(cfg, make_tasks(2), tmp_path / "run").run()
    assert res["stages"][1]["replay_buffer"] == 8
    assert all(k.startswith("full.") for k in load_file(tmp_path / "run" / "adapters.safetensors"))


def test_l2p_keys_are_made_where_the_router_lives():
    """An empty key pool still knows its device: the first key on a GPU run (added after the mixture
    moved there, or grown when a run resumes) once stayed on the CPU and failed the first forward."""
    from petmix.router import KeyQueryRouter

    router = KeyQueryRouter(d_model=8, top_k=1, pool_size=3).to("meta")
    router.add_key()
    router.grow(3)
    assert [k.device.type for k in router.keys] == ["meta"] * 3
    assert "anchor" not in router.state_dict()  # not saved: adapters stay as they were


def test_a_seed_draws_the_same_initial_blocks_and_keys_on_any_device():
    """LoRA's A and the routers' keys come from the CPU's generator and are then moved: a block made for a
    GPU ("meta" stands in for it here) consumes the CPU generator exactly as one made on the CPU, so the
    same seed starts from the same weights on either (they were once drawn by the device's generator)."""
    from petmix.blocks.lora import LoRAConfig, MixWeights, PooledLoRALinear
    from petmix.router import uniform_key

    def draw(device: str) -> torch.Tensor:
        torch.manual_seed(0)
        PooledLoRALinear(torch.nn.Linear(6, 5).to(device), LoRAConfig(r=2, alpha=4), MixWeights()).add_block()
        uniform_key(8, torch.device(device))
        return torch.rand(3)  # the CPU generator's next draw

    assert torch.equal(draw("meta"), draw("cpu"))
