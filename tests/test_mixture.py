"""LoRA pool, router and mixture: the formulas, against naive computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from petmix.backbone import load_backbone
from petmix.blocks.lora import LoRAConfig, LoRAPool, MixWeights, PooledLoRALinear
from petmix.data.collate import encode_answers, encode_prompts, prompt_batch, training_batch
from petmix.mixture import Mixture
from petmix.router import SharedAttentionRouter, masked_max_pool


def _randomise_blocks(layer: PooledLoRALinear) -> None:
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()  # B starts at zero; give it values so every block matters


def test_lora_init_follows_spec():
    layer = PooledLoRALinear(nn.Linear(16, 12), LoRAConfig(r=4, alpha=32), MixWeights())
    layer.add_block()
    assert layer.lora_A[0].shape == (4, 16) and layer.lora_B[0].shape == (12, 4)
    assert torch.count_nonzero(layer.lora_B[0]) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert layer.lora_A[0].abs().max() <= bound and layer.lora_A[0].abs().max() > 0


def test_batched_mixture_equals_naive_loop():
    torch.manual_seed(0)
    mix = MixWeights()
    cfg = LoRAConfig(r=3, alpha=12)
    layer = PooledLoRALinear(nn.Linear(16, 12), cfg, mix)
    for _ in range(5):
        layer.add_block()
    _randomise_blocks(layer)
    x = torch.randn(4, 7, 16)
    w = torch.softmax(torch.randn(4, 5), dim=-1)
    mix.weights = w
    got = layer(x)
    want = layer.base(x)
    for b in range(4):
        for i in range(5):
            delta = x[b] @ layer.lora_A[i].t() @ layer.lora_B[i].t()
            want[b] = want[b] + w[b, i] * cfg.scaling * delta
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mix.weights = None
    torch.testing.assert_close(layer(x), layer.base(x))  # no weights set: the frozen layer alone


def test_pool_targets_q_v_of_both_families(tiny_llama_path, tiny_t5_path):
    llama = load_backbone(str(tiny_llama_path))
    pool = LoRAPool(llama.model, LoRAConfig(), llama.family)
    assert sorted({n.rsplit(".", 1)[-1] for n in pool.layers}) == ["q_proj", "v_proj"]
    assert len(pool.layers) == 2 * llama.model.config.num_hidden_layers
    t5 = load_backbone(str(tiny_t5_path))
    pool = LoRAPool(t5.model, LoRAConfig(), t5.family)
    # encoder self-attention (2 layers) + decoder self- and cross-attention (2 layers each), q and v each
    assert len(pool.layers) == 2 * (2 + 2 * 2)
    assert any("EncDecAttention.q" in n for n in pool.layers)


def test_router_matches_hand_computation():
    torch.manual_seed(0)
    d = 8
    router = SharedAttentionRouter(d, hidden=5)
    for _ in range(3):
        router.add_key()
    embeds = torch.randn(2, 6, d)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    embeds[0, 4:] = 1e4  # padding must never win the max-pool
    got = router(embeds, mask)
    w_down, w_up, _, ln = router.query
    pooled = torch.stack([embeds[0, :4].max(0).values, embeds[1].max(0).values])
    q = nn.functional.layer_norm(nn.functional.silu(pooled @ w_down.weight.t() @ w_up.weight.t()), (d,),
                                 ln.weight, ln.bias)
    keys = torch.stack(list(router.keys))
    want = torch.softmax(q @ keys.t() / math.sqrt(d), dim=-1)
    torch.testing.assert_close(got, want)
    assert torch.allclose(got.sum(-1), torch.ones(2))
    assert router(embeds, mask, num_tasks=2).shape == (2, 2)
    assert torch.all(keys.abs() <= 1)  # keys start uniform(-1, 1)
    torch.testing.assert_close(masked_max_pool(embeds, mask), pooled)


def test_router_weights_same_in_training_and_selection(tiny_model_path):
    """The weights that train a block are exactly the ones that select it at test time: same
    module, input tokens only (answer tokens and padding never change them)."""
    backbone = load_backbone(str(tiny_model_path))
    mix = Mixture(backbone, LoRAConfig(), "attention")
    for _ in range(3):
        mix.add_task()
    tok = backbone.tokenizer
    prompts = ["Input: the cat sat\nOutput: ", "Input: two plus two, a longer question here?\nOutput: "]
    p_ids = encode_prompts(tok, prompts, 64)
    a_ids = encode_answers(tok, ["positive", "no"], 8)
    train = training_batch(tok, p_ids, a_ids, backbone.is_seq2seq)
    w_train = mix(train).weights
    gen = prompt_batch(tok, p_ids, left=not backbone.is_seq2seq)
    _, w_select = mix.prepare_fn()(gen)
    mix.clear_weights()
    torch.testing.assert_close(w_train, w_select)
    alone = prompt_batch(tok, p_ids[:1], left=True)
    torch.testing.assert_close(mix.prepare_fn()(alone)[1], w_select[:1])  # batch-mates do not matter
    mix.clear_weights()


def test_mixture_routing_rules(tiny_llama_path):
    backbone = load_backbone(str(tiny_llama_path))
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    summed = Mixture(backbone, LoRAConfig(), "sum")
    summed.add_task()
    summed.add_task()
    assert summed.weights_for(ids, mask).tolist() == [[1.0, 1.0]]
    task = Mixture(load_backbone(str(tiny_llama_path)), LoRAConfig(), "task")
    task.add_task()
    task.add_task()
    assert task.weights_for(ids, mask, task_index=1).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError):
        task.weights_for(ids, mask)


def test_adapter_state_round_trip(tiny_llama_path):
    a = Mixture(load_backbone(str(tiny_llama_path)), LoRAConfig(), "attention")
    for _ in range(2):
        a.add_task()
    for layer in a.pool.layers.values():
        _randomise_blocks(layer)
    b = Mixture(load_backbone(str(tiny_llama_path)), LoRAConfig(), "attention")
    b.load_adapter_state(a.adapter_state())
    assert b.num_blocks == 2 and b.router.num_keys == 2
    for k, v in a.adapter_state().items():
        assert torch.equal(v, b.adapter_state()[k]), k
