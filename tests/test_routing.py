"""Routing: the shared attention's presets, routing accuracy, and reflection on feature statistics."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_tasks

from petmix.backbone import load_backbone
from petmix.blocks.lora import LoRAConfig, PooledLoRALinear
from petmix.data.task import Example, Task
from petmix.methods import get_method
from petmix.methods.sapt import AttentiveReflection
from petmix.metrics import routing_accuracy
from petmix.mixture import Mixture
from petmix.router import PrototypeRouter, SharedAttentionRouter, make_shared_router
from petmix.train import TrainConfig, Trainer

# Recorded with petmix at bc5b8c2, before the router presets existed (the paper's router was the only
# one): the same settings must give the same weights, to the last printed digit.
PAPER_TRAIN_WEIGHTS = [[1.0], [0.913614, 0.086386], [0.974037, 0.005606, 0.020357]]
PAPER_TARGETS = [[1.0], [0.99579656, 0.00420346], [0.98684943, 0.00967883, 0.00347167]]
PAPER_TEST_FIRST, PAPER_TEST_LAST = [0.986283, 0.010237, 0.003479], [0.986853, 0.009678, 0.003469]


def test_routing_accuracy_hand_made():
    weights = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.5, 0.0], [0.6, 0.3, 0.1]]
    got = routing_accuracy(weights, own=0)
    # inputs 1 and 4 pick block 0; input 3 ties (a miss); input 2 picks block 1
    assert got == {"accuracy": 50.0, "own_weight": pytest.approx((0.7 + 0.1 + 0.5 + 0.6) / 4), "n": 4}
    assert routing_accuracy([[1 / 3] * 3] * 5, own=2)["accuracy"] == 0.0  # uniform weights select nothing
    assert routing_accuracy([], own=0)["accuracy"] is None


def test_paper_preset_is_unchanged(tiny_llama_path, tmp_path, monkeypatch):
    # The recorded digits come from the plain loss and LoRA paths; the fast ones (the default) are equal
    # to float tolerance (tests/test_speed.py) but round differently in the last digit.
    monkeypatch.setattr(Mixture, "label_only_head", False)
    monkeypatch.setattr(PooledLoRALinear, "fused", False)
    cfg = TrainConfig(method="sapt-lora", model=str(tiny_llama_path), epochs=1, batch_size=4, lr=5e-3, router_lr=1e-2,
                      max_new_tokens=3, replay_source="real", kl_ratio=0.5, seed=3, router="paper")
    res = Trainer(cfg, make_tasks(3), tmp_path / "run").run()
    assert [s["train_router_weights"] for s in res["stages"]] == PAPER_TRAIN_WEIGHTS
    assert [s["arm_target"] for s in res["stages"]] == PAPER_TARGETS
    preds = [json.loads(line)["router_weights"] for t in res["tasks"]
             for line in (tmp_path / "run" / "predictions" / f"{t}.jsonl").read_text().splitlines()]
    assert preds[0] == PAPER_TEST_FIRST and preds[-1] == PAPER_TEST_LAST


def test_presets():
    assert type(make_shared_router("paper", 16)) is SharedAttentionRouter
    proto = make_shared_router("prototype", 16)
    assert isinstance(proto, PrototypeRouter) and proto.temperature == 0.05
    assert make_shared_router("prototype", 16, temperature=2.0).temperature == 2.0
    with pytest.raises(ValueError):
        make_shared_router("nearest", 16)


def test_prototype_key_starts_at_the_tasks_mean_query():
    torch.manual_seed(0)
    router = PrototypeRouter(8, 4)
    f = 0.3 * torch.randn(5, 8) + torch.linspace(2, -2, 8)
    router.add_key(f)
    # W_up starts at zero, so the query is the layer-normed feature and the key is its mean.
    expected = torch.nn.functional.layer_norm(f, (8,), router.query[3].weight, router.query[3].bias).mean(0)
    assert torch.allclose(router.keys[0], expected, atol=1e-6)
    assert torch.equal(router.weights_from_features(f), torch.ones(5, 1))  # one key takes everything
    g = 0.3 * torch.randn(3, 8) + torch.linspace(-2, 2, 8) ** 2  # another task's inputs
    router.add_key(g)
    w = router.weights_from_features(torch.cat([f, g]))
    assert w.shape == (8, 2) and torch.allclose(w.sum(-1), torch.ones(8))
    # Centred on the keys' mean, each task's own inputs lean to its own key.
    assert (w[:5, 0] > 0.5).all() and (w[5:, 1] > 0.5).all()


def distinct_input_tasks(n_tasks: int = 4, n_train: int = 16, n_test: int = 10) -> list[Task]:
    """Tasks that differ in their inputs (each draws from its own words), sharing one template."""
    vocab = [["cat", "mat", "sat"], ["yes", "no", "true"], ["abc", "xyz", "qrs"], ["012", "345", "789"]]
    tasks = []
    for t in range(n_tasks):
        words = vocab[t]
        ex = [Example(" ".join(words[(i + k) % 3] for k in range(2 + i % 4)), [words[0]])
              for i in range(n_train + n_test)]
        tasks.append(Task(f"task{t}", f"Answer with {words[0]}.", "exact_match", ex[:n_train], ex[n_train:], "plain"))
    return tasks


@pytest.mark.parametrize("replay_source", ["features", "real"])
def test_default_router_selects_on_a_synthetic_stream(tiny_llama_path, tmp_path, replay_source):
    cfg = TrainConfig(method="sapt-lora", model=str(tiny_llama_path), epochs=1, batch_size=4, lr=5e-3,
                      max_new_tokens=2, replay_source=replay_source, kl_ratio=0.5)
    res = Trainer(cfg, distinct_input_tasks(), tmp_path / "run").run()
    routing = res["routing_accuracy"]
    assert routing["final"] >= 95.0, routing
    assert len(routing["per_stage"]) == 4 and routing["per_stage"][0][1] is None  # task 2 unseen after stage 1
    assert res["stages"][-1]["routing"]["task3"]["n"] == 10


def test_paper_preset_does_not_select_on_the_same_stream(tiny_llama_path, tmp_path):
    """The measurement the default exists for: the paper's router gives most inputs to one block."""
    cfg = TrainConfig(method="sapt-lora", model=str(tiny_llama_path), epochs=1, batch_size=4, lr=5e-3,
                      max_new_tokens=2, replay_source="real", kl_ratio=0.5, router="paper")
    res = Trainer(cfg, distinct_input_tasks(), tmp_path / "run").run()
    assert res["routing_accuracy"]["final"] < 60.0


def test_feature_reflection_stores_statistics_and_trains_only_the_router(tiny_llama_path, tmp_path):
    bb = load_backbone(str(tiny_llama_path))
    mix = Mixture(bb, LoRAConfig(r=2), "attention", router_hidden=8, router_preset="prototype")
    arm = AttentiveReflection(tmp_path, kl_ratio=1.0, replay_source="features", batch_size=4, every=1, seed=0)
    tasks = distinct_input_tasks(2)
    method = get_method("sapt-lora")
    method.begin_task(mix, 0)
    ids = arm._encode(mix, tasks[0], [ex.input for ex in tasks[0].train], 64, False)
    arm.features.store(tasks[0].name, mix.router_features(*arm._batch(mix, ids)))
    arm.store_target(mix, tasks[0], tasks[0].train, 64, False)
    assert (tmp_path / "arm_features.safetensors").is_file()
    trainable = method.begin_task(mix, 1)
    arm.prepare(mix, tasks[:1], 64, False)
    loss = arm.reflection_loss(mix, 0)
    assert loss is not None and loss.item() >= 0
    loss.backward()
    with_grad = {id(p) for p in mix.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    router = {id(p) for p in list(mix.router.query.parameters()) + [mix.router.keys[1]]}
    assert with_grad and with_grad <= router and with_grad <= {id(p) for p in trainable}
    # The same micro-batch draws the same pseudo-features (a resumed run computes the same loss).
    again = AttentiveReflection(tmp_path, kl_ratio=1.0, replay_source="features", batch_size=4, every=1, seed=0)
    again.prepare(mix, tasks[:1], 64, False)
    assert torch.equal(again.reflection_loss(mix, 0).detach(), loss.detach())
