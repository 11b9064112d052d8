"""A pool of LoRA blocks on the frozen linear layers of a backbone.

Every target ``nn.Linear`` is wrapped by a :class:`PooledLoRALinear` holding one ``(A_i, B_i)`` pair
per block. With per-input weights ``a`` of shape ``[batch, blocks]`` its output is

    base(x) + sum_i a_i * (alpha / r) * B_i A_i x

computed as two matmuls over the blocks concatenated along the rank axis (no loop over blocks),
so the cost grows with ``blocks * r``, which is small next to the base layer.
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
        self.weights: torch.Tensor | None = None  # [batch, blocks]


class PooledLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig, mix: MixWeights):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.mix = mix
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @property
    def num_blocks(self) -> int:
        return len(self.lora_A)

    def add_block(self) -> None:
        w = self.base.weight
        a = torch.empty(self.cfg.r, self.base.in_features, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        b = torch.zeros(self.base.out_features, self.cfg.r, device=w.device, dtype=torch.float32)
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        weights = self.mix.weights
        if self.num_blocks == 0 or weights is None:
            return y
        n = self.num_blocks
        if weights.shape[-1] != n:
            raise RuntimeError(f"router gave {weights.shape[-1]} weights for a pool of {n} blocks")
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
