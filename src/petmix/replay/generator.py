"""SAPT's pseudo-sample generator: generative replay of task *inputs*, never of real examples.

After a task is learned, a generator is trained for it: the same frozen backbone (a separate
instance, so the main run's LoRA pool is untouched) with its own LoRA block (r 8, alpha 32), taught
to map the fixed trigger prompt ``__gen__`` to ``{definition} __inp__ {input}`` for the task's
training inputs. It is then sampled (top-k 20, repetition penalty 2.5) in rounds; each generation is
parsed (the text after the ``__inp__`` separator) and the valid, unique ones are kept until there
are enough: 2% of the task's train size, at least 1, by default.

Only the generated inputs leave this module. The generator's weights are dropped afterwards
(optionally saved when a path is given).
"""

from __future__ import annotations

import gc
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from petmix.backbone import Backbone, load_backbone
from petmix.blocks.lora import LoRAConfig
from petmix.data.collate import encode_answers, encode_prompts, prompt_batch, training_batch
from petmix.data.task import Task, cap
from petmix.errors import PetmixError
from petmix.mixture import Mixture
from petmix.runs import damaged, read_json, read_jsonl, save_tensors, write_json, write_jsonl

log = logging.getLogger(__name__)

# Why a generation was not kept, in the order the checks run.
DROP_REASONS = ("no_separator", "empty", "too_long", "duplicate", "surplus")


@dataclass
class GeneratorConfig:
    r: int = 8
    alpha: float = 32.0
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 8
    max_train: int | None = 200  # training inputs used to train the generator (a seeded sample)
    top_k: int = 20
    repetition_penalty: float = 2.5
    max_new_tokens: int = 96  # tokens for the input part; the definition and separator's tokens come on top
    keep_fraction: float = 0.02
    min_keep: int = 1
    keep: int | None = None  # absolute number to keep; overrides keep_fraction / min_keep
    max_rounds: int = 8
    samples_per_round: int = 16
    max_input_chars: int = 2000
    trigger: str = "__gen__"
    separator: str = "__inp__"
    # Sample only the input: start each sample from "{definition} __inp__" instead of letting the
    # generator rewrite the (fixed) definition first. petmix's default; the reference samples it all.
    force_prefix: bool = True
    bf16: bool = False
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.r >= 1, "r must be >= 1"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.max_train is None or self.max_train >= 1, "max_train must be >= 1 or None"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_new_tokens >= 2, "max_new_tokens must be >= 2"),
            (0.0 <= self.keep_fraction <= 1.0, "keep_fraction must lie in [0, 1]"),
            (self.min_keep >= 0, "min_keep must be >= 0"),
            (self.keep is None or self.keep >= 0, "keep must be >= 0 or None"),
            (self.max_rounds >= 1 and self.samples_per_round >= 1, "max_rounds and samples_per_round must be >= 1"),
            (self.max_input_chars >= 1, "max_input_chars must be >= 1"),
            (bool(self.trigger.strip()) and bool(self.separator.strip()), "trigger and separator must be non-empty"),
        ]
        for ok, problem in checks:
            if not ok:
                raise PetmixError(f"generator config: {problem}")


def keep_count(cfg: GeneratorConfig, n_train: int) -> int:
    """How many pseudo inputs to keep: ``cfg.keep`` if set, else keep_fraction of n_train (rounded
    half up), at least ``min_keep``."""
    if cfg.keep is not None:
        return cfg.keep
    return max(cfg.min_keep, math.floor(cfg.keep_fraction * n_train + 0.5))


def generator_target(definition: str, text: str, separator: str = "__inp__") -> str:
    """What the generator learns to write for one training input: ``{definition} __inp__ {input}``."""
    return f"{definition.strip()} {separator} {text.strip()}".strip()


def _separator_pattern(separator: str) -> re.Pattern[str]:
    # Sampling with a repetition penalty often garbles the underscores of "__inp__" ("__inp _"):
    # accept any run of underscores and spaces around the separator's core word.
    core = separator.strip("_ ")
    if not core or core == separator:
        return re.compile(re.escape(separator))
    return re.compile(r"_[_ ]*" + re.escape(core) + r"[_ ]*_")


def _parse(text: str, separator: str, max_chars: int) -> tuple[str | None, str | None]:
    """(input, None) or (None, reason)."""
    parts = _separator_pattern(separator).split(text, maxsplit=2)
    if len(parts) < 2:
        return None, "no_separator"
    # The text after the first separator; a generator that repeats the pattern is cut at the next one.
    body = parts[1].strip()
    if not any(ch.isalnum() for ch in body):  # nothing, or punctuation only
        return None, "empty"
    if len(body) > max_chars:
        return None, "too_long"
    return body, None


def parse_generation(text: str, separator: str = "__inp__", max_chars: int = 2000) -> str | None:
    """The input in one generation (text after the separator, stripped), or None when it has no
    separator, nothing after it, or more than ``max_chars`` characters."""
    return _parse(text, separator, max_chars)[0]


def select_pseudo_inputs(
    candidates: list[str], want: int, separator: str = "__inp__", max_chars: int = 2000
) -> tuple[list[str], dict[str, int]]:
    """Parse raw generations in order; keep the first ``want`` valid, unique inputs.

    Stats: ``tried``, ``kept`` and one count per reason in :data:`DROP_REASONS` (``surplus``: valid and
    unique but beyond ``want``).
    """
    stats = {"tried": len(candidates), "kept": 0, **{r: 0 for r in DROP_REASONS}}
    kept: list[str] = []
    seen: set[str] = set()
    for raw in candidates:
        body, reason = _parse(raw, separator, max_chars)
        if body is not None and body in seen:
            reason = "duplicate"
        elif body is not None and len(kept) >= want:
            reason = "surplus"
        if reason is not None:
            stats[reason] += 1
            continue
        assert body is not None
        seen.add(body)
        kept.append(body)
    stats["kept"] = len(kept)
    return kept, stats


# ---- generator training and sampling ------------------------------------------------------------

def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_generator(backbone: Backbone, mix: Mixture, targets: list[str], cfg: GeneratorConfig) -> dict[str, Any]:
    """Teach the mixture's single block to map the trigger to each target (AdamW, constant lr)."""
    tok, device = backbone.tokenizer, backbone.device
    prompt = encode_prompts(tok, [cfg.trigger], max_source_len=64)[0]
    answers = encode_answers(tok, targets, cfg.max_new_tokens)
    params = mix.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    n_batches = math.ceil(len(targets) / cfg.batch_size)
    total = max(1, round(cfg.epochs * n_batches))
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    mix.train()
    bar = tqdm(range(total), desc="generator training", unit="step", dynamic_ncols=True, leave=False, disable=None)
    for step in bar:
        b = step % n_batches
        if b == 0:
            order = torch.randperm(len(targets), generator=g).tolist()
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = training_batch(tok, [prompt] * len(idx), [answers[i] for i in idx], backbone.is_seq2seq)
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, cfg.bf16):
            loss = mix(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    mix.eval()
    return {"steps": total, "first_loss": round(losses[0], 5), "final_loss": round(losses[-1], 5),
            "mean_loss": round(sum(losses) / len(losses), 5)}


@torch.no_grad()
def sample_round(backbone: Backbone, mix: Mixture, cfg: GeneratorConfig, round_index: int, prefix: str = "") -> list[str]:
    """``cfg.samples_per_round`` sampled generations from the trigger prompt (decoded, special tokens
    removed), each continuing the forced ``prefix`` (returned with it). Seeded by (cfg.seed,
    round_index): the same settings give the same texts."""
    tok, device = backbone.tokenizer, backbone.device
    prompt = encode_prompts(tok, [cfg.trigger], max_source_len=64)[0]
    forced = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    if not backbone.is_seq2seq:
        prompt = prompt + forced  # the decoder continues after the forced prefix
    batch = prompt_batch(tok, [prompt] * cfg.samples_per_round, left=not backbone.is_seq2seq)
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (round_index + 1))
    kwargs, _ = mix.prepare_fn()(batch)
    if backbone.is_seq2seq and forced:
        start = backbone.model.config.decoder_start_token_id
        kwargs["decoder_input_ids"] = torch.tensor([[start] + forced] * cfg.samples_per_round, device=device)
    try:
        with _autocast(device, cfg.bf16):
            out = backbone.model.generate(
                **kwargs,
                do_sample=True,
                top_k=cfg.top_k,
                top_p=1.0,
                temperature=1.0,
                repetition_penalty=cfg.repetition_penalty,
                max_new_tokens=cfg.max_new_tokens,
                num_beams=1,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
    finally:
        mix.clear_weights()
    if not backbone.is_seq2seq:
        out = out[:, kwargs["input_ids"].shape[1]:]  # decoders echo the prompt
    elif forced:
        out = out[:, 1 + len(forced):]
    head = f"{prefix} " if prefix else ""
    return [(head + tok.decode(row, skip_special_tokens=True)).strip() for row in out]


def _explain(want: int, rounds: int, stats: dict[str, int]) -> str:
    dropped = ", ".join(f"{stats[r]} {r.replace('_', ' ')}" for r in DROP_REASONS if stats[r])
    text = f"kept {stats['kept']} of {want} wanted from {stats['tried']} generations in {rounds} round(s)"
    return f"{text}; dropped: {dropped}" if dropped else text


def generate_pseudo_inputs(
    model: str | Path,
    task: Task,
    cfg: GeneratorConfig | None = None,
    n_train: int | None = None,
    *,
    device: str | torch.device | None = None,
    generator_path: str | Path | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Train a generator on ``task.train`` inputs, sample it, return ``(inputs, info)``.

    ``model`` is loaded afresh (its own instance: a mixture installs its LoRA layers in place).
    ``n_train`` is the train size the keep rule uses (default ``len(task.train)``). ``device``
    defaults to CUDA when available. ``generator_path``, if given, receives the generator's LoRA
    weights (safetensors); otherwise they are discarded. The caller's torch RNG state is left as it was.
    """
    cfg = cfg or GeneratorConfig()
    cfg.validate()
    if not task.train:
        raise PetmixError(f"task {task.name}: no training inputs to train a pseudo-sample generator on")
    n_train = len(task.train) if n_train is None else n_train
    want = keep_count(cfg, n_train)
    info: dict[str, Any] = {"task": task.name, "settings": asdict(cfg), "n_train": n_train, "want": want}
    if want == 0:
        stats = {"tried": 0, "kept": 0, **{r: 0 for r in DROP_REASONS}}
        info.update(rounds=0, counts={**stats, "copies_of_real": 0}, timings={"train_s": 0.0, "sample_s": 0.0},
                    explanation="nothing wanted (keep count 0)")
        return [], info

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    fork_devices = [device] if device.type == "cuda" else []
    examples = cap(task.train, cfg.max_train, cfg.seed)
    targets = [generator_target(task.definition, ex.input, cfg.separator) for ex in examples]

    backbone = load_backbone(str(model), device=device)
    # The generator writes the whole definition before each input: its token budget (for training
    # targets and for sampling) is the definition and separator's length plus max_new_tokens.
    prefix = len(backbone.tokenizer(generator_target(task.definition, "", cfg.separator), add_special_tokens=False)["input_ids"])
    run_cfg = replace(cfg, max_new_tokens=prefix + cfg.max_new_tokens)
    info["token_budget"] = run_cfg.max_new_tokens
    with torch.random.fork_rng(devices=fork_devices):  # the caller's RNG streams stay untouched
        torch.manual_seed(cfg.seed)
        mix = Mixture(backbone, LoRAConfig(r=cfg.r, alpha=cfg.alpha), routing="sum")
        mix.add_task()
        mix.requires_grad_(False)
        for p in mix.pool.block_parameters(0):
            p.requires_grad_(True)
        started = time.time()
        train_info = train_generator(backbone, mix, targets, run_cfg)
        train_s = time.time() - started
        if generator_path is not None:
            save_tensors(generator_path, mix.adapter_state(), metadata={"task": task.name, "kind": "generator"})

        started = time.time()
        raw: list[str] = []
        rounds = 0
        kept: list[str] = []
        stats: dict[str, int] = {}
        bar = tqdm(total=want, desc="sampling pseudo-inputs", unit="input", dynamic_ncols=True, leave=False, disable=None)
        while rounds < cfg.max_rounds:
            if cfg.force_prefix:
                raw += sample_round(backbone, mix, cfg, rounds, prefix=generator_target(task.definition, "", cfg.separator))
            else:
                raw += sample_round(backbone, mix, run_cfg, rounds)
            rounds += 1
            kept, stats = select_pseudo_inputs(raw, want, cfg.separator, cfg.max_input_chars)
            bar.update(min(len(kept), want) - bar.n)
            if len(kept) >= want:
                break
        bar.close()
        sample_s = time.time() - started

    real = {ex.input.strip() for ex in task.train}
    copies = sum(1 for x in kept if x in real)
    info.update(
        n_generator_train=len(targets),
        rounds=rounds,
        counts={**stats, "copies_of_real": copies},
        explanation=_explain(want, rounds, stats),
        generator={**train_info, "backbone": backbone.name, "device": str(device)},
        timings={"train_s": round(train_s, 2), "sample_s": round(sample_s, 2)},
        dropped_examples=[t for t in raw if parse_generation(t, cfg.separator, cfg.max_input_chars) is None][:5],
    )
    log.info("pseudo inputs for %s: %s (%.1f s train, %.1f s sample)", task.name, info["explanation"],
             train_s, sample_s)

    # The generator is not needed any more: free its weights (and its backbone copy).
    del mix, backbone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return kept, info


# ---- run directory ---------------------------------------------------------------------------------

def pseudo_paths(out_dir: str | Path, task_name: str) -> tuple[Path, Path]:
    """(inputs .jsonl, info .json) of a task under ``out_dir/pseudo``."""
    base = Path(out_dir) / "pseudo"
    return base / f"{task_name}.jsonl", base / f"{task_name}.json"


def save_pseudo_inputs(out_dir: str | Path, task_name: str, inputs: list[str], info: dict[str, Any]) -> None:
    """``out_dir/pseudo/<task>.jsonl`` (one ``{"input": ...}`` per line) and ``<task>.json`` (info),
    each written atomically."""
    rows_path, info_path = pseudo_paths(out_dir, task_name)
    write_jsonl(rows_path, ({"input": x} for x in inputs))
    write_json(info_path, info)


def load_pseudo_inputs(out_dir: str | Path, task_name: str) -> list[str] | None:
    """The saved pseudo inputs of a task, or None when none were saved."""
    rows_path, _ = pseudo_paths(out_dir, task_name)
    if not rows_path.is_file():
        return None
    rows = read_jsonl(rows_path)
    if not all(isinstance(r, dict) and isinstance(r.get("input"), str) for r in rows):
        raise damaged(rows_path, 'every line must be {"input": text}')
    return [r["input"] for r in rows]


def load_pseudo_info(out_dir: str | Path, task_name: str) -> dict[str, Any] | None:
    _, info_path = pseudo_paths(out_dir, task_name)
    if not info_path.is_file():
        return None
    return read_json(info_path)
