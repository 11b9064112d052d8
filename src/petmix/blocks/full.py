"""The backbone's own weights as the trained "block": full fine-tuning, or a chosen part of it.

``unfreeze`` picks the parameters:
- ``"all"``: every weight (full fine-tuning);
- ``"last:N"``: the last N transformer layers, the final norm and the output head (a partial unfreeze
  that saves optimiser memory and time);
- anything else: a regular expression matched against parameter names.

There is one block. Methods that learn each task from the same start (``full-ft``) call
:meth:`BackbonePool.reset`, which restores the weights as they were when the block was created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_LAYER = re.compile(r"\.(?:layers|block|h)\.(\d+)\.")


@dataclass
class FullConfig:
    unfreeze: str = "all"


def select_parameters(model: nn.Module, unfreeze: str) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())  # tied weights appear once
    if unfreeze == "all":
        return named
    if unfreeze.startswith("last:"):
        n = int(unfreeze.split(":", 1)[1])
        layer_ids = sorted({int(m.group(1)) for name in named if (m := _LAYER.search(name))})
        keep = set(layer_ids[-n:]) if n > 0 else set()
        chosen = {}
        for name, p in named.items():
            m = _LAYER.search(name)
            if m is not None:
                if int(m.group(1)) in keep:
                    chosen[name] = p
            elif not name.endswith(("embed_tokens.weight", "shared.weight", "wte.weight")):
                chosen[name] = p  # final norm and head (a tied head is the embedding: left frozen)
        return chosen
    pattern = re.compile(unfreeze)
    chosen = {name: p for name, p in named.items() if pattern.search(name)}
    if not chosen:
        raise ValueError(f"unfreeze pattern {unfreeze!r} matches no parameter")
    return chosen


class BackbonePool:
    """Trains (part of) the backbone itself; no extra modules, no routing."""

    kind = "full"

    def __init__(self, model: nn.Module, cfg: FullConfig):
        self.model = model
        self.cfg = cfg
        self.params: dict[str, nn.Parameter] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._blocks = 0

    def _select(self) -> dict[str, nn.Parameter]:
        return select_parameters(self.model, self.cfg.unfreeze)

    @property
    def num_blocks(self) -> int:
        return self._blocks

    def add_block(self) -> int:
        if self._blocks:
            raise RuntimeError(f"a {self.kind} pool has one block; use reset() to start a task afresh")
        self.params = self._select()
        for p in self.params.values():
            p.data = p.data.float()  # train in float32 whatever the checkpoint's dtype (autocast does bf16)
        self._initial = {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}
        self._blocks = 1
        return 0

    @torch.no_grad()
    def reset(self) -> None:
        """Weights back to where they were when the block was created."""
        for k, p in self.params.items():
            p.copy_(self._initial[k])

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        if i != 0 or not self._blocks:
            raise IndexError(f"{self.kind} pool has no block {i}")
        return list(self.params.values())

    def model_inputs(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}

    def clear(self) -> None:
        """Nothing to clear: the weights are the model's own."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{self.kind}.{k}": p.detach() for k, p in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not any(k.startswith(f"{self.kind}.") for k in state):
            return
        if not self._blocks:
            self.add_block()
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[f"{self.kind}.{k}"])
