"""Backbone + pool of PET blocks + the rule that weighs them per input.

Routing rules:
- ``attention``: SAPT's shared attention router (no task id, learned; preset ``prototype`` or
  ``paper``, see ``petmix.router``);
- ``sum``: every block with weight 1 (IncLoRA, and single-block methods such as SeqLoRA);
- ``task``: the true task's block only (PerTask references: the task id is given);
- ``progressive``: blocks 1..t of task t, concatenated (Progressive Prompts: the task id is given);
- ``key-query``: L2P's top-k selection from a shared pool by key-query matching (no task id);
- ``attempt``: ATTEMPT's instance prompt ``P_target + sum_j a_j P_j`` over frozen source prompts and
  the task's target prompt (the task id picks the target prompt).
"""

from __future__ import annotations

from collections.abc import Callable
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
from petmix.router import AttemptAttention, KeyQueryRouter, SharedAttentionRouter, make_shared_router

BlockConfig = LoRAConfig | PromptConfig | FullConfig | str  # "bitfit"

ROUTINGS = ("attention", "sum", "task", "progressive", "key-query", "attempt")
TASK_ID_ROUTINGS = ("task", "progressive", "attempt")


class Mixture(nn.Module):
    def __init__(self, backbone: Backbone, blocks: BlockConfig, routing: str = "attention",
                 router_hidden: int = 100, seed: int = 0, top_k: int = 5, pool_size: int = 10,
                 train_layer_norm: bool = True, token_level: bool = False, temperature: float | None = None,
                 router_preset: str = "paper", router_temperature: float | None = None):
        super().__init__()
        self.pool_size = pool_size  # key-query routing (L2P): prompts in the shared pool
        self.seed = seed  # the run's seed: blocks and routers initialised later derive theirs from it
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
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
        self.router: SharedAttentionRouter | KeyQueryRouter | AttemptAttention | None = None
        if routing == "attention":
            self.router = make_shared_router(router_preset, backbone.hidden_size, router_hidden, router_temperature)
        elif routing == "key-query":
            self.router = KeyQueryRouter(backbone.hidden_size, top_k)
        elif routing == "attempt":
            if not isinstance(self.pool, PromptPool):
                raise ValueError("attempt routing needs prompt blocks")
            self.router = AttemptAttention(backbone.hidden_size, router_hidden, train_layer_norm, token_level, temperature)
        if self.router is not None:
            self.router.to(backbone.device)

    keep_logits = False
    # Causal LMs: run the LM head only where a label is (answer tokens, a few percent of positions).
    # Off gives the plain path (the model's own loss over logits at every position), kept for tests.
    label_only_head = True
    # Training batches whose lengths differ run as length groups when that saves this share of positions.
    min_padding_saving = 0.1
    last_attention: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    last_labels: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_sources(self) -> int:
        """Frozen source prompts at the front of the pool (ATTEMPT); 0 otherwise."""
        return getattr(self.pool, "num_sources", 0)

    def add_task(self, inputs: dict[str, torch.Tensor] | None = None) -> int:
        """A new block (and, with attention routing, its key). Returns the block index.

        ``inputs`` (``input_ids`` and ``source_mask`` of the new task's training prompts) let a router
        that starts keys from the data (the prototype preset) place the new key."""
        i = self.pool.add_block()
        if isinstance(self.router, SharedAttentionRouter):
            features = None
            if inputs is not None:
                with torch.no_grad():
                    features = self.router_features(inputs["input_ids"], inputs["source_mask"])
            self.router.add_key(features)
        elif isinstance(self.router, KeyQueryRouter):
            self.router.add_key()
        return i

    def router_features(self, input_ids: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """The shared attention's input feature of each prompt ``[B, d]`` (what reflection stores)."""
        assert isinstance(self.router, SharedAttentionRouter)
        return self.router.feature(self.backbone.embed(input_ids), source_mask)

    def weights_for(self, input_ids: torch.Tensor, source_mask: torch.Tensor,
                    task_index: int | torch.Tensor | None = None) -> torch.Tensor:
        """Per-input block weights ``[B, n]`` (``[B, n, L]`` for token-level ATTEMPT). ``task_index`` is
        one task for the batch or one per input (ATTEMPT-m's mixed batches)."""
        n, b = self.num_blocks, input_ids.shape[0]
        if self.routing == "attempt":
            return self._attempt_weights(input_ids, source_mask, task_index)
        if self.routing == "attention":
            assert isinstance(self.router, SharedAttentionRouter)
            return self.router(self.backbone.embed(input_ids), source_mask, n)
        if self.routing == "key-query":
            assert isinstance(self.router, KeyQueryRouter)
            return self.router(self.backbone.features(input_ids, source_mask))
        if self.routing == "sum":
            return torch.ones(b, n, device=input_ids.device)
        if task_index is None:
            raise ValueError(f"{self.routing} routing needs the task index")
        w = torch.zeros(b, n, device=input_ids.device)
        if self.routing == "progressive":
            w[:, : task_index + 1] = 1.0
        else:
            w[:, task_index] = 1.0
        return w

    def weights_for_features(self, features: torch.Tensor) -> torch.Tensor:
        """Shared-attention weights ``[B, n]`` of router input features (ARM's pseudo-features)."""
        assert isinstance(self.router, SharedAttentionRouter)
        return self.router.weights_from_features(features, self.num_blocks)

    def _attempt_weights(self, input_ids: torch.Tensor, source_mask: torch.Tensor,
                         task_index: int | torch.Tensor | None) -> torch.Tensor:
        assert isinstance(self.router, AttemptAttention) and isinstance(self.pool, PromptPool)
        if task_index is None:
            raise ValueError("attempt routing needs the task index (it picks the target prompt)")
        b, m = input_ids.shape[0], self.pool.num_sources
        tasks = torch.as_tensor(task_index, device=input_ids.device).long().expand(b)
        prompts = self.pool.input_prompts()  # [n, L, d]
        a = self.router(self.backbone.embed(input_ids), source_mask, prompts[:m], prompts[m + tasks])
        rows = torch.arange(b, device=input_ids.device)
        w = a.new_zeros((b, self.num_blocks, *a.shape[2:]))
        w[:, :m] = a[:, :m]
        w[rows, m + tasks] = 1.0 + a[:, m]  # P_target + sum_j a_j P_j, j over the sources and the target
        reported = (w if w.dim() == 2 else w.mean(-1)).clone()
        reported[rows, m + tasks] -= 1.0  # report the attention itself, not 1 + a
        self.last_attention = reported
        return w

    def reported_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` weights to record: ATTEMPT's attention a (not 1 + a), token-level ones averaged."""
        return self.last_attention if self.routing == "attempt" else weights

    def forward(self, batch: dict[str, torch.Tensor], task_index: int | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss on answer tokens, and the weights used (as ``reported_weights``)."""
        if "task_ids" in batch:  # per-input task ids (ATTEMPT-m's mixed batches) beat one index for the batch
            task_index = batch["task_ids"]
        weights = self.weights_for(batch["input_ids"], batch["source_mask"], task_index)
        try:
            if self._label_only(batch):
                loss = self._label_loss(batch, weights)
                self.last_logits = self.last_labels = None
                return loss, self.reported_weights(weights)
            inputs = self.pool.model_inputs(batch, weights)
            out = self.model(**inputs)
        finally:
            self.pool.clear()
        # Kept for hooks that need the outputs (LwF's distillation), dropped by the next forward.
        self.last_logits = out.logits if self.keep_logits else None
        self.last_labels = inputs.get("labels") if self.keep_logits else None
        return out.loss, self.reported_weights(weights)

    def _label_only(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the loss may skip the logits of unlabelled positions: a causal LM whose logits are the
        head's output as is (no soft-capping or scaling) and no hook that reads every logit."""
        cfg = self.model.config
        return (self.label_only_head and not self.keep_logits and not self.backbone.is_seq2seq
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
            weights = self.weights_for(batch["input_ids"], batch["source_mask"], task_index)
            return self.pool.model_inputs(batch, weights), self.reported_weights(weights)

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
            while isinstance(self.router, (SharedAttentionRouter, KeyQueryRouter)) and self.router.num_keys < n_keys:
                self.router.add_key()
            self.router.load_state_dict({k[len("router."):]: v for k, v in state.items() if k.startswith("router.")})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
