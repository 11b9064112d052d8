"""Soft-prompt pools: mixing, placement in front of the input, and SAPT with prompt blocks."""

from __future__ import annotations

import pytest
import torch
from test_train import make_tasks

from petmix.backbone import load_backbone
from petmix.blocks.prompt import PromptConfig, PromptPool
from petmix.data.collate import encode_answers, encode_prompts, prompt_batch, training_batch
from petmix.errors import PetmixError
from petmix.mixture import Mixture
from petmix.runs import save_tensors
from petmix.train import TrainConfig, Trainer


def test_prompt_mixing_equals_naive_loop(tiny_llama_path):
    pool = PromptPool(load_backbone(str(tiny_llama_path)), PromptConfig(length=3))
    for _ in range(4):
        pool.add_block()
    w = torch.softmax(torch.randn(5, 4), dim=-1)
    got = pool.mixed(w)
    for b in range(5):
        want = sum(w[b, i] * pool.prompts[i] for i in range(4))
        torch.testing.assert_close(got[b, 0], want)  # depth 1: shallow prompts


def test_prompt_init_from_vocabulary_and_file(tiny_llama_path, tmp_path):
    backbone = load_backbone(str(tiny_llama_path))
    pool = PromptPool(backbone, PromptConfig(length=4, vocab_top=50))
    pool.add_block()
    emb = backbone.model.get_input_embeddings().weight[:50]
    for row in pool.prompts[0]:  # every token is the embedding of one of the first 50 ids
        assert torch.isclose(emb, row).all(-1).any()
    save_tensors(tmp_path / "p.safetensors", {"prompt": torch.full((4, backbone.hidden_size), 0.5)})
    pool = PromptPool(backbone, PromptConfig(length=4, init=str(tmp_path / "p.safetensors")))
    pool.add_block()
    assert torch.all(pool.prompts[0] == 0.5)


def test_residual_encoder_starts_at_the_raw_prompt_and_learns(tiny_llama_path):
    """prompt_encoder_residual: P = P_raw + f(P_raw) with f starting at 0, so the encoded prompt is the raw
    one before training (a plain encoder's is not), and f still gets gradients (its last layer is 0, not
    frozen). The exported prompt has f folded in."""
    backbone = load_backbone(str(tiny_llama_path))
    for kind in ("lstm", "mlp"):
        plain = PromptPool(backbone, PromptConfig(length=3, encoder=kind, encoder_hidden=16))
        plain.add_block()
        assert not torch.allclose(plain.effective(0)[0], plain.prompts[0])
        pool = PromptPool(backbone, PromptConfig(length=3, encoder=kind, encoder_hidden=16, residual=True))
        pool.add_block()
        torch.testing.assert_close(pool.effective(0)[0], pool.prompts[0].detach())
        pool.effective(0).pow(2).sum().backward()
        last = pool.encoders[0].mlp[-1]
        assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
        with torch.no_grad():
            last.bias.fill_(0.25)
        torch.testing.assert_close(pool.export(0), pool.prompts[0].detach() + 0.25)


def test_residual_needs_an_encoder():
    assert TrainConfig.from_dict({"method": "p-tuning", "prompt_encoder_residual": True}, check_files=False)
    with pytest.raises(PetmixError, match="prompt_encoder_residual: prompt-tuning has no prompt encoder"):
        TrainConfig.from_dict({"method": "prompt-tuning", "prompt_encoder_residual": True}, check_files=False)
    assert TrainConfig.from_dict({"method": "prompt-tuning", "prompt_encoder": "mlp",
                                    "prompt_encoder_residual": True}, check_files=False)
    # a LoRA base of compare or tune ignores it, as it ignores prompt_length
    assert TrainConfig.from_dict({"method": "lora", "prompt_encoder_residual": True}, check_files=False)


def test_left_padded_prompt_keeps_positions(tiny_llama_path):
    """A padded row generates exactly what it generates alone: pads stay in front of the prompt."""
    backbone = load_backbone(str(tiny_llama_path))
    mix = Mixture(backbone, PromptConfig(length=3), "sum")
    mix.add_task()
    tok = backbone.tokenizer
    ids = encode_prompts(tok, ["Input: the cat\nOutput: ", "Input: two plus two, longer one?\nOutput: "], 64)
    both = prompt_batch(tok, ids, left=True)
    kwargs, _ = mix.prepare_fn()(both)
    assert kwargs["attention_mask"][0, : both["attention_mask"][0].eq(0).sum()].eq(0).all()
    out_both = backbone.model.generate(**kwargs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    alone, _ = mix.prepare_fn()(prompt_batch(tok, ids[:1], left=True))
    out_alone = backbone.model.generate(**alone, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out_both[0].tolist() == out_alone[0].tolist()


def test_prompt_training_batch_masks_prompt_positions(tiny_model_path):
    backbone = load_backbone(str(tiny_model_path))
    mix = Mixture(backbone, PromptConfig(length=2), "attention")
    mix.add_task()
    tok = backbone.tokenizer
    batch = training_batch(tok, encode_prompts(tok, ["say yes"], 32), encode_answers(tok, ["yes"], 4),
                           backbone.is_seq2seq)
    out = mix(batch)
    loss, weights = out.loss, out.weights
    assert torch.isfinite(loss) and weights.shape == (1, 1)
    loss.backward()
    assert mix.pool.prompts[0].grad is not None


def test_sapt_prompt_trains_one_prompt_per_task(tiny_model_path, tmp_path):
    cfg = TrainConfig(method="sapt-prompt", model=str(tiny_model_path), batch_size=4, lr=5e-3, max_new_tokens=2,
                      prompt_length=2, replay_source="real")
    res = Trainer(cfg, make_tasks(2), tmp_path / "run").run()
    from safetensors.torch import load_file

    s1 = load_file(tmp_path / "run" / "checkpoints" / "stage-1.safetensors")
    s2 = load_file(tmp_path / "run" / "checkpoints" / "stage-2.safetensors")
    assert set(s2) >= {"prompt.0", "prompt.1", "router.keys.1"}
    assert torch.equal(s1["prompt.0"], s2["prompt.0"])  # the first prompt is frozen in stage 2
    assert res["trainable_params_per_task"] > 0 and len(res["matrix"]) == 2
