"""Where one training step's time goes: petmix sapt-lora (15 blocks) against PEFT LoRA (1 adapter), on the
second task's first real training batch of the SuperNI stream, with torch.profiler (issue 13). Same
process, one warm-up step each; prints each profile's top operators by self CPU time. Usage:

    PYTHONPATH=src .venv/bin/python benchmarks/profile_step.py [--data ../shared/data/CL_Benchmark] [--rows 14]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import vs_peft as V  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="benchmarks/configs/superni5_cpu.yaml")
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=14)
    args = ap.parse_args()
    cfg, tasks = V.stream(args.config, args.data)
    mix, opt = V.petmix_pool(args.model, 15)
    pm = V.peft_model(args.model)
    popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    batch = V.real_batches(mix.backbone, cfg, tasks[:2])[1]
    print(f"batch {tuple(batch['input_ids'].shape)}, {int((batch['labels'] != -100).sum())} positions labelled")
    steps = {"petmix sapt-lora, 15 blocks": (V.mix_forward(mix), opt), "PEFT LoRA, 1 adapter": (V.peft_forward(pm), popt)}
    for forward, optimizer in steps.values():  # warm-up
        forward(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, (forward, optimizer) in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        print(name)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
