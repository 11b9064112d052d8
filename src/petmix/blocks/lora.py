"""A pool of LoRA blocks on the frozen linear layers of a backbone.

Every target ``nn.Linear`` is wrapped by a :class:`PooledLoRALinear` holding one ``(A_i, B_i)`` pair
per block. With per-input weights ``a`` of shape ``[batch, blocks]`` its output is

    base(x) + sum_i a_i * (alpha / r) * B_i A_i x

computed as two matmuls over the blocks concatenated along the rank axis (no loop over blocks),
so the cost grows with ``blocks * r``, which is small next to the base layer. Frozen blocks (all but
the one a stage trains, and every block while generating) are concatenated once and cached until
their weights change, and get no weight gradient: autograd on one concatenation of all blocks would
compute ``[blocks * r, in]`` gradients per layer only to keep ``[r, in]`` of them. Blocks whose weight
is zero for every input of a batch (task-id routing) are skipped when no gradient needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

# Attention query and value projections (SAPT, LoRA paper). T5 names them q/v in every attention
# (encoder self, decoder self, decoder cross); LLaMA-style decoders q_proj/v_proj.
DEFAULT_TARGETS = {"causal": ["q_proj", "v_proj"], "seq2seq": ["q", "v"]}


@dataclass
class LoRAConfig:
    r: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty: DEFAULT_TARGETS of the family

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class MixWeights:
    """The per-input block weights of the current forward pass, shared by every layer of a pool.

    One weight vector per input for all layers and modules (SAPT): set once per batch, read by each layer.
    """

    def __init__(self) -> None:
        self._weights: torch.Tensor | None = None  # [batch, blocks]
        self._cache: dict[tuple, object] = {}  # derived from the weights, shared by every layer

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value
        self._cache = {}

    def active(self) -> tuple[int, ...]:
        """Blocks to compute: all of them, less those weighted zero for every input when no gradient
        reaches the weights (a zero weight still has a gradient)."""
        if "active" not in self._cache:
            w = self._weights
            assert w is not None
            n = w.shape[-1]
            if w.requires_grad and torch.is_grad_enabled():
                self._cache["active"] = tuple(range(n))
            else:
                self._cache["active"] = tuple(torch.nonzero(w.detach().reshape(-1, n).ne(0).any(0)).flatten().tolist())
        return self._cache["active"]  # type: ignore[return-value]

    def scale(self, blocks: tuple[int, ...], r: int, scaling: float, ndim: int) -> torch.Tensor:
        """``a_i * alpha / r`` of ``blocks``, each repeated ``r`` times, shaped to broadcast over ``[batch, ..., blocks * r]``."""
        key = ("scale", blocks, r, ndim)
        if key not in self._cache:
            w = self._weights
            assert w is not None
            if blocks != tuple(range(blocks[0], blocks[0] + len(blocks))):
                w = w[:, list(blocks)]
            elif len(blocks) != w.shape[-1]:
                w = w[:, blocks[0]:blocks[0] + len(blocks)]
            s = (w * scaling).repeat_interleave(r, dim=-1)
            self._cache[key] = s.view(s.shape[0], *([1] * (ndim - 2)), s.shape[-1])
        return self._cache[key]  # type: ignore[return-value]


class PooledLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig, mix: MixWeights):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.mix = mix
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._frozen: tuple | None = None  # (key, A of the frozen blocks concatenated, B likewise)

    @property
    def num_blocks(self) -> int:
        return len(self.lora_A)

    def add_block(self) -> None:
        w = self.base.weight
        # Drawn by the CPU's generator and then moved, so a seed gives the same start on any device.
        a = torch.empty(self.cfg.r, self.base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        a = a.to(w.device)
        b = torch.zeros(self.base.out_features, self.cfg.r, device=w.device, dtype=torch.float32)
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(b))

    # False: every block in one concatenation rebuilt at each call (the plain path, for comparison).
    fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        weights = self.mix.weights
        if self.num_blocks == 0 or weights is None:
            return y
        n = self.num_blocks
        if weights.shape[-1] != n:
            raise RuntimeError(f"router gave {weights.shape[-1]} weights for a pool of {n} blocks")
        if not self.fused:
            return self._forward_plain(x, y, weights)
        active = self.mix.active()
        grad = torch.is_grad_enabled()
        trains = [i for i in active if grad and (self.lora_A[i].requires_grad or self.lora_B[i].requires_grad)]
        frozen = tuple(i for i in active if i not in trains) if trains else active
        xin = self.dropout(x)
        delta = None
        for blocks, cat in ((frozen, self._frozen_cat), (tuple(trains), self._cat)):
            if not blocks:
                continue
            a, b = cat(blocks)
            scale = self.mix.scale(blocks, self.cfg.r, self.cfg.scaling, x.dim())
            h = xin.to(a.dtype) @ a.t()
            d = (h * scale.to(h.dtype)) @ b.t()
            delta = d if delta is None else delta + d
        return y if delta is None else y + delta.to(y.dtype)

    def _cat(self, blocks: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(blocks) == 1:
            return self.lora_A[blocks[0]], self.lora_B[blocks[0]]
        return (torch.cat([self.lora_A[i] for i in blocks], dim=0),  # [k*r, in]
                torch.cat([self.lora_B[i] for i in blocks], dim=1))  # [out, k*r]

    def _frozen_cat(self, blocks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen blocks concatenated, without gradient, rebuilt only when a weight changed in place
        (an optimiser step or a load bumps the tensor's version) or the blocks differ."""
        params = [p for i in blocks for p in (self.lora_A[i], self.lora_B[i])]
        key = (blocks, tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        if self._frozen is None or self._frozen[0] != key:
            with torch.no_grad():
                a, b = self._cat(blocks)
                self._frozen = (key, a.detach().clone(), b.detach().clone())
        return self._frozen[1], self._frozen[2]

    def _forward_plain(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        a = torch.cat(list(self.lora_A), dim=0)  # [n*r, in]
        b = torch.cat(list(self.lora_B), dim=1)  # [out, n*r]
        scale = (weights * self.cfg.scaling).repeat_interleave(self.cfg.r, dim=-1)  # [batch, n*r]
        scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
        h = self.dropout(x).to(a.dtype) @ a.t()
        return y + ((h * scale.to(h.dtype)) @ b.t()).to(y.dtype)


class LoRAPool:
    """Installs pooled LoRA layers into a backbone and manages their blocks."""

    def __init__(self, model: nn.Module, cfg: LoRAConfig, family: str):
        self.cfg = cfg
        self.mix = MixWeights()
        targets = cfg.target_modules or DEFAULT_TARGETS[family]
        self.targets = list(targets)
        self.layers: dict[str, PooledLoRALinear] = {}
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    layer = PooledLoRALinear(child, cfg, self.mix)
                    setattr(module, child_name, layer)
                    self.layers[f"{name}.{child_name}" if name else child_name] = layer
        if not self.layers:
            raise ValueError(f"no nn.Linear named {targets} in the model: set target_modules")

    @property
    def num_blocks(self) -> int:
        return next(iter(self.layers.values())).num_blocks

    def add_block(self) -> int:
        for layer in self.layers.values():
            layer.add_block()
        return self.num_blocks - 1

    def load_block(self, i: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set block ``i`` to given weights: ``{layer name: (A [r, in], B [out, r])}`` at the pool's rank
        and scaling (see petmix.peft_io for converting other ranks and scalings). Layers not named get a
        zero block, so an adapter on fewer modules than the pool adds nothing there."""
        unknown = sorted(set(tensors) - set(self.layers))
        if unknown:
            raise KeyError(f"no pooled LoRA layer named {unknown[:3]}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                if name in tensors:
                    a, b = tensors[name]
                    layer.lora_A[i].copy_(a)
                    layer.lora_B[i].copy_(b)
                else:
                    layer.lora_A[i].zero_()
                    layer.lora_B[i].zero_()

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A[i], layer.lora_B[i])]

    def model_inputs(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Set the weights every pooled layer reads during the next forward (or generate) call."""
        self.mix.weights = weights
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}

    def clear(self) -> None:
        self.mix.weights = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            for i in range(layer.num_blocks):
                out[f"lora.{i}.{name}.A"] = layer.lora_A[i].detach()
                out[f"lora.{i}.{name}.B"] = layer.lora_B[i].detach()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        n = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("lora.")), default=-1)
        while self.num_blocks < n:
            self.add_block()
        with torch.no_grad():
            for name, layer in self.layers.items():
                for i in range(n):
                    layer.lora_A[i].copy_(state[f"lora.{i}.{name}.A"])
                    layer.lora_B[i].copy_(state[f"lora.{i}.{name}.B"])
