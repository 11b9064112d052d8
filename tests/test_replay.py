"""Pseudo-sample generator (SAPT generative replay): parsing, selection, a run on tiny models, I/O."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import petmix.replay.generator as gen
from petmix.data.task import Example, Task
from petmix.errors import PetmixError
from petmix.replay import (
    DROP_REASONS,
    GeneratorConfig,
    generate_pseudo_inputs,
    generator_target,
    keep_count,
    load_pseudo_info,
    load_pseudo_inputs,
    parse_generation,
    save_pseudo_inputs,
    select_pseudo_inputs,
)


def make_task(n: int = 6, definition: str = "Answer the question.") -> Task:
    train = [Example(f"the cat {i}", ["yes"]) for i in range(n)]
    return Task("toy", definition, "rougeL", train, [Example("the mat", ["no"])], "plain")


def small_cfg(**kw) -> GeneratorConfig:
    base = dict(epochs=1.0, lr=1e-2, batch_size=4, max_new_tokens=12, max_rounds=2, samples_per_round=4, keep=3)
    return GeneratorConfig(**{**base, **kw})


# ---- parsing and selection -------------------------------------------------------------------------

def test_parse_generation_cases():
    assert parse_generation("Answer the question. __inp__ What is two plus two?") == "What is two plus two?"
    assert parse_generation("__inp__   spaced out \n") == "spaced out"
    assert parse_generation("no separator here") is None
    assert parse_generation("definition __inp__   ") is None  # empty after the separator
    assert parse_generation("def __inp__") is None
    assert parse_generation("d __inp__ " + "x" * 11, max_chars=10) is None
    assert parse_generation("d __inp__ " + "x" * 10, max_chars=10) == "x" * 10
    # a generator repeating the pattern: cut at the next separator
    assert parse_generation("d __inp__ first __inp__ second") == "first"
    assert parse_generation("d <s> first", separator="<s>") == "first"


def test_generator_target_format():
    assert generator_target("Answer it.", " the cat ") == "Answer it. __inp__ the cat"
    assert generator_target("", "the cat") == "__inp__ the cat"
    assert parse_generation(generator_target("Answer it.", "the cat")) == "the cat"


def test_select_deduplicates_and_counts():
    cands = ["d __inp__ a", "d __inp__ a ", "nothing", "d __inp__ ", "d __inp__ " + "y" * 50,
             "other def __inp__ b", "d __inp__ c", "d __inp__ d"]
    kept, stats = select_pseudo_inputs(cands, want=2, max_chars=20)
    assert kept == ["a", "b"]
    assert stats == {"tried": 8, "kept": 2, "no_separator": 1, "empty": 1, "too_long": 1,
                     "duplicate": 1, "surplus": 2}
    assert stats["kept"] + sum(stats[r] for r in DROP_REASONS) == stats["tried"]
    kept, stats = select_pseudo_inputs(cands, want=10, max_chars=20)
    assert kept == ["a", "b", "c", "d"] and stats["surplus"] == 0
    assert select_pseudo_inputs([], want=3) == ([], {"tried": 0, "kept": 0, **{r: 0 for r in DROP_REASONS}})


def test_keep_count_rule():
    cfg = GeneratorConfig()
    assert keep_count(cfg, 1000) == 20  # 2%
    assert keep_count(cfg, 10) == 1  # at least 1
    assert keep_count(cfg, 0) == 1
    assert keep_count(cfg, 125) == 3  # 2.5 rounds half up
    assert keep_count(GeneratorConfig(min_keep=5), 100) == 5
    assert keep_count(GeneratorConfig(keep_fraction=0.1), 100) == 10
    assert keep_count(GeneratorConfig(keep=7), 1000) == 7  # absolute override
    assert keep_count(GeneratorConfig(keep=0), 1000) == 0


def test_config_validation():
    with pytest.raises(PetmixError, match="top_k"):
        GeneratorConfig(top_k=0).validate()
    with pytest.raises(PetmixError, match="separator"):
        GeneratorConfig(separator=" ").validate()
    GeneratorConfig().validate()


# ---- generation ------------------------------------------------------------------------------------

def test_generation_on_tiny_model_is_deterministic(tiny_model_path, tmp_path):
    task = make_task()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    cfg = small_cfg()
    inputs, info = generate_pseudo_inputs(tiny_model_path, task, cfg, generator_path=tmp_path / "g.safetensors")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    again, info2 = generate_pseudo_inputs(tiny_model_path, task, cfg)
    assert inputs == again
    assert info["counts"] == info2["counts"] and info["dropped_examples"] == info2["dropped_examples"]

    counts = info["counts"]
    assert info["want"] == 3 and len(inputs) == counts["kept"] <= 3
    assert counts["kept"] + sum(counts[r] for r in DROP_REASONS) == counts["tried"]
    assert counts["tried"] == info["rounds"] * cfg.samples_per_round
    if len(inputs) < info["want"]:  # a tiny random model rarely writes the separator: the stats say why
        assert info["rounds"] == cfg.max_rounds
        assert counts["no_separator"] + counts["empty"] + counts["too_long"] + counts["duplicate"] > 0
        assert f"kept {len(inputs)} of 3" in info["explanation"]
    assert info["settings"]["top_k"] == 20 and info["settings"]["repetition_penalty"] == 2.5
    assert set(info["timings"]) == {"train_s", "sample_s"}
    assert info["generator"]["steps"] == 2 and info["n_generator_train"] == 6
    # the generator's weights, saved only because a path was given: one block of rank 8
    state = load_file(tmp_path / "g.safetensors")
    assert state and all(v.shape[0 if k.endswith(".A") else 1] == 8 for k, v in state.items())


def test_generator_learns(tiny_model_path):
    # Loss goes down on a fixed batch: the generator's block trains (and only it can: the backbone is frozen).
    task = make_task(n=4, definition="")
    _, info = generate_pseudo_inputs(tiny_model_path, task, small_cfg(epochs=6, max_rounds=1))
    assert info["generator"]["final_loss"] < info["generator"]["first_loss"]


def test_sampling_rounds_keep_wanted_number(monkeypatch, tiny_llama_path):
    task = make_task()
    calls = []

    def fake_round(backbone, mix, cfg, round_index, prefix=""):
        calls.append(round_index)
        # each round: one duplicate of an earlier round, one malformed, one copy of a real input, one new
        return ["d __inp__ r0 x", "garbage", f"d __inp__ {task.train[round_index].input}", f"d __inp__ new {round_index}"]

    monkeypatch.setattr(gen, "sample_round", fake_round)
    inputs, info = generate_pseudo_inputs(tiny_llama_path, task, small_cfg(keep=None, max_rounds=8),
                                          n_train=200)
    assert info["want"] == 4 and info["n_train"] == 200  # 2% of the task's full train size and calls == [0, 1]
    assert inputs == ["r0 x", "the cat 0", "new 0", "the cat 1"]
    c = info["counts"]
    assert (c["tried"], c["kept"], c["no_separator"], c["duplicate"], c["surplus"]) == (8, 4, 2, 1, 1)
    assert c["copies_of_real"] == 2


def test_nothing_returned_without_separator(monkeypatch, tiny_t5_path):
    monkeypatch.setattr(gen, "sample_round", lambda backbone, mix, cfg, i, prefix="": ["just some text", "more text", ""])
    inputs, info = generate_pseudo_inputs(tiny_t5_path, make_task(), small_cfg(max_rounds=3))
    assert inputs == []
    assert info["rounds"] == 3
    assert info["counts"]["tried"] == 9 and info["counts"]["no_separator"] == 9 and info["counts"]["kept"] == 0
    assert "9 no separator" in info["explanation"]


def test_empty_task_is_an_error(tiny_llama_path):
    task = make_task()
    task.train = []
    with pytest.raises(PetmixError, match="no training inputs"):
        generate_pseudo_inputs(tiny_llama_path, task, small_cfg())


# ---- run directory ---------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    assert load_pseudo_inputs(tmp_path, "toy") is None
    inputs = ["first input", "zweite Eingabe \u00e9", "line\nbreak"]
    info = {"task": "toy", "counts": {"kept": 3}}
    save_pseudo_inputs(tmp_path, "toy", inputs, info)
    assert load_pseudo_inputs(tmp_path, "toy") == inputs
    assert load_pseudo_info(tmp_path, "toy") == info
    assert (tmp_path / "pseudo" / "toy.jsonl").read_text(encoding="utf-8").count("\n") == 3
    save_pseudo_inputs(tmp_path, "empty", [], {})
    assert load_pseudo_inputs(tmp_path, "empty") == []
    assert not [p for p in (tmp_path / "pseudo").iterdir() if p.name.startswith(".")]  # no temp files left


def test_parse_tolerates_garbled_separator_and_drops_punctuation():
    from petmix.replay.generator import parse_generation

    assert parse_generation("Definition: x __inp _ the cat sat") == "the cat sat"
    assert parse_generation("def _ _inp__ yes") == "yes"
    assert parse_generation("def __inp__ .") is None
    assert parse_generation("def inp yes") is None


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_forced_prefix_starts_every_sample(family, tiny_llama_path, tiny_t5_path):
    from petmix.backbone import load_backbone
    from petmix.blocks.lora import LoRAConfig
    from petmix.mixture import Mixture

    backbone = load_backbone(str(tiny_llama_path if family == "causal" else tiny_t5_path))
    mix = Mixture(backbone, LoRAConfig(r=2), routing="sum")
    mix.add_task()
    cfg = GeneratorConfig(samples_per_round=3, max_new_tokens=4)
    texts = gen.sample_round(backbone, mix, cfg, 0, prefix="Say yes. __inp__")
    assert len(texts) == 3 and all(t.startswith("Say yes. __inp__") for t in texts)
    assert texts == gen.sample_round(backbone, mix, cfg, 0, prefix="Say yes. __inp__")  # seeded
