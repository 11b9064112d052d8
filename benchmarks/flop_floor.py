"""The fewest multiply-adds issue 13's comparisons allow: ratios of FLOP counts, not of times.

A step ratio can only drop below the ratio of the work the two steps must do by doing less work, i.e. by
changing the numerics (lower precision, skipped blocks). This counts that work for a decoder-only model
from its config: every linear layer of the frozen body forward (2 FLOP per weight per token) and
backward to its input (the same again: frozen weights get no weight gradient), causal attention forward
and backward, the LM head at the positions where logits are computed, and LoRA blocks of rank r on the
target projections (forward; backward to the input and to the router weight, about the forward again;
the training block's weight gradient once more). Elementwise work (norms, softmax, optimizer) is left
out: it only adds to both sides.

    .venv/bin/python benchmarks/flop_floor.py [--model smollm2-135m] [--batch 8x256] [--labelled 16]

prints (a) petmix's step with 15 blocks (logits at labelled positions only) over PEFT's with one
adapter (logits at every position, as ``model(**batch, labels=...)`` computes them); (c) the step with 100
blocks over the step with 1; (b) for generation, how much PEFT's mixed-adapter batch must cost over its
single adapter for routed generation (which does at least the single adapter's work) to be 1.2x faster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def model_config(model: str) -> dict[str, Any]:
    path = Path(model)
    if not path.is_dir():
        from petmix.backbone import load_backbone

        return load_backbone(model).model.config.to_dict()
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def counts(cfg: dict[str, Any], seq: int, r: int = 4, targets: tuple[str, ...] = ("q", "v")) -> dict[str, float]:
    """FLOP per token of each part (forward + backward to inputs) for one sequence length."""
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or d // heads
    out = {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim}
    linear = d * (out["q"] + out["k"] + out["v"]) + heads * head_dim * d + 3 * d * f  # q k v o + gated MLP
    body = 2 * 2 * linear * layers  # forward, backward to inputs
    context = (seq + 1) / 2  # causal: a token attends to half the sequence on average
    body += 3 * 2 * 2 * context * heads * head_dim * layers  # QK^T and AV, forward + 2x backward
    lora_per_rank = sum(d + out[t] for t in targets) * layers  # A: d -> r, B: r -> out, per unit of rank
    return {"body": body, "head": 2 * 2 * d * cfg["vocab_size"], "lora_rank": 2 * 2 * lora_per_rank,
            "lora_rank_fwd": 2 * lora_per_rank, "r": r}


def step_flop(c: dict[str, float], tokens: int, head_positions: float, blocks: int) -> float:
    """One training step: the body for every token, the head where logits are computed, ``blocks`` LoRA
    blocks (the newest one also gets its weight gradient)."""
    lora = c["lora_rank"] * c["r"] * blocks + c["lora_rank_fwd"] * c["r"]
    return tokens * (c["body"] + lora) + head_positions * c["head"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", default="8x256", help="BxS")
    parser.add_argument("--labelled", type=float, default=16, help="labelled positions per sequence (a mean)")
    parser.add_argument("--r", type=int, default=4)
    args = parser.parse_args()
    b, s = (int(x) for x in args.batch.split("x"))
    c = counts(model_config(args.model), s, args.r)
    tokens = b * s
    peft = step_flop(c, tokens, tokens, 1)
    ours = {n: step_flop(c, tokens, b * args.labelled, n) for n in (1, 15, 100)}
    print(f"model {args.model}; batch {b}x{s}, {args.labelled} labelled positions per sequence; LoRA r {args.r} on q, v")
    print(f"per token: body {c['body'] / 1e6:.1f} MFLOP, LM head {c['head'] / 1e6:.1f} MFLOP per position with logits, "
          f"one LoRA block {c['lora_rank'] * c['r'] / 1e6:.2f} MFLOP")
    print(f"(a) step, petmix 15 blocks / PEFT 1 adapter: {ours[15] / 1e9:.0f} / {peft / 1e9:.0f} GFLOP = {ours[15] / peft:.3f}x "
          f"(target <= 0.67x)")
    print(f"(c) step, petmix 100 blocks / 1 block: {ours[100] / 1e9:.0f} / {ours[1] / 1e9:.0f} GFLOP = "
          f"{ours[100] / ours[1]:.3f}x (target <= 1.2x)")
    print("(b) routed generation does at least PEFT's single-adapter work, so being 1.2x faster than PEFT's "
          "mixed batch needs that batch to cost >= 1.2x PEFT's single adapter, or petmix to beat the single adapter")


if __name__ == "__main__":
    main()
