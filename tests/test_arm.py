"""SAPT's attentive reflection: the KL target, the loss, and where its gradient may go."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_tasks

from petmix.backbone import load_backbone
from petmix.blocks.lora import LoRAConfig
from petmix.data.task import Example, Task
from petmix.methods import get_method
from petmix.methods.sapt import AttentiveReflection, padded_target, reflection_kl
from petmix.mixture import Mixture
from petmix.train import TrainConfig, Trainer


def test_padded_target():
    assert padded_target([0.7, 0.3], 4).tolist() == pytest.approx([0.7, 0.3, 0.0, 0.0])
    with pytest.raises(ValueError):
        padded_target([0.5, 0.5], 1)


def test_reflection_kl_matches_hand_computation():
    current = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    target = torch.tensor([0.8, 0.2, 0.0])  # zero-padded: the third task did not exist yet
    # KL(p||q) = sum_k p_k log(p_k / q_k), 0 log 0 = 0; batch mean
    row0 = 0.8 * torch.log(torch.tensor(0.8 / 0.5)) + 0.2 * torch.log(torch.tensor(0.2 / 0.25))
    row1 = 0.8 * torch.log(torch.tensor(0.8 / 0.2)) + 0.2 * torch.log(torch.tensor(0.2 / 0.2))
    assert float(reflection_kl(current, target)) == pytest.approx(float((row0 + row1) / 2), rel=1e-6)
    assert float(reflection_kl(target.unsqueeze(0), target)) == pytest.approx(0.0, abs=1e-7)


def _task(name: str, word: str) -> Task:
    ex = [Example(f"{word} question {i}", [word]) for i in range(6)]
    return Task(name, f"Answer {word}.", "exact_match", ex, ex[:2], "plain")


def test_reflection_gradient_reaches_only_query_and_current_key(tiny_llama_path, tmp_path):
    mix = Mixture(load_backbone(str(tiny_llama_path)), LoRAConfig(), "attention")
    method = get_method("sapt-lora")
    tasks = [_task("a", "yes"), _task("b", "no"), _task("c", "cat")]
    arm = AttentiveReflection(tmp_path, kl_ratio=1.0, replay_source="real", batch_size=4, every=1)
    for t in range(2):  # two tasks learned: targets and pools stored
        method.begin_task(mix, t)
        arm.store_target(mix, tasks[t], tasks[t].train[:3], 64, False)
        arm.store_pool(tasks[t], arm.real_inputs(tasks[t], 3, 0), {})
    trainable = method.begin_task(mix, 2)
    arm.prepare(mix, tasks[:2], 64, False)
    loss = arm.reflection_loss(mix, micro_batch=0)
    assert loss is not None and loss.item() > 0
    loss.backward()
    allowed = {id(p) for p in list(mix.router.query.parameters()) + [mix.router.keys[2]]}
    for name, p in mix.named_parameters():
        if id(p) in allowed:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"reflection gradient reached {name}"
    assert {id(p) for p in trainable} >= allowed
    saved = json.loads((tmp_path / "arm.json").read_text())
    assert set(saved["targets"]) == {"a", "b"} and len(saved["targets"]["a"]) == 1 and len(saved["targets"]["b"]) == 2
    assert saved["oracle"] is True
    lines = (tmp_path / "pseudo" / "a.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads((tmp_path / "pseudo" / "a.json").read_text())["oracle"] is True


def test_reflection_off_and_every(tiny_llama_path, tmp_path):
    mix = Mixture(load_backbone(str(tiny_llama_path)), LoRAConfig(), "attention")
    arm = AttentiveReflection(tmp_path, kl_ratio=0.0, replay_source="real", batch_size=2, every=1)
    assert arm.reflection_loss(mix, 0) is None  # kl_ratio 0 switches ARM off
    arm = AttentiveReflection(tmp_path, kl_ratio=1.0, replay_source="real", batch_size=2, every=3)
    task = _task("a", "yes")
    get_method("sapt-lora").begin_task(mix, 0)
    arm.store_target(mix, task, task.train, 64, False)
    arm.store_pool(task, ["x", "y"], {})
    get_method("sapt-lora").begin_task(mix, 1)
    arm.prepare(mix, [task], 64, False)
    assert arm.reflection_loss(mix, 1) is None and arm.reflection_loss(mix, 3) is not None


def test_trainer_runs_arm_and_records_it(tiny_llama_path, tmp_path):
    # The paper's router: the prototype router already holds task 1's weights, so its KL rounds to 0 here.
    cfg = TrainConfig(method="sapt-lora", model=str(tiny_llama_path), batch_size=4, lr=5e-3, max_new_tokens=2,
                      replay_source="real", kl_ratio=0.5, router="paper")
    res = Trainer(cfg, make_tasks(3), tmp_path / "run").run()
    stages = res["stages"]
    assert stages[0]["mean_reflection_loss"] is None and stages[1]["mean_reflection_loss"] > 0
    assert stages[0]["replay"] == "ARM (real inputs: oracle)"
    assert len(stages[2]["arm_target"]) == 3 and "pseudo_inputs" not in stages[2]  # none after the last task
    no_arm = TrainConfig(method="sapt-lora", model=str(tiny_llama_path), batch_size=4, lr=5e-3, max_new_tokens=2,
                         kl_ratio=0.0)
    res = Trainer(no_arm, make_tasks(2), tmp_path / "off").run()
    assert "arm_target" not in res["stages"][0] and not (tmp_path / "off" / "arm.json").exists()
