"""Backbone + pool of PET blocks + the router that weighs them per input (``petmix.router``).

The mixture knows no method: its router (a registered kind, see ``petmix.router.make_router``) gives
the weights, its pool (``petmix.blocks``) applies them. ``forward`` returns everything later steps use
(:class:`MixOutput`); nothing is left on the module for hooks to read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petmix.backbone import Backbone
from petmix.blocks.bitfit import BitFitPool
from petmix.blocks.full import BackbonePool, FullConfig
from petmix.blocks.lora import LoRAConfig, LoRAPool
from petmix.blocks.prompt import PromptConfig, PromptPool
from petmix.data.collate import IGNORE, length_groups
from petmix.router import ROUTERS, Router, Routing, make_router

BlockConfig = LoRAConfig | PromptConfig | FullConfig | str  # "bitfit"


@dataclass
class MixOutput:
    """A training forward: the loss on answer tokens, the weights to record ``[B, n]``, the router's own
    loss (or None), and, when asked for (``keep_logits``), the logits and labels the loss came from."""

    loss: torch.Tensor
    weights: torch.Tensor
    router_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class Mixture(nn.Module):
    def __init__(self, backbone: Backbone, blocks: BlockConfig, routing: str = "attention", seed: int = 0,
                 **router_options: Any):
        """``routing``: a router kind (``petmix.router.ROUTERS``), built with ``router_options`` (each kind
        reads its own: ``router_preset``, ``router_hidden``, ``top_k``, ...)."""
        super().__init__()
        self.seed = seed  # the run's seed: blocks and routers initialised later derive theirs from it
        if routing not in ROUTERS:
            raise ValueError(f"routing must be one of {tuple(ROUTERS)}, not {routing!r}")
        self.backbone = backbone
        self.model = backbone.model  # registered, so .parameters() and accelerate see every weight
        self.pool: LoRAPool | PromptPool | BackbonePool
        if isinstance(blocks, PromptConfig):
            self.pool = PromptPool(backbone, blocks, seed)
            self.prompts = self.pool.prompts  # registered here: prompts live outside the backbone
            self.prompt_encoders = self.pool.encoders
        elif isinstance(blocks, FullConfig):
            self.pool = BackbonePool(backbone.model, blocks)
        elif blocks == "bitfit":
            self.pool = BitFitPool(backbone.model)
        else:
            self.pool = LoRAPool(backbone.model, blocks, backbone.family)  # layers live inside it
        self.routing = routing
        self.router: Router = make_router(routing, backbone.hidden_size, **router_options)
        if self.router.uses_sources and not isinstance(self.pool, PromptPool):
            raise ValueError(f"{routing} routing needs prompt blocks")
        self.router.to(backbone.device)

    # Causal LMs: run the LM head only where a label is (answer tokens, a few percent of positions).
    # Off gives the plain path (the model's own loss over logits at every position), kept for tests.
    label_only_head = True
    # Training batches whose lengths differ run as length groups when that saves this share of positions.
    min_padding_saving = 0.1

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_sources(self) -> int:
        """Frozen source prompts at the front of the pool (ATTEMPT); 0 otherwise."""
        return getattr(self.pool, "num_sources", 0)

    def add_task(self, inputs: dict[str, torch.Tensor] | None = None) -> int:
        """A new block, and the router grown with it. Returns the block index.

        ``inputs`` (``input_ids`` and ``source_mask`` of the new task's training prompts) let a router
        that starts keys from the data (the prototype preset) place the new key."""
        i = self.pool.add_block()
        self.router.add_block(self, inputs)
        return i

    def router_features(self, input_ids: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """The shared attention's input feature of each prompt ``[B, d]`` (what reflection stores)."""
        return self.router.feature(self.backbone.embed(input_ids), source_mask)

    def route(self, input_ids: torch.Tensor, source_mask: torch.Tensor,
              task_index: int | torch.Tensor | None = None) -> Routing:
        """The router's weights for a batch (``task_index``: one task for the batch or one per input)."""
        return self.router.route(self, input_ids, source_mask, task_index)

    def weights_for(self, input_ids: torch.Tensor, source_mask: torch.Tensor,
                    task_index: int | torch.Tensor | None = None) -> torch.Tensor:
        """Per-input block weights ``[B, n]`` (``[B, n, L]`` for token-level ATTEMPT)."""
        return self.route(input_ids, source_mask, task_index).weights

    def weights_for_features(self, features: torch.Tensor) -> torch.Tensor:
        """Shared-attention weights ``[B, n]`` of router input features (ARM's pseudo-features)."""
        return self.router.weights_from_features(features, self.num_blocks)

    def forward(self, batch: dict[str, torch.Tensor], task_index: int | torch.Tensor | None = None,
                keep_logits: bool = False) -> MixOutput:
        """Training loss on answer tokens and the weights used; ``keep_logits`` also returns the logits
        and labels (a hook that reads every logit, such as LwF's distillation, asks for them)."""
        if "task_ids" in batch:  # per-input task ids (ATTEMPT-m's mixed batches) beat one index for the batch
            task_index = batch["task_ids"]
        routing = self.route(batch["input_ids"], batch["source_mask"], task_index)
        try:
            if not keep_logits and self._label_only(batch):
                loss = self._label_loss(batch, routing.weights)
                return MixOutput(loss, routing.reported, routing.loss)
            inputs = self.pool.model_inputs(batch, routing.weights)
            out = self.model(**inputs)
        finally:
            self.pool.clear()
        if keep_logits:
            return MixOutput(out.loss, routing.reported, routing.loss, out.logits, inputs.get("labels"))
        return MixOutput(out.loss, routing.reported, routing.loss)

    def _label_only(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the loss may skip the logits of unlabelled positions: a causal LM whose logits are the
        head's output as is (no soft-capping or scaling)."""
        cfg = self.model.config
        return (self.label_only_head and not self.backbone.is_seq2seq
                and "labels" in batch and self.model.base_model is not self.model
                and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None)

    def _label_loss(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """The causal-LM loss (mean cross-entropy of each labelled token given the tokens before it), equal
        to the model's own, computed with less: the head runs on labelled positions only (it is a fifth
        of SmolLM2's weights, and labels a few percent of a training batch's positions), and a batch
        whose lengths differ runs as groups of similar length cut to their width (``length_groups``)."""
        labels = batch["labels"]
        count = (labels[:, 1:] != IGNORE).sum()
        groups = length_groups(batch["attention_mask"], self.min_padding_saving)
        total = labels.new_zeros((), dtype=torch.float32)
        for rows, width in groups:
            if len(groups) == 1:
                part, w = batch, weights
            else:
                part = {k: v[rows][:, :width] if v.dim() == 2 and v.shape[1] == labels.shape[1] else v[rows]
                        for k, v in batch.items()}
                w = weights[rows]
            inputs = self.pool.model_inputs(part, w)
            hidden = self.model.base_model(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
            target = inputs["labels"][:, 1:]
            keep = target != IGNORE
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
            total = total + F.cross_entropy(logits.float(), target[keep], reduction="sum")
        return total / count

    def prepare_fn(self, task_index: int | None = None) -> Callable[[dict[str, torch.Tensor]], tuple[dict[str, Any], torch.Tensor]]:
        """The generation hook: route each batch, keep its weights set for the whole generate call."""

        def prepare(batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
            routing = self.route(batch["input_ids"], batch["source_mask"], task_index)
            return self.pool.model_inputs(batch, routing.weights), routing.reported

        return prepare

    def clear_weights(self) -> None:
        self.pool.clear()

    # Saved state: the blocks, keys and router only (the backbone is frozen and stored elsewhere).
    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.pool.state_dict())
        state.update({f"router.{k}": v.detach() for k, v in self.router.state_dict().items()})
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.pool.load_state_dict(state)
        self.router.grow(sum(1 for k in state if k.startswith("router.keys.")))
        self.router.load_state_dict({k[len("router."):]: v for k, v in state.items() if k.startswith("router.")})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
