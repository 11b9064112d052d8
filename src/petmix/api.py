"""Use a finished run: ``petmix.load(RUN).generate(texts)`` answers with automatic routing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from petmix.backbone import load_backbone
from petmix.blocks.full import BackbonePool
from petmix.build import build_mixture
from petmix.config import TrainConfig
from petmix.errors import PetmixError
from petmix.evaluate import GenerationConfig, generate
from petmix.methods import get_method
from petmix.runs import check_run_folder, load_tensors, read_json
from petmix.sources import resolve_sources


@dataclass
class Answer:
    text: str
    router_weights: dict[str, float] | None  # block (named by the task it was trained on) -> weight


class TrainedModel:
    """A backbone with a run's trained blocks and router."""

    def __init__(self, run_dir: str | Path, model: str | None = None):
        run_dir = Path(run_dir)
        cfg_path, adapters = run_dir / "config.json", run_dir / "adapters.safetensors"
        if not run_dir.is_dir():
            raise PetmixError(f"{run_dir}: no such run folder")
        if not cfg_path.is_file() or not adapters.is_file():
            raise PetmixError(f"{run_dir}: not a finished petmix training run (needs config.json and adapters.safetensors)")
        check_run_folder(run_dir)  # every file read back parses, before the model loads
        self.config = read_json(cfg_path)
        if not isinstance(self.config, dict) or not isinstance(self.config.get("tasks"), list):
            raise PetmixError(f"{cfg_path}: not a petmix run configuration (a JSON object with method, model, tasks)")
        # Settings an older petmix did not write keep their defaults (runs made before the router
        # presets existed used the paper's router); the ones written are checked.
        known = set(TrainConfig().to_dict())
        written = {"router": "paper", **{k: v for k, v in self.config.items() if k in known}}
        cfg = TrainConfig.from_dict({**written, "tasks": [], "lora_dropout": 0.0}, str(cfg_path), check_files=False)
        self.config = {**cfg.to_dict(), **self.config}
        self.method = get_method(cfg.method)
        self.backbone = load_backbone(model or cfg.model)
        sources = resolve_sources(cfg.sources) if cfg.sources else []
        self.mix = build_mixture(cfg, self.method, self.backbone, sources)
        self.run_dir = run_dir
        self.mix.load_adapter_state(load_tensors(adapters))
        self.mix.eval()
        tasks = list(self.config["tasks"])
        self.block_names = self.method.block_names(self.mix, tasks)
        self.tasks = tasks
        self._loaded_stage: int | None = None

    def generate(self, prompts: list[str], task: str | None = None, max_new_tokens: int | None = None,
                 streamer_for: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> list[Answer]:
        """Answer full prompts (as the model saw them in training: template, definition, input).

        ``task`` is needed only by methods that are given the task id at test time (per-task-lora).
        ``streamer_for`` is called with each tokenised batch and returns a transformers streamer for that
        batch's ``generate`` call (``petmix serve`` streams tokens through it); answers do not change.
        """
        index = None
        if self.method.task_id_at_test:
            if task not in self.tasks:
                raise PetmixError(f"method {self.method.name} needs the task id: task= one of {self.tasks}")
            index = self.tasks.index(task)
            if self.method.independent and isinstance(self.mix.pool, BackbonePool) and self._loaded_stage != index:
                # full-ft, bitfit: one model per task; the task's stage checkpoint holds its weights
                self.mix.load_adapter_state(load_tensors(self.run_dir / "checkpoints" / f"stage-{index + 1}.safetensors"))
                self._loaded_stage = index
        cfg = GenerationConfig(max_new_tokens or self.config["max_new_tokens"], self.config["eval_batch_size"],
                               self.config["max_source_len"], self.config["chat"])
        prepare = route = self.mix.prepare_fn(index)
        if streamer_for is not None:
            def prepare(batch):
                kwargs, weights = route(batch)
                return {**kwargs, "streamer": streamer_for(batch)}, weights
        with torch.no_grad():
            texts, weights = generate(self.backbone, prompts, cfg, prepare, desc="predict")
        self.mix.clear_weights()
        return [Answer(t, dict(zip(self.block_names, w)) if w else None) for t, w in zip(texts, weights or [None] * len(texts))]


    def route(self, prompts: list[str], task: str | None = None) -> list[dict[str, float]]:
        """The router's weights for full prompts, without generating (the same call evaluation makes)."""
        from petmix.data.collate import encode_prompts, prompt_batch

        index = self.tasks.index(task) if task is not None and self.method.task_id_at_test else None
        tok, bs = self.backbone.tokenizer, self.config["eval_batch_size"]
        ids = encode_prompts(tok, [self.backbone.render(p, self.config["chat"]) for p in prompts],
                             self.config["max_source_len"])
        rows: list[dict[str, float]] = []
        with torch.no_grad():
            for start in range(0, len(ids), bs):
                batch = prompt_batch(tok, ids[start:start + bs], left=not self.backbone.is_seq2seq)
                batch = {k: v.to(self.backbone.device) for k, v in batch.items()}
                _, weights = self.mix.prepare_fn(index)(batch)
                rows += [dict(zip(self.block_names, (round(float(x), 6) for x in w))) for w in weights]
        self.mix.clear_weights()
        return rows


def load(run_dir: str | Path, model: str | None = None) -> TrainedModel:
    """Load a finished run's model; ``model`` overrides the backbone path recorded in the run."""
    return TrainedModel(run_dir, model)
