"""SAPT's shared attention: one query projection and one key per task, shared by all layers.

weights = softmax(K q / sqrt(d)), q = LayerNorm(SiLU(W_up W_down maxpool(E_input)))

The same module computes the weights that train each new block (attentive learning) and the ones
that select blocks at test time (attentive selection): there is no second code path.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def masked_max_pool(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the sequence of ``embeds [B, S, d]`` where ``mask [B, S]`` is 1 (padding never wins)."""
    fill = torch.finfo(embeds.dtype).min
    return embeds.masked_fill(~mask.bool().unsqueeze(-1), fill).max(dim=1).values


class SharedAttentionRouter(nn.Module):
    def __init__(self, d_model: int, hidden: int = 100):
        super().__init__()
        self.d_model = d_model
        # Order as SAPT specifies it: down, up, SiLU, LayerNorm (no biases in the projections).
        self.query = nn.Sequential(
            nn.Linear(d_model, hidden, bias=False),
            nn.Linear(hidden, d_model, bias=False),
            nn.SiLU(),
            nn.LayerNorm(d_model),
        )
        self.keys = nn.ParameterList()

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    def add_key(self) -> int:
        device = self.query[0].weight.device
        self.keys.append(nn.Parameter(torch.empty(self.d_model, device=device).uniform_(-1.0, 1.0)))
        return self.num_keys - 1

    def query_vector(self, embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_max_pool(embeds.float(), source_mask)
        return self.query(pooled.to(self.query[0].weight.dtype))

    def forward(self, embeds: torch.Tensor, source_mask: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Per-input weights ``[B, num_tasks]`` over the first ``num_tasks`` keys (default: all)."""
        n = self.num_keys if num_tasks is None else num_tasks
        q = self.query_vector(embeds, source_mask)
        keys = torch.stack(list(self.keys)[:n])  # [n, d]
        return torch.softmax(q.float() @ keys.float().t() / math.sqrt(self.d_model), dim=-1)


class KeyQueryRouter(nn.Module):
    """L2P (Wang et al., CVPR 2022): a learnable key per prompt of a shared pool; the query is a frozen
    model feature of the input; the ``top_k`` keys of highest cosine similarity select their prompts.

    The selection itself has no gradient: keys learn through the surrogate loss
    ``sum over selected keys of (1 - cos(q, k))`` (``last_match_loss``), which pulls them toward the
    queries that select them.
    """

    def __init__(self, d_model: int, top_k: int):
        super().__init__()
        self.d_model, self.top_k = d_model, top_k
        self.keys = nn.ParameterList()
        self.last_match_loss: torch.Tensor | None = None

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    def add_key(self) -> int:
        device = self.keys[0].device if self.num_keys else None
        self.keys.append(nn.Parameter(torch.empty(self.d_model, device=device).uniform_(-1.0, 1.0)))
        return self.num_keys - 1

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """A 0/1 selection ``[B, n]`` with ``min(top_k, n)`` ones per input."""
        keys = torch.stack(list(self.keys)).float()
        cos = torch.nn.functional.normalize(query.float(), dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).t()
        k = min(self.top_k, keys.shape[0])
        top = cos.topk(k, dim=-1).indices
        self.last_match_loss = (1.0 - cos.gather(1, top)).sum(1).mean()
        return torch.zeros_like(cos).scatter_(1, top, 1.0)
