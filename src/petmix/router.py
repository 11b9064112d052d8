"""Routers: how a mixture weighs its pool of blocks for each input. One family, one interface
(:class:`Router`): ``route`` gives the weights of a batch (and what to report, and any loss of the
router's own), ``add_block`` grows the router with the pool, ``trainable`` says which of its parameters
train while a block learns. Training, evaluation, reflection and inference all call ``route`` through
``Mixture``; nothing is left on a module for later steps to pick up.

Kinds (``make_router``; a method names its kind, see ``petmix.methods``):

- ``sum``: every block with weight 1 (IncLoRA, and single-block methods such as SeqLoRA);
- ``task``: the true task's block only (PerTask references: the task id is given);
- ``progressive``: blocks 1..t of task t (Progressive Prompts: the task id is given);
- ``attention``: SAPT's shared attention (no task id, learned; preset ``prototype`` or ``paper``);
- ``key-query``: L2P's top-k selection from a shared pool by key-query matching (no task id);
- ``source-attention``: ATTEMPT's attention G over frozen source prompts and the task's target prompt.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from petmix.mixture import Mixture

ROUTER_PRESETS = ("prototype", "paper")


@dataclass
class Routing:
    """What a router gives for a batch: ``weights`` applied to the pool (``[B, n]``, or ``[B, n, L]`` for
    token-level ATTEMPT), ``reported`` ``[B, n]`` to record (e.g. ATTEMPT's attention a, not 1 + a), and
    ``loss``, a training term of the router's own (L2P's key matching) or None."""

    weights: torch.Tensor
    reported: torch.Tensor
    loss: torch.Tensor | None = None


def uniform_key(d_model: int, device: torch.device | None) -> torch.Tensor:
    """A key drawn from uniform(-1, 1) by the CPU's generator, then moved: the same key for a seed on any device."""
    return torch.empty(d_model).uniform_(-1.0, 1.0).to(device)


class Router(nn.Module):
    """The interface every router implements. Class attributes say what generic code may rely on;
    ``build(d_model, **options)`` (a classmethod) makes one from a run's settings."""

    kind: ClassVar[str] = ""
    needs_task_id: ClassVar[bool] = False  # route() needs the task index (a task-id method at test time)
    learned: ClassVar[bool] = False  # per-input weights that training records (train_router_weights)
    selects_per_task: ClassVar[bool] = False  # picks among per-task blocks with no task id: routing accuracy
    uses_sources: ClassVar[bool] = False  # the pool starts with frozen source prompts (ATTEMPT)

    def route(self, mix: Mixture, input_ids: torch.Tensor, source_mask: torch.Tensor,
              task_index: int | torch.Tensor | None = None) -> Routing:
        raise NotImplementedError

    def add_block(self, mix: Mixture, inputs: dict[str, torch.Tensor] | None = None) -> None:
        """The pool just got a block (``inputs``: the new task's training prompts, for routers that
        place a key from the data)."""

    def trainable(self, current: int) -> list[nn.Parameter]:
        """The router's parameters that train while block ``current`` learns."""
        return []

    def grow(self, n_blocks: int) -> None:
        """Make room for the state of a router that had ``n_blocks`` blocks (before loading it)."""


ROUTERS: dict[str, type[Router]] = {}


def register_router(kind: str) -> Callable[[type], type]:
    """Class decorator: ``make_router(kind, ...)`` builds the class with ``cls.build(d_model, **options)``."""
    def add(cls: type) -> type:
        ROUTERS[kind] = cls
        cls.kind = kind
        return cls

    return add


def make_router(kind: str, d_model: int, **options: Any) -> Router:
    """A router of a registered kind; each kind reads the options it knows (see its ``build``)."""
    if kind not in ROUTERS:
        raise ValueError(f"routing must be one of {tuple(ROUTERS)}, not {kind!r}")
    return ROUTERS[kind].build(d_model, **options)


def _fixed_weights(input_ids: torch.Tensor, n: int, fill: Callable[[torch.Tensor], None]) -> Routing:
    w = torch.zeros(input_ids.shape[0], n, device=input_ids.device)
    fill(w)
    return Routing(w, w)


@register_router("sum")
class SumRouter(Router):
    """Every block with weight 1."""

    @classmethod
    def build(cls, d_model: int, **_: Any) -> SumRouter:
        return cls()

    def route(self, mix, input_ids, source_mask, task_index=None) -> Routing:
        w = torch.ones(input_ids.shape[0], mix.num_blocks, device=input_ids.device)
        return Routing(w, w)


@register_router("task")
class TaskRouter(Router):
    """The true task's block only (the task id is given)."""

    needs_task_id = True

    @classmethod
    def build(cls, d_model: int, **_: Any) -> TaskRouter:
        return cls()

    def route(self, mix, input_ids, source_mask, task_index=None) -> Routing:
        if task_index is None:
            raise ValueError(f"{self.kind} routing needs the task index")
        return _fixed_weights(input_ids, mix.num_blocks, lambda w: w[:, task_index].fill_(1.0))


@register_router("progressive")
class ProgressiveRouter(TaskRouter):
    """Blocks 1..t of task t (Progressive Prompts; the task id is given)."""

    def route(self, mix, input_ids, source_mask, task_index=None) -> Routing:
        if task_index is None:
            raise ValueError(f"{self.kind} routing needs the task index")
        return _fixed_weights(input_ids, mix.num_blocks, lambda w: w[:, : task_index + 1].fill_(1.0))


def masked_max_pool(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the sequence of ``embeds [B, S, d]`` where ``mask [B, S]`` is 1 (padding never wins)."""
    fill = torch.finfo(embeds.dtype).min
    return embeds.masked_fill(~mask.bool().unsqueeze(-1), fill).max(dim=1).values


@register_router("attention")
class SharedAttentionRouter(Router):
    """SAPT's shared attention as published (preset ``paper``)."""

    preset = "paper"
    learned = True
    selects_per_task = True

    @classmethod
    def build(cls, d_model: int, router_preset: str = "paper", router_hidden: int = 100,
              router_temperature: float | None = None, **_: Any) -> SharedAttentionRouter:
        return make_shared_router(router_preset, d_model, router_hidden, router_temperature)

    def route(self, mix, input_ids, source_mask, task_index=None) -> Routing:
        w = self(mix.backbone.embed(input_ids), source_mask, mix.num_blocks)
        return Routing(w, w)

    def add_block(self, mix, inputs=None) -> None:
        features = None
        if inputs is not None:
            with torch.no_grad():
                features = self.feature(mix.backbone.embed(inputs["input_ids"]), inputs["source_mask"])
        self.add_key(features)

    def grow(self, n_blocks: int) -> None:
        while self.num_keys < n_blocks:
            self.add_key()

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
        self.keys.append(nn.Parameter(uniform_key(self.d_model, device)))
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


@register_router("key-query")
class KeyQueryRouter(Router):
    """L2P (Wang et al., CVPR 2022): a learnable key per prompt of a shared pool; the query is a frozen
    model feature of the input; the ``top_k`` keys of highest cosine similarity select their prompts.

    The selection itself has no gradient: keys learn through the surrogate loss
    ``sum over selected keys of (1 - cos(q, k))`` (the routing's ``loss``), which pulls them toward the
    queries that select them.
    """

    learned = True

    def __init__(self, d_model: int, top_k: int, pool_size: int = 10):
        super().__init__()
        self.d_model, self.top_k = d_model, top_k
        self.pool_size = pool_size  # prompts in the shared pool (L2P's M)
        self.keys = nn.ParameterList()
        # Moves with the module (not saved): the keys' device, which an empty pool cannot tell.
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    @classmethod
    def build(cls, d_model: int, top_k: int = 5, pool_size: int = 10, **_: Any) -> KeyQueryRouter:
        return cls(d_model, top_k, pool_size)

    def route(self, mix, input_ids, source_mask, task_index=None) -> Routing:
        selection, match_loss = self.select(mix.backbone.features(input_ids, source_mask))
        return Routing(selection, selection, match_loss)

    def add_block(self, mix, inputs=None) -> None:
        self.add_key()

    def trainable(self, current: int) -> list[nn.Parameter]:
        return list(self.keys)  # every key of the shared pool

    def grow(self, n_blocks: int) -> None:
        while self.num_keys < n_blocks:
            self.add_key()

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    def add_key(self) -> int:
        self.keys.append(nn.Parameter(uniform_key(self.d_model, self.anchor.device)))
        return self.num_keys - 1

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A 0/1 selection ``[B, n]`` with ``min(top_k, n)`` ones per input, and the matching loss."""
        keys = torch.stack(list(self.keys)).float()
        cos = torch.nn.functional.normalize(query.float(), dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).t()
        k = min(self.top_k, keys.shape[0])
        top = cos.topk(k, dim=-1).indices
        match_loss = (1.0 - cos.gather(1, top)).sum(1).mean()
        return torch.zeros_like(cos).scatter_(1, top, 1.0), match_loss


@register_router("source-attention")
class AttemptAttention(Router):
    """ATTEMPT's attention module G (Asai et al., EMNLP 2022).

    ``h = LayerNorm(W_up SiLU(W_down x))`` with ``x`` the max-pooled frozen input embeddings; each
    prompt is summarised by max-pooling over its tokens; ``a = softmax_j(P_j . h / T)`` with
    ``T = d * e``, over the source prompts and the task's own target prompt. With ``token_level``
    each prompt token is scored on its own (``a[j, l] = softmax_j(P_j,l . h / T)``): the mixture can
    differ from one prompt position to the next (an option beyond the paper).
    """

    needs_task_id = True  # the task id picks the target prompt
    uses_sources = True

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

    @classmethod
    def build(cls, d_model: int, router_hidden: int = 100, train_layer_norm: bool = True, token_level: bool = False,
              temperature: float | None = None, **_: Any) -> AttemptAttention:
        return cls(d_model, router_hidden, train_layer_norm, token_level, temperature)

    def trainable(self, current: int | None = None) -> list[nn.Parameter]:
        return [self.down.weight, self.up.weight] + (list(self.norm.parameters()) if self.train_layer_norm else [])

    def route(self, mix, input_ids, source_mask, task_index=None) -> Routing:
        """``P_target + sum_j a_j P_j``: weight ``a_j`` on each source, ``1 + a`` on the input's own target
        prompt (``task_index``: one task for the batch or one per input, ATTEMPT-m's mixed batches)."""
        if task_index is None:
            raise ValueError(f"{self.kind} routing needs the task index (it picks the target prompt)")
        pool = mix.pool
        b, m = input_ids.shape[0], pool.num_sources
        tasks = torch.as_tensor(task_index, device=input_ids.device).long().expand(b)
        prompts = pool.input_prompts()  # [n, L, d]
        a = self(mix.backbone.embed(input_ids), source_mask, prompts[:m], prompts[m + tasks])
        rows = torch.arange(b, device=input_ids.device)
        w = a.new_zeros((b, mix.num_blocks, *a.shape[2:]))
        w[:, :m] = a[:, :m]
        w[rows, m + tasks] = 1.0 + a[:, m]  # P_target + sum_j a_j P_j, j over the sources and the target
        reported = (w if w.dim() == 2 else w.mean(-1)).clone()
        reported[rows, m + tasks] -= 1.0  # report the attention itself, not 1 + a
        return Routing(w, reported)

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
