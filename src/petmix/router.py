"""Routers: the shared attention that weighs a pool of blocks per input (SAPT), and the other methods'
selection rules (L2P's key-query matching, ATTEMPT's attention over source prompts).

SAPT's shared attention has two presets, one family with one interface (``feature`` ->
``weights_from_features``; ``forward`` chains them), used by training, evaluation, reflection and
inference alike:

- ``paper`` (``SharedAttentionRouter``): SAPT as published.
  ``weights = softmax(K q / sqrt(d))``, ``q = LayerNorm(SiLU(W_up W_down maxpool(E_input)))``, keys drawn
  from uniform(-1, 1).
- ``prototype`` (``PrototypeRouter``, petmix's default): the same attention, made to tell tasks apart
  at small budgets. ``q = LayerNorm(f + W_up SiLU(W_down f))`` with ``W_up`` starting at zero, so the
  query starts as the layer-normed pooled feature; each new key starts at the mean query of the new
  task's training inputs (its prototype); the score of key i is the cosine of ``q - c`` and
  ``k_i - c``, divided by a temperature (default 0.05), with ``c`` the mean of the keys. Centring on
  the keys' mean removes what every input shares: measured on SmolLM2, the pooled features of
  different tasks have cosine 0.99, so uncentred scores barely differ between keys. ``c`` is a
  function of the keys alone: no statistic of old inputs is kept. The new key trains with the block;
  the query projection stays at its start (see ``PrototypeRouter.trainable`` for the measurement).

The same module computes the weights that train each new block (attentive learning) and the ones that
select blocks at test time (attentive selection): there is no second code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_PRESETS = ("prototype", "paper")


def masked_max_pool(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the sequence of ``embeds [B, S, d]`` where ``mask [B, S]`` is 1 (padding never wins)."""
    fill = torch.finfo(embeds.dtype).min
    return embeds.masked_fill(~mask.bool().unsqueeze(-1), fill).max(dim=1).values


class SharedAttentionRouter(nn.Module):
    """SAPT's shared attention as published (preset ``paper``)."""

    preset = "paper"

    def __init__(self, d_model: int, hidden: int = 100, temperature: float = 1.0):
        super().__init__()
        self.d_model = d_model
        self.temperature = temperature
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

    def add_key(self, features: torch.Tensor | None = None) -> int:
        """A key for a new task; ``features [N, d]`` (the new task's inputs) are used by presets that
        start keys from the data; the paper's draws it from uniform(-1, 1)."""
        device = self.query[0].weight.device
        self.keys.append(nn.Parameter(torch.empty(self.d_model, device=device).uniform_(-1.0, 1.0)))
        return self.num_keys - 1

    def trainable(self, current: int) -> list[nn.Parameter]:
        """What trains while the block of task ``current`` learns: SAPT's query projection and the new key."""
        return list(self.query.parameters()) + [self.keys[current]]

    def feature(self, embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """The router's input feature ``[B, d]``: max-pooled frozen input embeddings (float32)."""
        return masked_max_pool(embeds.float(), source_mask)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The query vector of each feature row."""
        return self.query(features.to(self.query[0].weight.dtype))

    def query_vector(self, embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        return self.project(self.feature(embeds, source_mask))

    def weights_from_features(self, features: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Per-input weights ``[B, num_tasks]`` over the first ``num_tasks`` keys (default: all)."""
        n = self.num_keys if num_tasks is None else num_tasks
        q = self.project(features)
        keys = torch.stack(list(self.keys)[:n])  # [n, d]
        scores = q.float() @ keys.float().t() / math.sqrt(self.d_model)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        return torch.softmax(scores, dim=-1)

    def forward(self, embeds: torch.Tensor, source_mask: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Per-input weights ``[B, num_tasks]`` over the first ``num_tasks`` keys (default: all)."""
        return self.weights_from_features(self.feature(embeds, source_mask), num_tasks)


class PrototypeRouter(SharedAttentionRouter):
    """petmix's default shared attention (preset ``prototype``): see the module docstring.

    Measured on SmolLM2-135M with 32 training inputs per task and these very features, before any
    training: the right task gets the largest weight for 100% of test inputs on SuperNI order 1's
    first five tasks (mean weight on it 1.00), 97.8% on agnews/amazon/mnli/sst2 (0.97) and 100% on
    the default BIG-bench stream (1.00); the paper's router at initialisation puts 20-25% on each.
    """

    preset = "prototype"

    def __init__(self, d_model: int, hidden: int = 100, temperature: float = 0.05):
        super().__init__(d_model, hidden, temperature)
        nn.init.zeros_(self.query[1].weight)  # the learned correction starts at zero: q = LayerNorm(f)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        down, up, act, norm = self.query
        f = features.to(down.weight.dtype)
        return norm(f + up(act(down(f))))

    def trainable(self, current: int) -> list[nn.Parameter]:
        """Only the new key: the query projection stays at its start (``q = LayerNorm(f)``), so the queries of
        earlier tasks' inputs cannot drift away from their frozen keys. Measured on the main job (default
        stream, 15 steps per task, router lr 0.01): a trained projection (``W_up`` norm 0 -> 7.5 by the
        third task) sent every test input to the newest block (routing 0/0/0/100% after the last stage);
        the same keys with the projection back at its start routed tasks 1-3 100% of the time."""
        return [self.keys[current]]

    def add_key(self, features: torch.Tensor | None = None) -> int:
        if features is None:  # a placeholder, e.g. before a saved state is loaded into it
            return super().add_key()
        with torch.no_grad():
            prototype = self.project(features).float().mean(0)
        self.keys.append(nn.Parameter(prototype.to(self.query[0].weight.device)))
        return self.num_keys - 1

    def weights_from_features(self, features: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        n = self.num_keys if num_tasks is None else num_tasks
        q = self.project(features).float()
        keys = torch.stack(list(self.keys)[:n]).float()  # [n, d]
        centre = keys.mean(0)  # one key: every score is 0 and its weight 1
        scores = F.normalize(q - centre, dim=-1) @ F.normalize(keys - centre, dim=-1).t()
        return torch.softmax(scores / self.temperature, dim=-1)


def make_shared_router(preset: str, d_model: int, hidden: int = 100,
                       temperature: float | None = None) -> SharedAttentionRouter:
    """The shared attention of a preset; ``temperature`` None takes the preset's own."""
    if preset == "paper":
        return SharedAttentionRouter(d_model, hidden, 1.0 if temperature is None else temperature)
    if preset == "prototype":
        return PrototypeRouter(d_model, hidden, 0.05 if temperature is None else temperature)
    raise ValueError(f"router must be one of {ROUTER_PRESETS}, not {preset!r}")


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


class AttemptAttention(nn.Module):
    """ATTEMPT's attention module G (Asai et al., EMNLP 2022).

    ``h = LayerNorm(W_up SiLU(W_down x))`` with ``x`` the max-pooled frozen input embeddings; each
    prompt is summarised by max-pooling over its tokens; ``a = softmax_j(P_j . h / T)`` with
    ``T = d * e``, over the source prompts and the task's own target prompt. With ``token_level``
    each prompt token is scored on its own (``a[j, l] = softmax_j(P_j,l . h / T)``): the mixture can
    differ from one prompt position to the next (an option beyond the paper).
    """

    def __init__(self, d_model: int, hidden: int = 100, train_layer_norm: bool = True, token_level: bool = False,
                 temperature: float | None = None):
        super().__init__()
        self.down = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(hidden, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model)
        # The paper's d * e suits T5's large embeddings; a backbone with small ones (SmolLM2: std 0.14)
        # gets near-uniform attention from it, hence the option to set it.
        self.temperature = temperature if temperature is not None else d_model * math.e
        self.train_layer_norm = train_layer_norm
        self.token_level = token_level

    def trainable(self) -> list[nn.Parameter]:
        return [self.down.weight, self.up.weight] + (list(self.norm.parameters()) if self.train_layer_norm else [])

    def reset(self, seed: int) -> None:
        """Fresh weights (single-task ATTEMPT learns one G per target task)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in (self.down, self.up):
                bound = 1.0 / math.sqrt(lin.in_features)  # nn.Linear's default uniform range
                lin.weight.copy_(torch.empty(lin.weight.shape).uniform_(-bound, bound, generator=g))
            self.norm.reset_parameters()

    def hidden(self, embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        x = masked_max_pool(embeds.float(), source_mask)
        return self.norm(self.up(torch.nn.functional.silu(self.down(x.to(self.down.weight.dtype)))))

    def forward(self, embeds: torch.Tensor, source_mask: torch.Tensor, sources: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        """Attention over ``[sources..., own target]``: ``[B, m+1]`` (or ``[B, m+1, L]`` token-level).

        ``sources [m, L, d]`` are shared; ``targets [B, L, d]`` is each input's own target prompt.
        """
        h = self.hidden(embeds, source_mask).float()
        sources, targets = sources.float(), targets.float()
        if self.token_level:
            src = torch.einsum("bd,mld->bml", h, sources)
            tgt = torch.einsum("bd,bld->bl", h, targets).unsqueeze(1)
        else:
            src = h @ sources.max(dim=1).values.t()
            tgt = (h * targets.max(dim=1).values).sum(-1, keepdim=True)
        return torch.softmax(torch.cat([src, tgt], dim=1) / self.temperature, dim=1)
