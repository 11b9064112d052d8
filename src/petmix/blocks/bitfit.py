"""BitFit (Ben Zaken et al., ACL 2022): train only the bias terms.

LLaMA-style decoders and T5 have no biases in their linear layers, so BitFit adds a zero-initialised
bias to every linear layer inside the transformer blocks (the model's output is unchanged at the
start) and trains those, plus any bias the model already has. The output head is left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from petmix.blocks.full import BackbonePool, FullConfig


class BitFitPool(BackbonePool):
    kind = "bitfit"

    def __init__(self, model: nn.Module):
        super().__init__(model, FullConfig(unfreeze="bias"))
        self.added: list[str] = []

    def _select(self) -> dict[str, nn.Parameter]:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and module.bias is None and "lm_head" not in name:
                w = module.weight
                module.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=torch.float32))
                self.added.append(name)
        return {k: p for k, p in self.model.named_parameters() if k.endswith("bias") and "lm_head" not in k}
