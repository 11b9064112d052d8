"""EWC (Kirkpatrick et al., PNAS 2017): one LoRA trained in sequence with the penalty
``lambda/2 * sum_k F_k (theta - theta*_k)^2``; ``F_k`` is the diagonal empirical Fisher after task k.
The online variant (Schwarz et al., 2018) keeps one anchor and ``F = gamma F_old + F_new``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from petmix.methods.base import Method, StageHook, register_method, setting
from petmix.runs import load_tensors as load_file
from petmix.runs import save_tensors

if TYPE_CHECKING:
    from petmix.methods.base import Stage


@dataclass
class EWCOptions:
    ewc_lambda: float = setting(5000.0, "ewc: penalty weight", ge=0)
    ewc_online: bool = setting(False, "ewc: online EWC (one anchor, decayed sum of Fisher terms)")
    ewc_gamma: float = setting(1.0, "ewc: online EWC's decay of earlier Fisher terms", ge=0, le=1)
    ewc_fisher_batches: int = setting(8, "ewc: batches of the task's training data the Fisher is averaged over", ge=1)


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

    def loss(self, trainer: Stage, micro_batch: int, output: Any) -> torch.Tensor | None:
        if not self.anchors:
            return None
        return self.penalty(trainer.mix.pool.block_parameters(0))

    def add_task(self, stage: int, params: list[torch.Tensor], fisher: list[torch.Tensor]) -> None:
        self.anchors[stage] = ([p.detach().clone() for p in params], fisher)

    def after_stage(self, trainer: Stage, stage: int) -> dict[str, Any]:
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


def diagonal_fisher(trainer: Stage, stage: int, params: list[torch.Tensor], batches: int) -> list[torch.Tensor]:
    """Empirical diagonal Fisher: mean over batches of the squared gradient of the task loss."""
    fisher = [torch.zeros_like(p) for p in params]
    examples = trainer.splits[trainer.tasks[stage].name][0]
    bs = trainer.cfg.batch_size
    n = 0
    for b in range(min(batches, (len(examples) + bs - 1) // bs)):
        chunk = examples[b * bs:(b + 1) * bs]
        prompts, answers = trainer.encode(chunk, [trainer.tasks[stage]], [0] * len(chunk))
        batch = trainer.batch(prompts, answers)
        with trainer.accelerator.autocast():
            loss = trainer.mix(batch).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f += g.detach().float() ** 2
        n += 1
    return [f / max(n, 1) for f in fisher]


register_method(Method(
    "ewc", "sum", False, options=EWCOptions, tuned_option=("ewc_lambda", (500.0, 5000.0, 50000.0)),
    hooks=(lambda trainer, o: ElasticWeightConsolidation(trainer.out, o.ewc_lambda, o.ewc_online, o.ewc_gamma,
                                                         o.ewc_fisher_batches),),
    summary="one LoRA in sequence with a Fisher-weighted penalty toward each earlier task's weights",
    paper="Kirkpatrick et al., PNAS 2017"))
