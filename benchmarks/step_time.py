"""Training-step time of SAPT-LoRA with 1, 5, 15 and 50 blocks in the pool (same batch).

The mixture runs as two matmuls over the blocks concatenated along the rank axis, so the cost of a
step should grow little with the pool. Usage:

    .venv/bin/python benchmarks/step_time.py [--model smollm2-135m] [--blocks 1,5,15,50] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from petmix.backbone import load_backbone
from petmix.blocks.lora import LoRAConfig
from petmix.methods import get_method
from petmix.mixture import Mixture


def step_times(model: str, blocks: int, batch: dict, reps: int, bf16: bool) -> list[float]:
    backbone = load_backbone(model)
    mix = Mixture(backbone, LoRAConfig(r=4, alpha=32), "attention")
    method = get_method("sapt-lora")
    for t in range(blocks):
        trainable = method.begin_task(mix, t)  # the last block trains, the others are frozen
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = mix(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="1,5,15,50")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/step_time.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    b, s = args.batch_size, args.seq_len
    vocab = load_backbone(args.model).describe()["vocab_size"]
    ids = torch.randint(min(100, vocab - 1), vocab, (b, s))
    labels = ids.clone()
    labels[:, : s * 3 // 4] = -100  # loss on the last quarter (the answer), as in training
    source = torch.zeros_like(ids)
    source[:, : s * 3 // 4] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "source_mask": source}
    rows = []
    for n in [int(x) for x in args.blocks.split(",")]:
        t = step_times(args.model, n, batch, args.reps, args.bf16)
        rows.append({"blocks": n, "median_s": statistics.median(t), "times_s": [round(x, 4) for x in t]})
    base = rows[0]["median_s"]
    print(f"model {args.model}, batch {b} x {s} tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"median of {args.reps} steps (forward, backward, AdamW)")
    print("| blocks | step (s) | ratio to 1 block |\n|---|---|---|")
    for r in rows:
        r["ratio"] = r["median_s"] / base
        print(f"| {r['blocks']} | {r['median_s']:.3f} | {r['ratio']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
