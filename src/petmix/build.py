"""A run's model, assembled from its settings: the blocks and the router of its method on a backbone.
Training (``petmix.train``) and inference (``petmix.api``) build it the same way."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from petmix.backbone import Backbone
from petmix.blocks.full import FullConfig
from petmix.blocks.lora import LoRAConfig
from petmix.blocks.prompt import PromptConfig
from petmix.config import TrainConfig
from petmix.errors import PetmixError
from petmix.methods import Method
from petmix.mixture import BlockConfig, Mixture
from petmix.sources import find_source


def check_model_settings(cfg: TrainConfig, backbone: Backbone, method: Method) -> None:
    """The relations only the loaded model can answer (right after it loads, before anything is
    written): LoRA target modules exist as linear layers; an unfreeze pattern selects something."""
    names = {n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.Linear)}
    if method.block == "lora" and cfg.target_modules:
        missing = [t for t in cfg.target_modules if t not in names]
        if missing:
            raise PetmixError(f"target_modules: {missing} {'is' if len(missing) == 1 else 'are'} not linear layers of "
                              f"{backbone.name}; its linear layers: {', '.join(sorted(names))}")
    if method.block == "full" and cfg.unfreeze != "all" and not cfg.unfreeze.startswith("last:"):
        pattern = re.compile(cfg.unfreeze)
        if not any(pattern.search(n) for n, _ in backbone.model.named_parameters()):
            raise PetmixError(f"unfreeze: the pattern {cfg.unfreeze!r} matches no parameter of {backbone.name}")


def block_config(cfg: TrainConfig, method: Method, sources: list[Path] | None = None) -> BlockConfig:
    if method.block == "prompt":
        init = cfg.prompt_init
        if init != "vocab" and not Path(init).is_file() and sources:
            init = str(find_source(init, sources))  # a source prompt named by its task
        return PromptConfig(cfg.prompt_length, init, combine=method.combine, depth=cfg.prompt_depth or method.depth,
                            encoder=cfg.prompt_encoder or method.encoder, encoder_hidden=cfg.prompt_encoder_hidden,
                            residual=cfg.prompt_encoder_residual,
                            sources=[str(p) for p in sources or []] if method.router_class().uses_sources else [])
    if method.block == "full":
        return FullConfig(cfg.unfreeze)
    if method.block == "bitfit":
        return "bitfit"
    return LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.target_modules))


def build_mixture(cfg: TrainConfig, method: Method, backbone: Backbone, sources: list[Path]) -> Mixture:
    """The run's mixture: the method's blocks and router, from the run's settings (training and inference)."""
    return Mixture(backbone, block_config(cfg, method, sources), method.routing, cfg.seed,
                   router_preset=cfg.router, router_hidden=cfg.router_hidden, router_temperature=cfg.router_temperature,
                   **method.router_options(method.options_from(cfg)))


