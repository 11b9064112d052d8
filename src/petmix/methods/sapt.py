"""SAPT (Zhao et al., ACL 2024): a block per task, weighed by the shared attention router (its kind
``attention`` in ``petmix.router``: shared attentive learning and selection), plus the attentive
reflection module (ARM) below.

After task j is learned, the router's mean weight vector over held-out inputs of task j is stored
as its target. While a later task t trains, pseudo-inputs of every earlier task go through the
router and ``kl_ratio * KL(target_j || current)`` is added to the loss, the target padded with
zeros for tasks j+1..t. Only what the router trains (the query projection and the current key; the
prototype preset: the current key) can receive this gradient: the LoRA blocks are not on the path, and
earlier keys are frozen.

Pseudo-inputs come from stored statistics of the router's input feature (``replay_source="features"``,
petmix's default: pseudo-features, see ``petmix.replay.features``), from a per-task generator
(``replay_source="generated"``, the paper's generative replay) or, as a clearly labelled oracle variant,
from real training inputs (``replay_source="real"``).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from petmix.backbone import Backbone
from petmix.data.collate import encode_prompts, prompt_batch
from petmix.data.task import Example, Task
from petmix.data.templates import format_prompt
from petmix.methods.base import Method, StageHook, register_method, setting
from petmix.mixture import Mixture
from petmix.replay.features import FeatureStats
from petmix.runs import crash_point, read_json, write_json

if TYPE_CHECKING:
    from petmix.methods.base import Stage

log = logging.getLogger(__name__)

REPLAY_SOURCES = ("features", "generated", "real")


@dataclass
class SAPTOptions:
    kl_ratio: float = setting(0.5, "SAPT's attentive reflection weight (0 switches ARM off)", ge=0)
    replay_source: str = setting("features", "ARM pseudo-inputs: features (default: drawn from stored per-task "
                                 "statistics of the router's feature), generated (SAPT's generator) or real "
                                 "(oracle: real stored inputs)", choices=REPLAY_SOURCES)
    replay_batch_size: int = setting(8, "pseudo-inputs per earlier task per reflection step", ge=1)
    replay_every: int = setting(1, "micro-batches between reflection losses", ge=1)

    def uses_heldout(self) -> bool:
        """ARM stores each task's attention targets on its held-out train examples."""
        return self.kl_ratio > 0


def reflection_hook(trainer: Stage, options: SAPTOptions) -> AttentiveReflection | None:
    if options.kl_ratio <= 0:  # kl_ratio 0 switches SAPT's reflection off
        return None
    return AttentiveReflection(trainer.out, options.kl_ratio, options.replay_source, options.replay_batch_size,
                               options.replay_every, trainer.cfg.seed)


def padded_target(target: list[float], num_tasks: int) -> torch.Tensor:
    """The stored attention vector of an earlier task, zero-padded to the current number of tasks."""
    if len(target) > num_tasks:
        raise ValueError(f"target over {len(target)} tasks cannot be padded to {num_tasks}")
    return torch.tensor(list(target) + [0.0] * (num_tasks - len(target)), dtype=torch.float32)


def reflection_kl(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || current), averaged over the batch; ``current [B, n]`` are router weights."""
    log_current = torch.log(current.float().clamp_min(1e-12))
    return F.kl_div(log_current, target.to(current.device).expand_as(current), reduction="batchmean")


class AttentiveReflection(StageHook):
    """Targets and pseudo-input pools of earlier tasks, and the reflection loss."""

    name = "reflection"

    def __init__(self, run_dir: Path, kl_ratio: float, replay_source: str, batch_size: int, every: int,
                 seed: int = 0):
        if replay_source not in REPLAY_SOURCES:
            raise ValueError(f"replay_source must be one of {REPLAY_SOURCES}")
        self.dir = Path(run_dir)
        self.seed = seed
        self.features = FeatureStats(self.dir / "arm_features.safetensors") if replay_source == "features" else None
        self.kl_ratio = kl_ratio
        self.replay_source = replay_source
        self.batch_size = batch_size
        self.every = every
        self.targets: dict[str, list[float]] = {}
        self.pools: dict[str, list[str]] = {}
        self._encoded: dict[str, list[list[int]]] = {}
        self.reload()

    def reload(self) -> None:
        """Read the stored targets and pseudo-inputs (a resumed run, or another process's writes)."""
        state = self.dir / "arm.json"
        if state.is_file():
            saved = read_json(state)
            self.targets, self.pools = saved["targets"], saved["pools"]
        if self.features is not None:
            self.features.reload()

    @property
    def label(self) -> str:
        return {"real": "ARM (real inputs: oracle)", "generated": "ARM (generated inputs)",
                "features": "ARM (feature statistics)"}[self.replay_source]

    def _save(self) -> None:
        write_json(self.dir / "arm.json", {"kl_ratio": self.kl_ratio, "replay_source": self.replay_source,
                                           "oracle": self.replay_source == "real",
                                           "targets": self.targets, "pools": self.pools})

    @torch.no_grad()
    def store_target(self, mix: Mixture, task: Task, heldout: list[Example], max_source_len: int, chat: bool) -> list[float]:
        """Mean router weights over held-out training inputs of a task just learned."""
        weights = self._route(mix, task, [ex.input for ex in heldout], max_source_len, chat)
        target = [round(float(w), 8) for w in weights.mean(0)]
        self.targets[task.name] = target
        self._save()
        return target

    def store_pool(self, task: Task, inputs: list[str], info: dict[str, Any]) -> None:
        from petmix.replay.generator import save_pseudo_inputs

        self.pools[task.name] = list(inputs)
        save_pseudo_inputs(self.dir, task.name, inputs,
                           {**info, "replay_source": self.replay_source, "oracle": self.replay_source == "real"})
        self._save()

    @staticmethod
    def real_inputs(task: Task, keep: int, seed: int) -> list[str]:
        """Oracle variant: a seeded sample of real training inputs."""
        rng = random.Random(seed)
        inputs = [ex.input for ex in task.train]
        return rng.sample(inputs, min(keep, len(inputs)))

    @staticmethod
    def _encode(mix: Mixture, task: Task, inputs: list[str], max_source_len: int, chat: bool) -> list[list[int]]:
        """Token ids of the task's prompts for these inputs, as training and evaluation build them."""
        backbone: Backbone = mix.backbone
        prompts = [backbone.render(format_prompt(task, x), chat) for x in inputs]
        return encode_prompts(backbone.tokenizer, prompts, max_source_len)

    def _route(self, mix: Mixture, task: Task, inputs: list[str], max_source_len: int, chat: bool) -> torch.Tensor:
        return self._route_ids(mix, self._encode(mix, task, inputs, max_source_len, chat))

    @staticmethod
    def _batch(mix: Mixture, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = prompt_batch(mix.backbone.tokenizer, ids, left=False)
        input_ids = batch["input_ids"].to(mix.backbone.device)
        return input_ids, batch["source_mask"].to(input_ids.device)

    @classmethod
    def _route_ids(cls, mix: Mixture, ids: list[list[int]]) -> torch.Tensor:
        """Router weights over every block, through the one path training and evaluation use."""
        return mix.weights_for(*cls._batch(mix, ids))

    # ---- the hook ---------------------------------------------------------------------------------
    def prepare_stage(self, trainer: Stage, stage: int) -> None:
        self.prepare(trainer.mix, trainer.tasks[:stage], trainer.cfg.max_source_len, trainer.cfg.chat)

    def loss(self, trainer: Stage, micro_batch: int, output: Any) -> torch.Tensor | None:
        return self.reflection_loss(trainer.mix, micro_batch)

    def after_stage(self, trainer: Stage, stage: int) -> dict[str, Any]:
        """Store the task's attention target; make its pseudo-inputs (none after the last task).
        The main process does it and writes it down; the others read it."""
        info = self._reflect(trainer, stage) if trainer.main else {}
        trainer.accelerator.wait_for_everyone()
        if not trainer.main:
            self.reload()
        return info

    def _reflect(self, trainer: Stage, stage: int) -> dict[str, Any]:
        from petmix.replay.generator import generate_pseudo_inputs, keep_count

        cfg, task = trainer.cfg, trainer.tasks[stage]
        with trainer.accelerator.autocast():
            target = self.store_target(trainer.mix, task, trainer.splits[task.name][1], cfg.max_source_len, cfg.chat)
        info: dict[str, Any] = {"arm_target": target, "replay": self.label}
        if stage == len(trainer.tasks) - 1:
            return info
        started = time.time()
        gcfg = cfg.generator_config()
        if self.replay_source == "features":
            assert self.features is not None
            ids = self._encode(trainer.mix, task, [ex.input for ex in trainer.splits[task.name][0]],
                               cfg.max_source_len, cfg.chat)
            with torch.no_grad():
                self.features.store(task.name, trainer.mix.router_features(*self._batch(trainer.mix, ids)))
            info.update(replay_features=len(ids), replay_s=round(time.time() - started, 1))
            return info
        if self.replay_source == "real":
            inputs = self.real_inputs(task, keep_count(gcfg, len(task.train)), cfg.seed)
            details: dict[str, Any] = {"kept": len(inputs)}
        else:
            inputs, details = generate_pseudo_inputs(cfg.model, task, gcfg, n_train=len(task.train))
            crash_point("pseudo")  # the kill tests stop the run here
        self.store_pool(task, inputs, details)
        info.update(pseudo_inputs=len(inputs), replay_s=round(time.time() - started, 1))
        log.info("%s: %d pseudo-inputs for %s in %.1f s", self.label, len(inputs), task.name, time.time() - started)
        return info

    # ---- the mechanism ----------------------------------------------------------------------------
    def prepare(self, mix: Mixture, earlier: list[Task], max_source_len: int, chat: bool) -> None:
        """Tokenise the pseudo-inputs of the earlier tasks once per stage."""
        self._encoded = {}
        if self.features is not None:  # pseudo-features need no tokenising: only their order is kept
            self._encoded = {t.name: [] for t in earlier if t.name in self.features and t.name in self.targets}
            return
        for task in earlier:
            pool = self.pools.get(task.name) or []
            if pool and task.name in self.targets:
                self._encoded[task.name] = self._encode(mix, task, pool, max_source_len, chat)

    def reflection_loss(self, mix: Mixture, micro_batch: int) -> torch.Tensor | None:
        """Sum over earlier tasks of KL(target || router weights) on one pseudo batch each."""
        if self.kl_ratio <= 0 or not self._encoded or micro_batch % self.every:
            return None
        n = mix.num_blocks
        total = None
        for j, (name, ids) in enumerate(self._encoded.items()):
            if self.features is not None:  # fresh draws each step, the same ones on resume
                seed = self.seed * 1_000_003 + micro_batch * 101 + j
                pseudo = self.features.sample(name, self.batch_size, seed).to(mix.backbone.device)
                current = mix.weights_for_features(pseudo)
            else:
                start = (micro_batch // self.every * self.batch_size) % len(ids)  # deterministic cycling
                chosen = [ids[(start + k) % len(ids)] for k in range(min(self.batch_size, len(ids)))]
                current = self._route_ids(mix, chosen)
            kl = reflection_kl(current, padded_target(self.targets[name], n))
            total = kl if total is None else total + kl
        return None if total is None else self.kl_ratio * total


SAPT_TUNED = ("kl_ratio", (0.1, 0.5, 2.0))
register_method(
    Method("sapt-lora", "attention", True, hooks=(reflection_hook,), options=SAPTOptions, tuned_option=SAPT_TUNED,
           tuned_option_loss="mean_reflection_loss", tuned_lr=3e-3,  # docs/tuned.md: SuperNI, 57.6 at 3e-3 against 54.4 at 1e-3 and 23.3 at 1e-2
           summary="SAPT: a LoRA block per task, shared attentive learning and selection (no task id)",
           paper="Zhao et al., ACL 2024"),
    Method("sapt-prompt", "attention", True, block="prompt", hooks=(reflection_hook,), options=SAPTOptions,
           tuned_option=SAPT_TUNED, tuned_option_loss="mean_reflection_loss",  # its kind's 1e-1: docs/tuned.md, SuperNI, 55.20 at 1e-1 ties 55.22 at 3e-1
           summary="SAPT with a soft prompt per task: the instance prompt is the router-weighted sum",
           paper="Zhao et al., ACL 2024"),
)
