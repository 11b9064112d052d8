"""A pool of soft prompts, one per task, mixed by per-input weights and prepended to the input.

The instance prompt is ``sum_i a_i P_i`` (shape ``[length, d]``), computed for the whole batch in one
einsum (``combine="sum"``: SAPT, ATTEMPT), or the prompts with a non-zero weight concatenated in index
order (``combine="concat"``: progressive prompts, L2P's top-k selection; every input must select the
same number of prompts). Decoders get it in front of the prompt tokens (after any left padding, so positions stay
contiguous); encoder-decoders get it in front of the encoder input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from petmix.backbone import Backbone
from petmix.data.collate import IGNORE


@dataclass
class PromptConfig:
    length: int = 10
    init: str = "vocab"  # "vocab": embeddings of random ids among the first `vocab_top`; or a .safetensors path
    vocab_top: int = 5000
    combine: str = "sum"  # "sum" | "concat"


def concat_selected(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked [n, L, d]``, ``weights [B, n]`` with k non-zero entries per row -> ``[B, k*L, d]``."""
    chosen = weights != 0
    counts = chosen.sum(1)
    k = int(counts[0])
    if k == 0 or bool((counts != k).any()):
        raise ValueError("concat prompts: every input must select the same, non-zero number of prompts")
    idx = chosen.nonzero()[:, 1].view(-1, k)  # row-major: each row's indices in ascending order
    scale = weights.gather(1, idx).to(stacked.dtype)[..., None, None]
    b, (_, length, d) = weights.shape[0], stacked.shape
    return (stacked[idx] * scale).reshape(b, k * length, d)


class PromptPool:
    def __init__(self, backbone: Backbone, cfg: PromptConfig, seed: int = 0):
        self.backbone = backbone
        self.cfg = cfg
        self.prompts = nn.ParameterList()
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def num_blocks(self) -> int:
        return len(self.prompts)

    def _initial(self) -> torch.Tensor:
        emb = self.backbone.model.get_input_embeddings().weight
        if self.cfg.init == "vocab":
            top = min(self.cfg.vocab_top, emb.shape[0])
            ids = torch.randint(0, top, (self.cfg.length,), generator=self._generator)
            return emb[ids.to(emb.device)].detach().float().clone()
        path = Path(self.cfg.init)
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "prompt" not in tensors:
            raise ValueError(f"{path}: no 'prompt' tensor to initialise from")
        prompt = tensors["prompt"].float()
        if prompt.shape != (self.cfg.length, emb.shape[1]):
            raise ValueError(f"{path}: prompt of shape {tuple(prompt.shape)}, expected {(self.cfg.length, emb.shape[1])}")
        return prompt.to(emb.device)

    def add_block(self) -> int:
        self.prompts.append(nn.Parameter(self._initial()))
        return self.num_blocks - 1

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        return [self.prompts[i]]

    def mixed(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-input prompts: ``[B, length, d]`` = sum_i weights[b, i] * P_i, or (concat) the selected
        prompts one after another, ``[B, k * length, d]``, each scaled by its weight."""
        stacked = torch.stack(list(self.prompts))  # [n, length, d]
        if self.cfg.combine == "sum":
            return torch.einsum("bn,nld->bld", weights.to(stacked.dtype), stacked)
        return concat_selected(stacked, weights)

    def model_inputs(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model (or ``generate``) with the instance prompt in front of the input."""
        embeds = self.backbone.embed(batch["input_ids"])
        prompt = self.mixed(weights).to(embeds.dtype)
        mask = batch["attention_mask"]
        b, length = prompt.shape[0], prompt.shape[1]
        ones = torch.ones(b, length, dtype=mask.dtype, device=mask.device)
        embeds = torch.cat([prompt, embeds], dim=1)
        mask = torch.cat([ones, mask], dim=1)
        out: dict[str, torch.Tensor] = {}
        if not self.backbone.is_seq2seq:
            # Left padding (generation) must stay on the left: move each row's pads in front of the prompt.
            pads = (batch["attention_mask"] == 0).sum(1)
            if bool(pads.any()) and "labels" not in batch:
                width = embeds.shape[1]
                idx = torch.arange(width, device=mask.device).expand(b, width)
                order = torch.where(idx < pads[:, None], idx + length, idx - pads[:, None])
                order = torch.where(idx >= pads[:, None] + length, idx, order)
                embeds = embeds.gather(1, order[..., None].expand_as(embeds))
                mask = mask.gather(1, order)
        out["inputs_embeds"] = embeds
        out["attention_mask"] = mask
        if "labels" in batch:
            labels = batch["labels"]
            if self.backbone.is_seq2seq:
                out["labels"] = labels
            else:
                out["labels"] = torch.cat([torch.full((b, length), IGNORE, dtype=labels.dtype, device=labels.device),
                                           labels], dim=1)
        return out

    def clear(self) -> None:
        """Nothing to clear: the prompt goes in through the inputs, not through layer state."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"prompt.{i}": p.detach() for i, p in enumerate(self.prompts)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        n = sum(1 for k in state if k.startswith("prompt."))
        while self.num_blocks < n:
            self.add_block()
        with torch.no_grad():
            for i in range(n):
                self.prompts[i].copy_(state[f"prompt.{i}"])
