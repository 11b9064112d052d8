"""Replay: one LoRA (or the full backbone) trained in sequence, with real examples of earlier tasks kept
in a buffer and mixed into every batch. Unlike SAPT's ARM it keeps real data: it is a different setting,
said in its outputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petmix.data.task import Example
from petmix.methods.base import Method, StageHook, register_method, setting
from petmix.runs import read_json, write_json

if TYPE_CHECKING:
    from petmix.methods.base import Stage


BUFFER_PER_BATCH_HELP = "replay, lfpt5: buffer (pseudo-)examples added to every micro-batch"


@dataclass
class ReplayOptions:
    buffer_per_task: int = setting(16, "replay: real examples kept per finished task", ge=0)
    buffer_total: int | None = setting(None, "replay: one budget shared equally by the finished tasks "
                                             "(instead of per task)", ge=1)
    buffer_sampling: str = setting("random", "replay: random (default) or balanced (round-robin over the answers)",
                                   choices=("random", "balanced"))
    buffer_per_batch: int = setting(2, BUFFER_PER_BATCH_HELP, ge=0)


def replay_hook(trainer: Stage, o: ReplayOptions) -> ExperienceReplay:
    return ExperienceReplay(trainer.out, o.buffer_per_task, o.buffer_per_batch, trainer.cfg.seed, o.buffer_total,
                            o.buffer_sampling)


class ExperienceReplay(StageHook):
    """A buffer of real examples of finished tasks, ``per_batch`` of them added to every micro-batch.

    Size: ``per_task`` examples of each task, or (``total``) a fixed budget shared equally by the tasks
    seen so far, earlier tasks giving up examples as new ones arrive. Sampling: ``random`` (uniform) or
    ``balanced`` (round-robin over the task's distinct answers, so rare labels are kept too).
    """

    name = "replay"

    def __init__(self, run_dir: Path, per_task: int, per_batch: int, seed: int, total: int | None = None,
                 sampling: str = "random"):
        if sampling not in ("random", "balanced"):
            raise ValueError(f"buffer sampling must be random or balanced, not {sampling!r}")
        self.path = Path(run_dir) / "replay_buffer.json"
        self.per_task, self.per_batch, self.seed = per_task, per_batch, seed
        self.total, self.sampling = total, sampling
        # stage -> [(prompt ids, answer ids)]: real examples kept from each finished task
        self.kept: dict[int, list[tuple[list[int], list[int]]]] = {}
        if self.path.is_file():
            self.kept = {int(k): [tuple(x) for x in v] for k, v in read_json(self.path).items()}

    @property
    def buffer(self) -> list[tuple[list[int], list[int]]]:
        return [ex for k in sorted(self.kept) for ex in self.kept[k]]

    def choose(self, examples: list[Example], k: int, stage: int) -> list[Example]:
        rng = random.Random(self.seed + stage)
        k = min(k, len(examples))
        if self.sampling == "random":
            return rng.sample(examples, k)
        by_label: dict[str, list[Example]] = {}
        for ex in rng.sample(examples, len(examples)):
            by_label.setdefault(ex.outputs[0], []).append(ex)
        groups, chosen = list(by_label.values()), []
        while len(chosen) < k:
            for group in groups:
                if group and len(chosen) < k:
                    chosen.append(group.pop())
        return chosen

    def after_stage(self, trainer: Stage, stage: int) -> dict[str, Any]:
        task = trainer.tasks[stage]
        quota = self.per_task if self.total is None else self.total // (len(self.kept) + 1)
        chosen = self.choose(trainer.splits[task.name][0], quota, stage)
        prompts, answers = trainer.encode(chosen, [task], [0] * len(chosen))
        if self.total is not None:  # earlier tasks shrink to the new equal share (their first examples stay)
            self.kept = {k: v[:quota] for k, v in self.kept.items()}
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


register_method(
    Method("replay", "sum", False, options=ReplayOptions, hooks=(replay_hook,),
           summary="one LoRA in sequence, real examples of earlier tasks mixed into every batch"),
    Method("replay-ft", "sum", False, block="full", options=ReplayOptions, hooks=(replay_hook,),
           summary="full fine-tuning in sequence, real examples of earlier tasks mixed into every batch"),
)
