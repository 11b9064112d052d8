"""ATTEMPT (Asai et al., EMNLP 2022): an instance prompt ``P_target + sum_j a_j P_j`` over frozen source
prompts and the task's target prompt. The pool's first blocks are the source prompts
(``petmix.blocks.prompt``); the attention G is the router kind ``source-attention``
(``petmix.router.AttemptAttention``). Only the target prompt(s) and G train.

- ``attempt``: single-task; each target task learns its own prompt and its own G from the same start.
- ``attempt-m``: multi-task; a target prompt per task and one shared G, trained in one joint stage on
  batches that mix tasks (each input's task picks its target prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petmix.methods.base import Method, register_method, setting

if TYPE_CHECKING:
    from petmix.mixture import Mixture


@dataclass
class ATTEMPTOptions:
    attempt_token_level: bool = setting(False, "attempt: score each prompt token instead of the max-pooled prompt")
    attempt_train_layer_norm: bool = setting(True, "attempt: train G's LayerNorm (the reference code leaves it "
                                                   "frozen)")
    attempt_temperature: float | None = setting(None, "attempt: softmax temperature of G (default d * e, the "
                                                      "paper's)", gt=0)


@dataclass(frozen=True)
class Attempt(Method):
    def router_options(self, options: ATTEMPTOptions) -> dict[str, Any]:
        return {"train_layer_norm": options.attempt_train_layer_norm, "token_level": options.attempt_token_level,
                "temperature": options.attempt_temperature}

    def begin_task(self, mix: Mixture, task_index: int, n_tasks: int = 1,
                   inputs: dict[str, torch.Tensor] | None = None) -> list[nn.Parameter]:
        if self.joint:  # ATTEMPT-m's one stage: a target prompt for every task
            while mix.num_blocks - mix.num_sources < n_tasks:
                mix.add_task()
        else:
            mix.add_task(inputs)
            # single-task ATTEMPT: one G per target task, initialised from the run's seed (seed 0 as before)
            mix.router.reset(seed=1000 + task_index + 100_003 * mix.seed)
        return self.select_trainable(mix)

    def lr_kind(self, prompt_encoder: str | None = None, prompt_depth: str | None = None) -> str:
        """G trains at its prompt's rate, and both together want a lower one than a prompt alone (docs/tuned.md)."""
        kind = super().lr_kind(prompt_encoder, prompt_depth)
        return "prompt-attention" if kind == "prompt" else kind

    def trained_blocks(self, mix: Mixture) -> range:
        """The target prompt (every task's, in ATTEMPT-m's joint stage); the sources stay frozen."""
        return range(mix.num_sources if self.joint else mix.num_blocks - 1, mix.num_blocks)


register_method(
    Attempt("attempt", "source-attention", True, block="prompt", independent=True, needs_sources=True,
            options=ATTEMPTOptions,
            summary="instance prompt P_target + sum_j a_j P_j over frozen source prompts and the target; "
                    "only the target prompt and the attention G train",
            paper="Asai et al., EMNLP 2022 (ATTEMPT)"),
    Attempt("attempt-m", "source-attention", True, joint=True, block="prompt", needs_sources=True, options=ATTEMPTOptions,
            summary="ATTEMPT multi-task: a target prompt per task, one shared G, batches mixing tasks",
            paper="Asai et al., EMNLP 2022 (ATTEMPT-m)"),
)
