"""SPoT (DESIGN.md sections 2 and 3): source-prompt transfer, which chooses what a target prompt starts
from.

SPoT (Vu et al., ACL 2022): a probe prompt is trained briefly on the target task from the usual
initialisation; the source prompt whose average token has the highest cosine similarity with the
probe's is the target prompt's initialisation; then the target prompt trains for the full budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from petmix.blocks.prompt import load_prompt_file
from petmix.methods.base import Method, StageHook, register_method, setting
from petmix.runs import read_json, write_json

if TYPE_CHECKING:
    from petmix.methods.base import Stage

log = logging.getLogger(__name__)


@dataclass
class SPoTOptions:
    spot_probe_steps: int = setting(10, "spot: steps of the probe prompt that picks the source", ge=1)


def prompt_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the average tokens of two prompts ``[L, d]`` (SPoT's task similarity)."""
    return float(torch.nn.functional.cosine_similarity(a.float().mean(0), b.float().mean(0), dim=0))


def most_similar(probe: torch.Tensor, sources: dict[str, torch.Tensor]) -> tuple[str, dict[str, float]]:
    scores = {name: prompt_similarity(probe, p) for name, p in sources.items()}
    return max(scores, key=scores.__getitem__), scores


class SourceTransfer(StageHook):
    name = "spot"

    def __init__(self, run_dir: Path, sources: list[Path], probe_steps: int):
        if not sources:
            raise ValueError("spot needs source prompts (--sources LIBRARY_DIR or prompt files)")
        self.path = Path(run_dir) / "spot.json"
        self.sources = {p.stem: load_prompt_file(p) for p in sources}
        self.probe_steps = probe_steps
        self.choices: dict[str, Any] = read_json(self.path) if self.path.is_file() else {}

    def prepare_stage(self, trainer: Stage, stage: int) -> None:
        task = trainer.tasks[stage]
        if task.name in self.choices:  # a resumed stage: its block (already transferred) was restored
            return
        block = trainer.mix.pool.prompts[trainer.mix.num_blocks - 1]
        for name, p in self.sources.items():
            if p.shape != block.shape:
                raise ValueError(f"source prompt {name} has shape {tuple(p.shape)}, the target {tuple(block.shape)}: "
                                 "set prompt_length to the sources' length")
        probe = self._probe(trainer, stage, block)
        name, scores = most_similar(probe, self.sources)
        with torch.no_grad():
            block.copy_(self.sources[name].to(block.device))
        self.choices[task.name] = {"source": name, "similarity": scores, "probe_steps": self.probe_steps}
        if trainer.main:
            write_json(self.path, self.choices)
        log.info("SPoT: %s starts from source prompt %s (cosine %.3f)", task.name, name, scores[name])

    def _probe(self, trainer: Stage, stage: int, block: torch.nn.Parameter) -> torch.Tensor:
        """Train the task's freshly initialised prompt for a few steps; return it."""
        task = trainer.tasks[stage]
        examples = trainer.splits[task.name][0]
        prompts, answers = trainer.encode(examples, [task], [0] * len(examples))
        opt = torch.optim.AdamW([block], lr=trainer.cfg.lr, weight_decay=0.0)
        bs = trainer.cfg.batch_size
        g = torch.Generator().manual_seed(trainer.cfg.seed + 7919 * stage)
        for _ in range(self.probe_steps):
            idx = torch.randperm(len(examples), generator=g)[:bs].tolist()
            batch = trainer.batch([prompts[i] for i in idx], [answers[i] for i in idx])
            with trainer.accelerator.autocast():
                loss = trainer.mix(batch, trainer.method.routing_index(stage)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return block.detach().clone()

    def after_stage(self, trainer: Stage, stage: int) -> dict[str, Any]:
        choice = self.choices.get(trainer.tasks[stage].name, {})
        return {"spot_source": choice.get("source"), "spot_similarity": choice.get("similarity")}


register_method(Method(
    "spot", "task", True, block="prompt", independent=True, needs_sources=True, options=SPoTOptions,
    hooks=(lambda trainer, o: SourceTransfer(trainer.out, trainer.sources, o.spot_probe_steps),),
    summary="prompt tuning from the source prompt most similar to a briefly trained probe prompt "
            "(cosine of average tokens)",
    paper="Vu et al., ACL 2022 (SPoT)"))
