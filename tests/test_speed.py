"""The fast paths (head on labelled positions only, cached and split LoRA mixture) against the plain ones."""

from __future__ import annotations

import pytest
import torch

from petmix.backbone import load_backbone
from petmix.blocks.lora import LoRAConfig, PooledLoRALinear
from petmix.blocks.prompt import PromptConfig
from petmix.data.collate import encode_answers, encode_prompts, length_groups, training_batch
from petmix.evaluate import GenerationConfig, generate
from petmix.mixture import Mixture

PROMPTS = ["Input: What is two plus two?\nOutput:", "the cat sat on the", "positive or negative: yes no true",
           "Given a pair of sentences, identify the relationship:"]
ANSWERS = ["four", "mat summary of the dialogue", "positive", "entailment"]


@pytest.fixture(autouse=True)
def _restore_flags():
    yield
    Mixture.label_only_head = True
    Mixture.min_padding_saving = 0.1
    PooledLoRALinear.fused = True


def _lora_mixture(path, blocks: int = 5, routing: str = "attention") -> Mixture:
    torch.manual_seed(0)
    mix = Mixture(load_backbone(str(path)), LoRAConfig(r=2, alpha=8), routing)
    for _ in range(blocks):
        mix.add_task()
    with torch.no_grad():
        for layer in mix.pool.layers.values():
            for b in layer.lora_B:
                b.normal_(std=0.5)  # B starts at zero; give every block an effect
    for p in mix.parameters():
        p.requires_grad_(False)
    for p in [*mix.pool.block_parameters(blocks - 1), *(mix.router.parameters() if mix.router else [])]:
        p.requires_grad_(True)  # as SAPT: the newest block and the router train, older blocks are frozen
    return mix


def _batch(backbone) -> dict[str, torch.Tensor]:
    tok = backbone.tokenizer
    return training_batch(tok, encode_prompts(tok, PROMPTS, 64), encode_answers(tok, ANSWERS, 16), backbone.is_seq2seq)


def _loss_and_grads(mix: Mixture, batch: dict, fast: bool, task_index=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    Mixture.label_only_head = fast
    PooledLoRALinear.fused = fast
    mix.zero_grad(set_to_none=True)
    loss = mix(batch, task_index).loss
    loss.backward()
    params = [p for p in mix.parameters() if p.requires_grad]
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("routing", ["attention", "task"])
def test_fast_loss_and_gradients_equal_plain(tiny_model_path, routing):
    mix = _lora_mixture(tiny_model_path, routing=routing)
    batch = _batch(mix.backbone)
    task = 4 if routing == "task" else None  # the trainable block
    plain, plain_grads = _loss_and_grads(mix, batch, False, task)
    fast, fast_grads = _loss_and_grads(mix, batch, True, task)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    assert plain_grads and len(fast_grads) == len(plain_grads)
    for f, p in zip(fast_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-6)


def test_fast_loss_under_bf16_autocast(tiny_llama_path):
    mix = _lora_mixture(tiny_llama_path)
    batch = _batch(mix.backbone)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = _loss_and_grads(mix, batch, False)
        fast, _ = _loss_and_grads(mix, batch, True)
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2)


def test_fast_loss_with_prompt_blocks(tiny_llama_path):
    torch.manual_seed(0)
    mix = Mixture(load_backbone(str(tiny_llama_path)), PromptConfig(length=3), "attention")
    for _ in range(3):
        mix.add_task()
    batch = _batch(mix.backbone)
    plain, plain_grads = _loss_and_grads(mix, batch, False)
    Mixture.min_padding_saving = 0.0  # length groups too
    fast, fast_grads = _loss_and_grads(mix, batch, True)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for f, p in zip(fast_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-6)


def test_frozen_cache_follows_weight_changes(tiny_llama_path):
    mix = _lora_mixture(tiny_llama_path, blocks=3)
    batch = _batch(mix.backbone)
    before, _ = _loss_and_grads(mix, batch, True)
    with torch.no_grad():
        for layer in mix.pool.layers.values():
            layer.lora_B[0].mul_(3.0)  # an in-place change to a frozen block (as a load would make)
    after, _ = _loss_and_grads(mix, batch, True)
    plain, _ = _loss_and_grads(mix, batch, False)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routing", ["attention", "task"])
def test_fast_generation_gives_the_same_answers(tiny_model_path, routing):
    mix = _lora_mixture(tiny_model_path, blocks=4, routing=routing)
    mix.eval()
    cfg = GenerationConfig(max_new_tokens=8, batch_size=3)
    task = 1 if routing == "task" else None
    PooledLoRALinear.fused = False
    plain, plain_w = generate(mix.backbone, PROMPTS, cfg, mix.prepare_fn(task))
    PooledLoRALinear.fused = True
    fast, fast_w = generate(mix.backbone, PROMPTS, cfg, mix.prepare_fn(task))
    mix.clear_weights()
    assert fast == plain and fast_w == plain_w
    assert any(fast)


def test_length_groups_cover_every_row_once():
    mask = torch.zeros(6, 10, dtype=torch.long)
    for row, n in enumerate([10, 3, 9, 2, 3, 10]):
        mask[row, :n] = 1
    groups = length_groups(mask, min_saving=0.0)
    assert len(groups) > 1
    rows = torch.cat([r for r, _ in groups]).sort().values
    assert rows.tolist() == list(range(6))
    for r, width in groups:
        assert int(mask[r].sum(1).max()) == width
    assert len(length_groups(mask, min_saving=0.9)) == 1  # not worth it: the batch stays whole
    assert len(length_groups(torch.ones(4, 7), min_saving=0.0)) == 1  # nothing to save


def test_length_groups_give_the_plain_loss_and_gradients(tiny_llama_path):
    mix = _lora_mixture(tiny_llama_path)
    batch = _batch(mix.backbone)
    assert len(length_groups(batch["attention_mask"], 0.0)) > 1
    plain, plain_grads = _loss_and_grads(mix, batch, False)
    Mixture.min_padding_saving = 0.0
    fast, fast_grads = _loss_and_grads(mix, batch, True)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for f, p in zip(fast_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-6)
