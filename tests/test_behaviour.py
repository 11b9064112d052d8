"""Behaviour unchanged by restructuring: fixed-seed runs of several methods on the tiny model give the
numbers recorded before petmix's restructure (issue 11; recorded at commit 6736509).

Each fingerprint holds the results.json matrix, every stage's mean loss and (where recorded) router
weights, ARM targets and hook losses, and the sum and absolute sum of every saved adapter tensor.
To record anew after an intended change of behaviour: ``python tests/test_behaviour.py`` prints the
fingerprints to write to tests/fixtures/ (say why in the commit).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import make_tasks  # noqa: E402
from tiny import build_tiny_llama  # noqa: E402

from petmix.runs import load_tensors, save_tensors  # noqa: E402
from petmix.sources import write_library  # noqa: E402
from petmix.train import TrainConfig, Trainer  # noqa: E402

# configs/cpu/demo.yaml with the tiny model, three tiny tasks and a few steps per task.
DEMO = dict(method="sapt-lora", epochs=1, batch_size=4, lr=1e-3, router_lr=0.01, router="prototype",
            kl_ratio=0.5, replay_source="features", replay_batch_size=8, max_source_len=256, max_target_len=32,
            max_new_tokens=3, lora_r=4, lora_alpha=32)
RUNS: dict[str, dict] = {
    "demo": DEMO,
    "sapt-lora-paper": dict(method="sapt-lora", router="paper", replay_source="real", kl_ratio=0.5, lr=5e-3,
                            batch_size=4, max_new_tokens=3),
    "sapt-prompt": dict(method="sapt-prompt", lr=5e-2, batch_size=4, max_new_tokens=3),
    "attempt": dict(method="attempt", lr=1e-2, batch_size=4, max_new_tokens=2, prompt_length=10),
    "attempt-m": dict(method="attempt-m", lr=1e-2, batch_size=4, max_new_tokens=2, prompt_length=10),
    "ewc": dict(method="ewc", lr=5e-3, batch_size=4, max_new_tokens=3, ewc_fisher_batches=2),
    "lwf": dict(method="lwf", lr=5e-3, batch_size=4, max_new_tokens=3, lwf_alpha=1.0),  # recorded before 0.1 was its default
    "l2p": dict(method="l2p", lr=5e-2, batch_size=4, max_new_tokens=3, l2p_pool_size=4, l2p_top_k=2,
                prompt_length=10),  # recorded before 20 was its default
    "o-lora": dict(method="o-lora", lr=5e-3, batch_size=4, max_new_tokens=3, olora_lambda1=0.5),  # likewise, 0.1
    "replay": dict(method="replay", lr=5e-3, batch_size=4, max_new_tokens=3, buffer_per_task=4),
    "prog-prompt": dict(method="prog-prompt", lr=5e-2, batch_size=4, max_new_tokens=3),
}

RECORDED: dict[str, dict] = json.loads((Path(__file__).parent / "fixtures" / "behaviour_6736509.json").read_text())


def sources(model: Path, folder: Path) -> list[str]:
    """Two fixed source prompts (ATTEMPT's frozen library) of the tiny model's width."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for k, name in enumerate(["mnli", "sst2"]):
        path = folder / f"{name}.safetensors"
        save_tensors(path, {"prompt": torch.full((10, 32), float(k + 1)) + 0.01 * torch.randn(10, 32, generator=g)})
        paths.append(path)
    write_library(folder, [{"file": p.name, "task": p.stem, "score": 50.0} for p in paths])
    return [str(folder)]


def fingerprint(model: Path, name: str, work: Path) -> dict:
    settings = dict(RUNS[name], seed=1, model=str(model))
    if settings["method"].startswith("attempt"):
        settings["sources"] = sources(model, work / "lib")
    cfg = TrainConfig.from_dict(settings)
    out = work / name
    res = Trainer(cfg, make_tasks(3), out).run()
    stage_keys = ("mean_loss", "train_router_weights", "arm_target", "mean_reflection_loss", "mean_ewc_loss",
                  "mean_lwf_loss", "mean_key_match_loss", "mean_orthogonality_loss")
    stages = [{k: s[k] for k in stage_keys if s.get(k) is not None} for s in res["stages"]]
    state = load_tensors(out / "adapters.safetensors")
    tensors = {k: [round(float(v.double().sum()), 4), round(float(v.double().abs().sum()), 4)]
               for k, v in sorted(state.items())}
    return {"matrix": res["matrix"], "stages": stages, "tensors": tensors}


def close(got, want, path="") -> None:
    """Equal structure; floats equal to 1e-5 relative (the restructure must not change the arithmetic,
    but a sum's last digit may round differently when a tensor is reduced in another order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got} != {want}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_behaviour_is_unchanged(name, tiny_llama_path, tmp_path):
    if name not in RECORDED:
        pytest.fail(f"no recorded fingerprint for {name}: run python tests/test_behaviour.py")
    got, want = fingerprint(tiny_llama_path, name, tmp_path), RECORDED[name]
    tensors_close(got.pop("tensors"), want["tensors"], name)
    close(got, {k: v for k, v in want.items() if k != "tensors"}, name)


def tensors_close(got: dict, want: dict, name: str) -> None:
    """Each tensor's [sum, sum of |values|] as recorded. A signed sum cancels: its float noise scales with
    the sum of magnitudes, not with itself (attempt-m's router.up.weight sums to 1.1091 over values whose
    magnitudes sum to 173, and a newer library release moved it across the 4th decimal). So the sum may
    move by 1e-6 of the magnitudes plus one rounding unit of the recorded 4 decimals; the magnitudes by 1e-5."""
    assert set(got) == set(want), f"{name}.tensors: keys {sorted(got)} != {sorted(want)}"
    for key, (total, magnitude) in want.items():
        assert got[key][1] == pytest.approx(magnitude, rel=1e-5, abs=1e-4), f"{name}.tensors.{key}: {got[key]} != {want[key]}"
        assert abs(got[key][0] - total) <= 1e-6 * magnitude + 1e-4, f"{name}.tensors.{key}: {got[key]} != {want[key]}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "tiny-llama")
        prints = {}
        for name in RUNS:
            (Path(tmp) / name).mkdir()
            prints[name] = fingerprint(model, name, Path(tmp) / name)
        print(json.dumps(prints, indent=None, sort_keys=True))
