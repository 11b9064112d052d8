"""L2P (Wang et al., CVPR 2022): a shared pool of prompts with learnable keys (the router kind
``key-query`` in ``petmix.router``); every prompt and key of the pool trains on every task, and the
key-query matching loss ``lambda * sum_selected (1 - cos(q, k))`` pulls the selected keys toward the
queries that selected them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petmix.methods.base import Method, StageHook, register_method, setting

if TYPE_CHECKING:
    from petmix.methods.base import Stage
    from petmix.mixture import Mixture


@dataclass
class L2POptions:
    l2p_pool_size: int = setting(10, "l2p: prompts in the shared pool (M)", ge=1)
    l2p_top_k: int = setting(5, "l2p: prompts selected per input (N)", ge=1)
    l2p_lambda: float = setting(0.1, "l2p: weight of the key-query matching loss", ge=0)

    def check(self) -> list[tuple[str, str]]:
        if self.l2p_top_k > self.l2p_pool_size:
            return [("l2p_top_k", f"must be <= l2p_pool_size ({self.l2p_pool_size})")]
        return []


class KeyMatching(StageHook):
    """L2P's surrogate loss that pulls the selected keys toward the queries that selected them."""

    name = "key_match"

    def __init__(self, lam: float):
        self.lam = lam

    def loss(self, trainer: Stage, micro_batch: int, output: Any) -> torch.Tensor | None:
        match = output.router_loss
        return None if match is None or self.lam <= 0 else self.lam * match

    def after_stage(self, trainer: Stage, stage: int) -> dict[str, Any]:
        return {"key_query": "top-k prompts by key-query matching (no task id)"}


@dataclass(frozen=True)
class LearningToPrompt(Method):
    """The whole pool exists from the first task and every prompt and key of it trains throughout."""

    def router_options(self, options: L2POptions) -> dict[str, Any]:
        return {"top_k": options.l2p_top_k, "pool_size": options.l2p_pool_size}

    def begin_task(self, mix: Mixture, task_index: int, n_tasks: int = 1,
                   inputs: dict[str, torch.Tensor] | None = None) -> list[nn.Parameter]:
        while mix.num_blocks < mix.router.pool_size:
            mix.add_task()
        return self.select_trainable(mix)

    def trained_blocks(self, mix: Mixture) -> range:
        return range(mix.num_blocks)

    def block_names(self, mix: Mixture, tasks: list[str]) -> list[str]:
        return [f"prompt {i + 1}" for i in range(mix.num_blocks)]


register_method(LearningToPrompt(
    "l2p", "key-query", False, block="prompt", combine="concat", options=L2POptions,
    tuned_lr=3e-3,  # docs/tuned.md: SuperNI, 48.00 at 3e-3 against 44.82 at 1e-2, 34.12 at 1e-3 and 24.00 at 3e-2
    tuned_prompt_length=20,  # docs/tuned.md: SuperNI, 52.00 at 20 against 48.00 at 10 and 50.00 at 5
    hooks=(lambda trainer, o: KeyMatching(o.l2p_lambda),),
    summary="a shared pool of prompts with learnable keys; the frozen model's mean hidden state of the "
            "input is the query; the top-k prompts by cosine are concatenated (no task id)",
    paper="Wang et al., CVPR 2022 (Learning to Prompt)"))
