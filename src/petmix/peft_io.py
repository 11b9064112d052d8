"""From and to Hugging Face PEFT: a run's LoRA blocks as PEFT adapters, PEFT adapters as frozen blocks.

Export (``petmix export RUN --to DIR``) writes each LoRA block as ``DIR/<task>/`` with
``adapter_config.json`` and ``adapter_model.safetensors``, the folder ``PeftModel.from_pretrained``
reads. petmix's block ``i`` on layer ``L`` adds ``(alpha / r) * B_i A_i x``; PEFT's LoRA layer adds
``(lora_alpha / r) * lora_B(lora_A(x))`` with ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``:
the same tensors under the key ``base_model.model.<L>.lora_{A,B}.weight`` (``L`` is the module's path
in the transformers model, which is what petmix names its layers by). What PEFT has no form for (the
router that weighs the blocks per input, prompt pools) is written beside the adapters as safetensors
and JSON, and the model card (``DIR/README.md``) says so.

Import (``--import-adapters name=DIR,...``) reads PEFT LoRA folders into blocks of the pool. A pool has
one rank and scaling, so an adapter of a smaller rank is zero-padded (extra rows of A and columns of
B are zero: the product is unchanged) and its scaling is folded into B; a larger rank, modules the
pool does not wrap, shapes that do not fit the model, another base model, DoRA, biases or
``modules_to_save`` are refused with the reason (exit status 2) before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from petmix.errors import PetmixError
from petmix.runs import read_json, write_json

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The transformers hub names of petmix's packaged models (their adapters name either).
MODEL_ALIASES = {"smollm2-135m": ["HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"]}
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# PEFT LoRA options petmix's pooled layer cannot reproduce: option -> (value meaning "off", why)
_UNSUPPORTED = {
    "use_dora": (False, "DoRA adds a magnitude vector per module"),
    "bias": ("none", "LoRA biases change the base layer's bias"),
    "fan_in_fan_out": (False, "Conv1D (GPT-2 style) layers are not pooled"),
}


def safe_name(task: str) -> str:
    """A folder name for a task (task names may be paths)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("._") or "task"


# ---- export ---------------------------------------------------------------------------------------


def _lora_blocks(state: dict[str, torch.Tensor]) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{block: {layer name: (A, B)}}`` from a mixture's saved state (``lora.<i>.<layer>.A``)."""
    blocks: dict[int, dict[str, list[torch.Tensor | None]]] = {}
    for key, value in state.items():
        if not key.startswith("lora."):
            continue
        _, i, rest = key.split(".", 2)
        layer, ab = rest.rsplit(".", 1)
        blocks.setdefault(int(i), {}).setdefault(layer, [None, None])[0 if ab == "A" else 1] = value
    return {i: {name: (ab[0], ab[1]) for name, ab in layers.items()} for i, layers in sorted(blocks.items())}


def block_names(method: Any, tasks: list[str], n_blocks: int) -> list[str]:
    """The task each block was trained on (one shared block is ``shared``)."""
    if method.new_block_per_task and not method.joint:
        return [safe_name(t) for t in tasks][:n_blocks]
    return ["shared"] if n_blocks == 1 else [f"block{i + 1}" for i in range(n_blocks)]


def _family(run: Path, config: dict[str, Any], results: dict[str, Any] | None) -> str:
    family = ((results or {}).get("model") or {}).get("family")
    if family:
        return family
    from transformers import AutoConfig

    from petmix.backbone import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(config["model"]))
    return "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal"


def write_peft_adapter(folder: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float,
                       target_modules: list[str], base_model: str, family: str, dropout: float = 0.0) -> None:
    """One LoRA block as a PEFT adapter folder (config written by PEFT's own ``LoraConfig``)."""
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(target_modules),
                        bias="none", task_type="SEQ_2_SEQ_LM" if family == "seq2seq" else "CAUSAL_LM",
                        base_model_name_or_path=base_model, inference_mode=True)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for name, (a, b) in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    save_file(tensors, folder / PEFT_WEIGHTS, metadata={"format": "pt"})


def export_run(run: str | Path, to: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every LoRA block of a finished run as a PEFT adapter, the rest as safetensors, and a card.

    The folder is built beside ``to`` and renamed into place, so a failed export leaves nothing."""
    from petmix.methods import get_method

    run, to = Path(run), Path(to)
    cfg_path, adapters = run / "config.json", run / "adapters.safetensors"
    if not cfg_path.is_file() or not adapters.is_file():
        raise PetmixError(f"{run}: not a finished petmix training run (needs config.json and adapters.safetensors)")
    if to.exists() and (not to.is_dir() or any(to.iterdir())) and not overwrite:
        raise PetmixError(f"{to}: exists and is not empty (choose a new folder or pass --overwrite)")
    config = read_json(cfg_path)
    results = read_json(run / "results.json") if (run / "results.json").is_file() else None
    method = get_method(config["method"])
    state = load_file(adapters)
    blocks = _lora_blocks(state)
    tasks = list(config.get("tasks") or (results or {}).get("tasks") or [])
    names = block_names(method, tasks, len(blocks))
    family = _family(run, config, results) if blocks else ""
    r, alpha = int(config.get("lora_r", 4)), float(config.get("lora_alpha", 32.0))
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    written: list[Path] = []
    try:
        for i, name in zip(sorted(blocks), names):
            layers = blocks[i]
            targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
            write_peft_adapter(tmp / name, layers, r, alpha, targets, config["model"], family)
            written.append(to / name)
        router = {k[len("router."):]: v.contiguous() for k, v in state.items() if k.startswith("router.")}
        rest = {k: v.contiguous() for k, v in state.items() if not k.startswith(("lora.", "router."))}
        extra: dict[str, Any] = {"method": method.name, "routing": method.routing, "tasks": tasks,
                                 "blocks": names, "model": config["model"], "family": family}
        if router:
            save_file(router, tmp / "router.safetensors")
            write_json(tmp / "router.json", {
                **extra, "router_hidden": config.get("router_hidden"),
                "note": "petmix's router: per-input weights over the blocks, in the order of 'blocks'. "
                        "PEFT has no form for it; load the run with petmix.load(RUN) to route."})
            written.append(to / "router.safetensors")
        if rest:  # prompt pools, BitFit biases, full fine-tuning weights: no PEFT LoRA form
            save_file(rest, tmp / "blocks.safetensors")
            write_json(tmp / "blocks.json", {**extra, "note": f"{method.block} blocks in petmix's own layout"})
            written.append(to / "blocks.safetensors")
        (tmp / "README.md").write_text(model_card(config, results, method, names, bool(router), bool(rest),
                                                  bool(blocks), r, alpha, str(to)), encoding="utf-8")
        written.append(to / "README.md")
        if to.exists():
            shutil.rmtree(to)
        tmp.rename(to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def model_card(config: dict[str, Any], results: dict[str, Any] | None, method: Any, names: list[str],
               has_router: bool, has_rest: bool, has_lora: bool, r: int, alpha: float, where: str) -> str:
    tasks = list(config.get("tasks") or [])
    targets = ", ".join(config.get("target_modules") or []) or "q and v attention projections (petmix's default)"
    lines = [f"# petmix run: {method.name}", "",
             f"- **Base model:** `{config['model']}`",
             f"- **Method:** {method.name}: {method.summary}" + (f" ({method.paper})" if method.paper else ""),
             "- **Tasks, in training order:** " + ", ".join(f"`{t}`" for t in tasks)]
    if has_lora:
        lines.append(f"- **LoRA:** rank {r}, alpha {alpha:g} (scaling {alpha / r:g}), on {targets}")
    lines += ["", "## Files", ""]
    if has_lora:
        lines += [f"- `{n}/`: a PEFT LoRA adapter (`{PEFT_CONFIG}`, `{PEFT_WEIGHTS}`)" for n in names]
    if has_router:
        lines.append("- `router.safetensors`, `router.json`: petmix's router (per-input weights over the blocks). "
                     "PEFT has no form for it.")
    if has_rest:
        lines.append(f"- `blocks.safetensors`, `blocks.json`: {method.block} blocks in petmix's layout "
                     "(PEFT has no LoRA form for them).")
    if results:
        names_t = results.get("tasks", tasks)
        lines += ["", "## Scores", "", "Row i: scores after training stage i (" +
                  ", ".join(sorted({p.get('metric', '?') for p in results.get('per_task', {}).values()})) + ").", "",
                  "| after | " + " | ".join(names_t) + " |", "|---" * (len(names_t) + 1) + "|"]
        for stage, row in zip(results.get("stage_names", []), results.get("matrix", [])):
            lines.append(f"| {stage} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
        metrics = results.get("metrics") or {}
        lines += ["", "Metrics: " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in metrics.items())]
    if has_lora:
        first = names[0]
        mixed = ("The run itself mixes the blocks per input with its router (no task id); one adapter alone "
                 "is that task's block at weight 1." if method.routes_per_task else
                 f"The run combined its blocks by `{method.routing}` routing.")
        lines += ["", "## Loading", "", mixed, "", "With PEFT, one task's block:", "", "```python",
                  "from peft import PeftModel",
                  "from petmix.backbone import load_backbone  # or transformers' AutoModelFor... on the same weights",
                  "",
                  f"base = load_backbone({config['model']!r}).model",
                  f"model = PeftModel.from_pretrained(base, \"{where}/{first}\")",
                  "```", "", f"Several blocks in one model: `model.load_adapter(\"{where}/<task>\", adapter_name=\"<task>\")`; "
                  "PEFT's Arrow (`create_arrow_model`) routes over them without a task id.", "",
                  "As frozen blocks of a new petmix run (learns only the router): "
                  "`petmix train --method sapt-lora --import-adapters " +
                  ",".join(f"{n}={where}/{n}" for n in names[:2]) + " ...`"]
    if config["model"] in MODEL_ALIASES:
        lines += ["", f"`{config['model']}` is petmix's packaged copy of {MODEL_ALIASES[config['model']][0]} "
                  "(de-quantised from its Q4_1 GGUF): load it with `petmix.backbone.load_backbone` so that the "
                  "adapters meet the weights they were trained on."]
    return "\n".join(lines) + "\n"


# ---- import ---------------------------------------------------------------------------------------


@dataclass
class ImportedAdapter:
    task: str
    folder: Path
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # at the pool's rank and scaling
    rank: int
    scaling: float


def parse_import_specs(specs: list[str] | str) -> list[tuple[str, Path]]:
    """``["name=DIR", ...]`` (or one comma-separated string) as (task, folder) pairs."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, folder = spec.strip().partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise PetmixError(f"import_adapters: {spec!r} is not name=FOLDER")
        pairs.append((name.strip(), Path(folder.strip()).expanduser()))
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PetmixError(f"import_adapters: task {dup[0]!r} is given twice")
    return pairs


def _same_model(adapter_base: str, model_name: str, model_path: str, config_name: str) -> bool:
    def forms(name: str) -> set[str]:
        name = name.rstrip("/")
        out = {name.lower(), Path(name).name.lower()}
        for alias in MODEL_ALIASES.get(name, []):
            out |= {alias.lower(), Path(alias).name.lower()}
        return {f for f in out if f}

    ours = forms(model_name) | forms(model_path) | (forms(config_name) if config_name else set())
    return bool(forms(adapter_base) & ours)


def read_peft_adapter(folder: Path, model: nn.Module, *, targets: list[str], r: int, alpha: float,
                      model_name: str, model_path: str, task: str = "") -> ImportedAdapter:
    """A PEFT LoRA folder as blocks for a pool of rank ``r``, scaling ``alpha / r`` on ``targets``.

    ``model`` is the backbone's transformers model (before or after the pool wraps its layers)."""
    from petmix.blocks.lora import PooledLoRALinear

    where = f"{folder}"
    if not folder.is_dir():
        raise PetmixError(f"{where}: adapter folder not found" + (f" (task {task})" if task else ""))
    cfg_file, weights_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not cfg_file.is_file():
        raise PetmixError(f"{where}: not a PEFT adapter folder (no {PEFT_CONFIG})")
    try:
        pcfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PetmixError(f"{cfg_file}: not valid JSON ({err})") from None
    if not isinstance(pcfg, dict) or str(pcfg.get("peft_type", "")).upper() != "LORA":
        kind = pcfg.get("peft_type") if isinstance(pcfg, dict) else None
        raise PetmixError(f"{where}: not a PEFT LoRA adapter (peft_type {kind!r}; petmix imports LORA)")
    if not weights_file.is_file():
        other = " (adapter_model.bin is a pickle: save it as safetensors)" if (folder / "adapter_model.bin").exists() else ""
        raise PetmixError(f"{where}: no {PEFT_WEIGHTS}{other}")
    base = pcfg.get("base_model_name_or_path")
    config_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if base and not _same_model(str(base), model_name, model_path, config_name):
        raise PetmixError(f"{where}: adapter for another base model ({base!r}); this run's model is {model_name!r}")
    for option, (off, why) in _UNSUPPORTED.items():
        if pcfg.get(option, off) not in (off, None):
            raise PetmixError(f"{where}: {option}={pcfg[option]!r} is not supported ({why})")
    if pcfg.get("modules_to_save"):
        raise PetmixError(f"{where}: modules_to_save {pcfg['modules_to_save']} is not supported "
                          "(fully trained modules are not LoRA blocks)")
    if pcfg.get("alpha_pattern"):
        raise PetmixError(f"{where}: alpha_pattern is not supported (one lora_alpha per adapter)")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as err:
        raise PetmixError(f"{weights_file}: unreadable safetensors ({err})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise PetmixError(f"{weights_file}: key {key!r} is not a LoRA A/B weight (unsupported adapter part)")
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    if not pairs:
        raise PetmixError(f"{weights_file}: no LoRA weights")
    modules = dict(model.named_modules())
    lora_alpha = float(pcfg.get("lora_alpha", pcfg.get("r", 8)))
    rslora = bool(pcfg.get("use_rslora", False))
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks = set()
    pool_scaling = alpha / r
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise PetmixError(f"{weights_file}: module {name} has lora_{'A' if 'A' in ab else 'B'} only")
        module = modules.get(name)
        if isinstance(module, PooledLoRALinear):
            module = module.base
        if not isinstance(module, nn.Linear):
            raise PetmixError(f"{where}: module {name!r} is not a linear layer of model {model_name!r} "
                              "(an adapter for another model?)")
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets:
            raise PetmixError(f"{where}: adapter targets {leaf!r}, which the pool does not (pool targets "
                              f"{', '.join(targets)}); set target_modules to include it")
        a, b = ab["A"].float(), ab["B"].float()
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != module.in_features or b.shape != (module.out_features, rank):
            raise PetmixError(f"{where}: shapes of {name} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit "
                              f"model {model_name!r} ({module.in_features} -> {module.out_features})")
        if rank > r:
            raise PetmixError(f"{where}: rank {rank} on {name} is above the pool's rank {r}; set lora_r >= {rank}")
        scaling = lora_alpha / (math.sqrt(rank) if rslora else rank)
        ranks.add(rank)
        # Zero-pad to the pool's rank; fold the adapter's scaling into B so that the pool's
        # (alpha / r) * B' A' equals the adapter's scaling * B A.
        a_pad = torch.zeros(r, a.shape[1])
        a_pad[:rank] = a
        b_pad = torch.zeros(b.shape[0], r)
        b_pad[:, :rank] = b * (scaling / pool_scaling)
        layers[name] = (a_pad, b_pad)
    return ImportedAdapter(task, folder, layers, max(ranks), lora_alpha / max(ranks))


def check_import_method(method: Any) -> None:
    if method.block != "lora" or not method.new_block_per_task or method.joint:
        from petmix.methods import METHODS

        fit = [m.name for m in METHODS.values() if m.block == "lora" and m.new_block_per_task and not m.joint]
        raise PetmixError(f"import_adapters needs a method with one LoRA block per task "
                          f"({', '.join(fit)}), not {method.name}")


def read_imports(specs: list[str] | str, model: nn.Module, *, targets: list[str], r: int, alpha: float,
                 model_name: str, model_path: str, tasks: list[str] | None = None) -> dict[str, ImportedAdapter]:
    """Every ``name=FOLDER`` of ``specs`` read and checked against the model (refusals name the folder)."""
    out: dict[str, ImportedAdapter] = {}
    for task, folder in parse_import_specs(specs):
        if tasks is not None and task not in tasks:
            raise PetmixError(f"import_adapters: {task!r} ({folder}) is not a task of the stream "
                              f"({', '.join(tasks)}); the router learns from the task's examples")
        out[task] = read_peft_adapter(folder, model, targets=targets, r=r, alpha=alpha, model_name=model_name,
                                      model_path=model_path, task=task)
        log.info("import %s from %s: rank %d, %d modules", task, folder, out[task].rank, len(out[task].layers))
    return out


def read_run_imports(cfg: Any, method: Any, backbone: Any, mix: Any, tasks: list[str]) -> dict[str, ImportedAdapter]:
    """The run's ``import_adapters`` read against its backbone and pool (empty when it has none)."""
    if not cfg.import_adapters:
        return {}
    check_import_method(method)
    return read_imports(cfg.import_adapters, backbone.model, targets=mix.pool.targets, r=cfg.lora_r,
                        alpha=cfg.lora_alpha, model_name=backbone.name, model_path=backbone.path, tasks=tasks)


def use_imported_block(mix: Any, adapter: ImportedAdapter, trainable: list[nn.Parameter],
                       load: bool) -> list[nn.Parameter]:
    """Put an imported adapter into the newest block (``load``; a resumed stage has it already) and
    freeze that block: what still trains is what selects it (the router's key and query, if any)."""
    i = mix.num_blocks - 1
    if load:
        mix.pool.load_block(i, adapter.layers)
    frozen = {id(p) for p in mix.pool.block_parameters(i)}
    for p in mix.pool.block_parameters(i):
        p.requires_grad_(False)
    return [p for p in trainable if id(p) not in frozen]


def preflight_imports(cfg: Any) -> Any:
    """Check a run's ``import_adapters`` before its run directory exists: a refusal writes nothing.
    Returns the loaded backbone, for the trainer to reuse."""
    from petmix.backbone import load_backbone
    from petmix.blocks.lora import DEFAULT_TARGETS
    from petmix.methods import get_method

    check_import_method(get_method(cfg.method))
    pairs = parse_import_specs(cfg.import_adapters)
    for _, folder in pairs:  # the cheap checks before loading a model
        if not folder.is_dir():
            raise PetmixError(f"{folder}: adapter folder not found")
        if not (folder / PEFT_CONFIG).is_file():
            raise PetmixError(f"{folder}: not a PEFT adapter folder (no {PEFT_CONFIG})")
    backbone = load_backbone(cfg.model)
    targets = cfg.target_modules or DEFAULT_TARGETS[backbone.family]
    read_imports(cfg.import_adapters, backbone.model, targets=targets, r=cfg.lora_r, alpha=cfg.lora_alpha,
                 model_name=backbone.name, model_path=backbone.path)
    return backbone
