"""Backbone + pool of PET blocks + the rule that weighs them per input.

Routing rules:
- ``attention``: SAPT's shared attention router (no task id, learned);
- ``sum``: every block with weight 1 (IncLoRA, and single-block methods such as SeqLoRA);
- ``task``: the true task's block only (PerTask references: the task id is given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from petmix.backbone import Backbone
from petmix.blocks.lora import LoRAConfig, LoRAPool
from petmix.blocks.prompt import PromptConfig, PromptPool
from petmix.router import SharedAttentionRouter

ROUTINGS = ("attention", "sum", "task")


class Mixture(nn.Module):
    def __init__(self, backbone: Backbone, blocks: LoRAConfig | PromptConfig, routing: str = "attention",
                 router_hidden: int = 100, seed: int = 0):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
        self.backbone = backbone
        self.model = backbone.model  # registered, so .parameters() and accelerate see every weight
        self.pool: LoRAPool | PromptPool
        if isinstance(blocks, PromptConfig):
            self.pool = PromptPool(backbone, blocks, seed)
            self.prompts = self.pool.prompts  # registered here: prompts live outside the backbone
        else:
            self.pool = LoRAPool(backbone.model, blocks, backbone.family)  # layers live inside it
        self.routing = routing
        self.router = SharedAttentionRouter(backbone.hidden_size, router_hidden) if routing == "attention" else None
        if self.router is not None:
            self.router.to(backbone.device)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def add_task(self) -> int:
        """A new block (and, with attention routing, its key). Returns the block index."""
        i = self.pool.add_block()
        if self.router is not None:
            self.router.add_key()
        return i

    def weights_for(self, input_ids: torch.Tensor, source_mask: torch.Tensor, task_index: int | None = None) -> torch.Tensor:
        n, b = self.num_blocks, input_ids.shape[0]
        if self.routing == "attention":
            assert self.router is not None
            return self.router(self.backbone.embed(input_ids), source_mask, n)
        if self.routing == "sum":
            return torch.ones(b, n, device=input_ids.device)
        if task_index is None:
            raise ValueError("task routing needs the task index")
        w = torch.zeros(b, n, device=input_ids.device)
        w[:, task_index] = 1.0
        return w

    def forward(self, batch: dict[str, torch.Tensor], task_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss on answer tokens, and the weights used."""
        weights = self.weights_for(batch["input_ids"], batch["source_mask"], task_index)
        try:
            out = self.model(**self.pool.model_inputs(batch, weights))
        finally:
            self.pool.clear()
        return out.loss, weights

    def prepare_fn(self, task_index: int | None = None) -> Callable[[dict[str, torch.Tensor]], tuple[dict[str, Any], torch.Tensor]]:
        """The generation hook: route each batch, keep its weights set for the whole generate call."""

        def prepare(batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
            weights = self.weights_for(batch["input_ids"], batch["source_mask"], task_index)
            return self.pool.model_inputs(batch, weights), weights

        return prepare

    def clear_weights(self) -> None:
        self.pool.clear()

    # Saved state: the blocks, keys and router only (the backbone is frozen and stored elsewhere).
    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.pool.state_dict())
        if self.router is not None:
            state.update({f"router.{k}": v.detach() for k, v in self.router.state_dict().items()})
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.pool.load_state_dict(state)
        if self.router is not None:
            n_keys = sum(1 for k in state if k.startswith("router.keys."))
            while self.router.num_keys < n_keys:
                self.router.add_key()
            self.router.load_state_dict({k[len("router."):]: v for k, v in state.items() if k.startswith("router.")})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
