"""Continual-learning baselines as hooks on the shared loop (DESIGN.md section 4).

- O-LoRA (Wang et al., EMNLP 2023 Findings): a new LoRA per task, all summed at test time; while task t
  trains, ``lambda1 * sum_i |A_t A_i^T|`` (entrywise absolute sum, over every layer and earlier task i)
  keeps the new block's subspace orthogonal to the earlier ones, plus an optional ``lambda2 * ||block_t||^2``.
- EWC (Kirkpatrick et al., PNAS 2017): one LoRA trained in sequence with the penalty
  ``lambda/2 * sum_k F_k (theta - theta*_k)^2``; ``F_k`` is the diagonal empirical Fisher after task k.
  The online variant (Schwarz et al., 2018) keeps one anchor and ``F = gamma F_old + F_new``.
- Replay: one LoRA trained in sequence, with real examples of earlier tasks kept in a buffer and mixed
  into every batch. Unlike SAPT's ARM it keeps real data: it is a different setting, said in its outputs.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from petmix.data.collate import training_batch
from petmix.methods.base import StageHook
from petmix.runs import read_json, save_tensors, write_json

if TYPE_CHECKING:
    from petmix.train import Trainer

log = logging.getLogger(__name__)


def orthogonality_loss(new_a: list[torch.Tensor], old_a: list[list[torch.Tensor]]) -> torch.Tensor:
    """sum over layers l and earlier blocks i of sum |A_new[l] A_i[l]^T| (O-LoRA's L_orth)."""
    total = new_a[0].new_zeros(())
    for layer, a_new in enumerate(new_a):
        for blocks in old_a:
            total = total + (a_new @ blocks[layer].t()).abs().sum()
    return total


class OrthogonalLoRA(StageHook):
    name = "orthogonality"

    def __init__(self, lambda1: float, lambda2: float):
        self.lambda1, self.lambda2 = lambda1, lambda2

    def loss(self, trainer: Trainer, micro_batch: int) -> torch.Tensor | None:
        pool = trainer.mix.pool
        t = pool.num_blocks - 1
        layers = list(pool.layers.values())
        new_a = [layer.lora_A[t] for layer in layers]
        total = None
        if t > 0 and self.lambda1 > 0:
            old_a = [[layer.lora_A[i].detach() for layer in layers] for i in range(t)]
            total = self.lambda1 * orthogonality_loss(new_a, old_a)
        if self.lambda2 > 0:
            l2 = sum((p ** 2).sum() for p in pool.block_parameters(t))
            total = self.lambda2 * l2 if total is None else total + self.lambda2 * l2
        return total


class ElasticWeightConsolidation(StageHook):
    name = "ewc"

    def __init__(self, run_dir: Path, lam: float, online: bool, gamma: float, fisher_batches: int):
        self.path = Path(run_dir) / "ewc.safetensors"
        self.lam, self.online, self.gamma, self.fisher_batches = lam, online, gamma, fisher_batches
        # stage -> (theta*, F); keyed by stage so that a resumed stage cannot add its anchor twice
        self.anchors: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        if self.path.is_file():
            saved = load_file(self.path)
            for key in {k.split(".")[1] for k in saved}:
                n = sum(1 for k in saved if k.startswith(f"anchor.{key}."))
                self.anchors[int(key)] = ([saved[f"anchor.{key}.{i}"] for i in range(n)],
                                          [saved[f"fisher.{key}.{i}"] for i in range(n)])

    def terms(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """(anchor, Fisher) pairs of the penalty: one per task, or one (online: latest anchor, decayed sum of F)."""
        stages = sorted(self.anchors)
        if not self.online or not stages:
            return [self.anchors[k] for k in stages]
        fisher = [torch.zeros_like(f) for f in self.anchors[stages[0]][1]]
        for k in stages:
            fisher = [self.gamma * acc + f for acc, f in zip(fisher, self.anchors[k][1])]
        return [(self.anchors[stages[-1]][0], fisher)]

    def penalty(self, params: list[torch.Tensor]) -> torch.Tensor:
        total = params[0].new_zeros(())
        for anchor, fisher in self.terms():
            for p, a, f in zip(params, anchor, fisher):
                total = total + (f.to(p.device) * (p - a.to(p.device)) ** 2).sum()
        return 0.5 * self.lam * total

    def loss(self, trainer: Trainer, micro_batch: int) -> torch.Tensor | None:
        if not self.anchors:
            return None
        return self.penalty(trainer.mix.pool.block_parameters(0))

    def add_task(self, stage: int, params: list[torch.Tensor], fisher: list[torch.Tensor]) -> None:
        self.anchors[stage] = ([p.detach().clone() for p in params], fisher)

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        params = trainer.mix.pool.block_parameters(0)
        fisher = diagonal_fisher(trainer, stage, params, self.fisher_batches)
        self.add_task(stage, params, fisher)
        if trainer.main:
            tensors = {}
            for k, (anchor, fish) in self.anchors.items():
                tensors.update({f"anchor.{k}.{i}": a.cpu().contiguous() for i, a in enumerate(anchor)})
                tensors.update({f"fisher.{k}.{i}": f.cpu().contiguous() for i, f in enumerate(fish)})
            save_tensors(self.path, tensors)
        return {"fisher_mean": float(sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher))}


def diagonal_fisher(trainer: Trainer, stage: int, params: list[torch.Tensor], batches: int) -> list[torch.Tensor]:
    """Empirical diagonal Fisher: mean over batches of the squared gradient of the task loss."""
    fisher = [torch.zeros_like(p) for p in params]
    examples = trainer.splits[trainer.tasks[stage].name][0]
    bs = trainer.cfg.batch_size
    n = 0
    for b in range(min(batches, (len(examples) + bs - 1) // bs)):
        chunk = examples[b * bs:(b + 1) * bs]
        prompts, answers = trainer.encode(chunk, [trainer.tasks[stage]], [0] * len(chunk))
        batch = training_batch(trainer.backbone.tokenizer, prompts, answers, trainer.backbone.is_seq2seq)
        batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
        with trainer.accelerator.autocast():
            loss, _ = trainer.mix(batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f += g.detach().float() ** 2
        n += 1
    return [f / max(n, 1) for f in fisher]


class ExperienceReplay(StageHook):
    name = "replay"

    def __init__(self, run_dir: Path, per_task: int, per_batch: int, seed: int):
        self.path = Path(run_dir) / "replay_buffer.json"
        self.per_task, self.per_batch, self.seed = per_task, per_batch, seed
        # stage -> [(prompt ids, answer ids)]: real examples kept from each finished task
        self.kept: dict[int, list[tuple[list[int], list[int]]]] = {}
        if self.path.is_file():
            self.kept = {int(k): [tuple(x) for x in v] for k, v in read_json(self.path).items()}

    @property
    def buffer(self) -> list[tuple[list[int], list[int]]]:
        return [ex for k in sorted(self.kept) for ex in self.kept[k]]

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        task = trainer.tasks[stage]
        pool = trainer.splits[task.name][0]
        chosen = random.Random(self.seed + stage).sample(pool, min(self.per_task, len(pool)))
        prompts, answers = trainer.encode(chosen, [task], [0] * len(chosen))
        self.kept[stage] = list(zip(prompts, answers))
        if trainer.main:
            write_json(self.path, {str(k): v for k, v in self.kept.items()})
        return {"replay_buffer": len(self.buffer), "replay": "real examples of earlier tasks (Replay baseline)"}

    def extra_examples(self, micro_batch: int) -> list[tuple[list[int], list[int]]]:
        buffer = self.buffer
        if not buffer or self.per_batch <= 0:
            return []
        start = micro_batch * self.per_batch  # deterministic cycling: a resumed run sees the same batches
        return [buffer[(start + k) % len(buffer)] for k in range(self.per_batch)]
