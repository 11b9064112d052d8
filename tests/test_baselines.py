"""Continual-learning baselines: each one's defining mechanism."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_tasks

from petmix.methods.baselines import ElasticWeightConsolidation, ExperienceReplay, orthogonality_loss
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
