"""Learning-rate check for prompt tuning on the default model (docs/results.md quotes it).

Prompt tuning (20 tokens) on Amazon and RTE, 32 training examples, 4 epochs of batch 8 (16 steps),
40 test examples, bf16, at lr 3e-3, 3e-2 and 1e-1. Run: .venv/bin/python benchmarks/prompt_lr.py
"""

import time

from petmix.data.loaders import load_tasks
from petmix.train import TrainConfig, Trainer

tasks = load_tasks(["amazon", "rte"], "../shared/data/CL_Benchmark", max_train=32, max_test=40, seed=0)
for lr in (3e-3, 3e-2, 1e-1):
    started = time.time()
    cfg = TrainConfig(method="prompt-tuning", batch_size=8, epochs=4, lr=lr, bf16=True, max_source_len=192,
                      max_target_len=8, max_new_tokens=6, prompt_length=20, heldout_fraction=0.01, eval_batch_size=20)
    r = Trainer(cfg, tasks, f"runs/prompt-lr/{lr}").run()
    print(f"lr {lr}: amazon {r['matrix'][0][0]}, rte {r['matrix'][1][1]} ({time.time() - started:.0f} s)", flush=True)
