"""A pool of soft prompts, mixed by per-input weights and put in front of the input.

Block kinds, all in one pool (one tensor per block, ``[L, d]`` shallow or ``[depth, L, d]`` deep):
- *shallow* prompts go in front of the input embeddings (prompt tuning, SAPT, ATTEMPT);
- *deep* prompts (``depth="deep"``: P-tuning v2, prefix tuning) also replace the hidden states at the
  prompt positions at the input of every later transformer layer, so each layer has its own prompt;
- a *reparameterised* prompt (``encoder="mlp"`` or ``"lstm"``: prefix tuning, P-tuning) is the output of
  a small network applied to the raw prompt; exported prompts have it folded in. With ``residual`` it is
  the raw prompt plus that output, the network's last layer starting at zero, so training starts from
  the raw prompt (residual reparameterisation, Razdaibiedina et al., 2023);
- *sources* are frozen prompts loaded from files, the first blocks of the pool (ATTEMPT).

Combining (``combine``): ``"sum"`` gives ``sum_i w_i P_i`` for weights ``[B, n]`` (or per prompt token,
``[B, n, L]``), in one einsum; ``"concat"`` puts the prompts with a non-zero weight one after another in
index order (progressive prompts, L2P's top-k; every input must select the same number).

Decoders get the prompt in front of the prompt tokens (after any left padding, so positions stay
contiguous); encoder-decoders in front of the encoder input. Deep prompts are used in the encoder only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from petmix.backbone import Backbone
from petmix.data.collate import IGNORE

DEPTHS = ("shallow", "deep")
ENCODERS = ("none", "mlp", "lstm")


@dataclass
class PromptConfig:
    length: int = 10
    init: str = "vocab"  # "vocab": embeddings of random ids among the first `vocab_top`; or a .safetensors path
    vocab_top: int = 5000
    combine: str = "sum"  # "sum" | "concat"
    depth: str = "shallow"  # "shallow" | "deep"
    encoder: str = "none"  # "none" | "mlp" | "lstm": reparameterisation of each trained prompt
    encoder_hidden: int = 512
    residual: bool = False  # encoder output added to the raw prompt, starting at 0 (not the paper's P-tuning)
    sources: list[str] = field(default_factory=list)  # frozen prompt files, the pool's first blocks


def load_prompt_file(path: str | Path) -> torch.Tensor:
    """The ``prompt`` tensor ``[L, d]`` of a saved prompt (``petmix`` exports, source libraries)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    tensors = load_file(path)
    if "prompt" not in tensors:
        raise ValueError(f"{path}: no 'prompt' tensor")
    return tensors["prompt"].float()


class PromptEncoder(nn.Module):
    """Reparameterisation ``P = f(P_raw)``: an MLP (prefix tuning) or a BiLSTM then an MLP (P-tuning).

    ``residual``: ``P = P_raw + f(P_raw)`` with f's last layer at zero, so ``P`` starts as ``P_raw``. A fresh
    f maps a vocabulary embedding far from every token (docs/tuned.md: P-tuning); this starts where prompt
    tuning starts and lets f learn a correction."""

    def __init__(self, kind: str, d: int, hidden: int, residual: bool = False):
        super().__init__()
        self.kind = kind
        self.residual = residual
        self.lstm = nn.LSTM(d, d // 2, num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else None
        act = nn.ReLU() if kind == "lstm" else nn.Tanh()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), act, nn.Linear(hidden, d))
        if residual:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw if raw.dim() == 3 else raw.unsqueeze(0)  # [depth, L, d]: each layer's prompt is a sequence
        if self.lstm is not None:
            x = self.lstm(x)[0]
        x = self.mlp(x)
        x = x if raw.dim() == 3 else x.squeeze(0)
        return raw + x if self.residual else x


def concat_selected(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked [n, depth, L, d]``, ``weights [B, n]`` with k non-zero entries per row -> ``[B, depth, k*L, d]``."""
    chosen = weights != 0
    counts = chosen.sum(1)
    k = int(counts[0])
    if k == 0 or bool((counts != k).any()):
        raise ValueError("concat prompts: every input must select the same, non-zero number of prompts")
    idx = chosen.nonzero()[:, 1].view(-1, k)  # row-major: each row's indices in ascending order
    scale = weights.gather(1, idx).to(stacked.dtype)[..., None, None, None]
    picked = stacked[idx] * scale  # [B, k, depth, L, d]
    b, _, depth, length, d = picked.shape
    return picked.permute(0, 2, 1, 3, 4).reshape(b, depth, k * length, d)


class PromptPool:
    def __init__(self, backbone: Backbone, cfg: PromptConfig, seed: int = 0):
        if cfg.depth not in DEPTHS or cfg.encoder not in ENCODERS or cfg.combine not in ("sum", "concat"):
            raise ValueError(f"prompt settings: depth in {DEPTHS}, encoder in {ENCODERS}, combine sum|concat")
        self.backbone = backbone
        self.cfg = cfg
        self.prompts = nn.ParameterList()
        self.encoders = nn.ModuleList()  # one per trained block when reparameterised (empty otherwise)
        self._generator = torch.Generator().manual_seed(seed)
        self.layers = transformer_layers(backbone)
        self.depth = len(self.layers) if cfg.depth == "deep" else 1
        self._deep: tuple[torch.Tensor, torch.Tensor, int] | None = None  # positions, prompts, width
        if cfg.depth == "deep":
            for k, layer in enumerate(self.layers[1:], start=1):
                layer.register_forward_pre_hook(self._deep_hook(k), with_kwargs=True)
        self.source_names: list[str] = []
        for path in cfg.sources:
            prompt = load_prompt_file(path).to(backbone.device)
            if prompt.shape[-1] != backbone.hidden_size:
                raise ValueError(f"{path}: prompt width {prompt.shape[-1]}, the model's is {backbone.hidden_size}")
            self.prompts.append(nn.Parameter(prompt, requires_grad=False))
            self.source_names.append(Path(path).stem)

    @property
    def num_sources(self) -> int:
        return len(self.source_names)

    @property
    def num_blocks(self) -> int:
        return len(self.prompts)

    def _initial(self) -> torch.Tensor:
        emb = self.backbone.model.get_input_embeddings().weight
        shape = (self.depth, self.cfg.length) if self.depth > 1 else (self.cfg.length,)
        if self.cfg.init == "vocab":
            top = min(self.cfg.vocab_top, emb.shape[0])
            ids = torch.randint(0, top, shape, generator=self._generator)
            return emb[ids.to(emb.device)].detach().float().clone()
        path = Path(self.cfg.init)
        prompt = load_prompt_file(path)
        if prompt.shape != (self.cfg.length, emb.shape[1]):
            raise ValueError(f"{path}: prompt of shape {tuple(prompt.shape)}, expected {(self.cfg.length, emb.shape[1])}")
        if self.depth > 1:  # a shallow source prompt starts every layer of a deep one
            prompt = prompt.unsqueeze(0).repeat(self.depth, 1, 1)
        return prompt.to(emb.device)

    def add_block(self) -> int:
        self.prompts.append(nn.Parameter(self._initial()))
        if self.cfg.encoder != "none":
            enc = PromptEncoder(self.cfg.encoder, self.backbone.hidden_size, self.cfg.encoder_hidden,
                                self.cfg.residual)
            self.encoders.append(enc.to(self.backbone.device))
        return self.num_blocks - 1

    def _encoder(self, i: int) -> PromptEncoder | None:
        j = i - self.num_sources
        return self.encoders[j] if self.cfg.encoder != "none" and j >= 0 else None

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        enc = self._encoder(i)
        return [self.prompts[i]] + (list(enc.parameters()) if enc is not None else [])

    def effective(self, i: int) -> torch.Tensor:
        """Block i as used: ``[depth_i, L, d]`` (the encoder applied, if any)."""
        raw = self.prompts[i]
        enc = self._encoder(i)
        p = enc(raw) if enc is not None else raw
        return p if p.dim() == 3 else p.unsqueeze(0)

    def input_prompts(self, indices: list[int] | None = None) -> torch.Tensor:
        """The input-level prompts ``[n, L, d]`` of blocks ``indices`` (default: all)."""
        indices = range(self.num_blocks) if indices is None else indices
        return torch.stack([self.effective(i)[0] for i in indices])

    def stacked(self) -> torch.Tensor:
        """All blocks ``[n, depth, L, d]``; shallow blocks (sources) repeat over the depth."""
        return torch.stack([self.effective(i).expand(self.depth, -1, -1) for i in range(self.num_blocks)])

    def mixed(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-input prompts ``[B, depth, L', d]`` for weights ``[B, n]`` (or ``[B, n, L]``, per token)."""
        stacked = self.stacked()
        if self.cfg.combine == "concat":
            return concat_selected(stacked, weights)
        if weights.dim() == 3:  # token-level weights: each prompt position has its own mixture
            return torch.einsum("bnl,nkld->bkld", weights.to(stacked.dtype), stacked)
        return torch.einsum("bn,nkld->bkld", weights.to(stacked.dtype), stacked)

    def model_inputs(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model (or ``generate``) with the instance prompt in front of the input."""
        embeds = self.backbone.embed(batch["input_ids"])
        mixed = self.mixed(weights)
        prompt = mixed[:, 0].to(embeds.dtype)
        mask = batch["attention_mask"]
        b, length = prompt.shape[0], prompt.shape[1]
        ones = torch.ones(b, length, dtype=mask.dtype, device=mask.device)
        embeds = torch.cat([prompt, embeds], dim=1)
        mask = torch.cat([ones, mask], dim=1)
        positions = torch.arange(length, device=mask.device).expand(b, length)
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
                positions = positions + pads[:, None]
        if self.depth > 1:
            self._deep = (positions, mixed[:, 1:], embeds.shape[1])
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

    def _deep_hook(self, k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._deep is None:
                return None
            positions, prompts, width = self._deep
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != width:  # a cached decoding step: the prompt positions were done in prefill
                return None
            p = prompts[:, k - 1].to(hidden.dtype)
            new = hidden.scatter(1, positions[..., None].expand(-1, -1, hidden.shape[-1]), p)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def clear(self) -> None:
        """Forget the deep prompts of the last call (shallow prompts go in through the inputs)."""
        self._deep = None

    def export(self, i: int) -> torch.Tensor:
        """Block i with its encoder folded in: ``[L, d]`` (shallow) or ``[depth, L, d]``."""
        with torch.no_grad():
            p = self.effective(i).detach().float().cpu()
        return p[0] if p.shape[0] == 1 else p

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"prompt.{i}": p.detach() for i, p in enumerate(self.prompts)}
        for j, enc in enumerate(self.encoders):
            state.update({f"prompt_encoder.{j}.{k}": v.detach() for k, v in enc.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        n = sum(1 for k in state if k.startswith("prompt."))
        while self.num_blocks < n:
            self.add_block()
        with torch.no_grad():
            for i in range(n):
                self.prompts[i].copy_(state[f"prompt.{i}"])
            for j, enc in enumerate(self.encoders):
                enc.load_state_dict({k.split(".", 2)[2]: v for k, v in state.items()
                                     if k.startswith(f"prompt_encoder.{j}.")})


def transformer_layers(backbone: Backbone) -> list[nn.Module]:
    """The blocks deep prompts enter: a decoder's layers, or an encoder-decoder's encoder blocks."""
    model = backbone.model
    if backbone.is_seq2seq:
        return list(model.get_encoder().block)
    layers = getattr(model.base_model, "layers", None) or getattr(model.base_model, "h", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find its transformer layers for deep prompts")
    return list(layers)
