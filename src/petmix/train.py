"""The training loop over a task stream: one stage per task, evaluation after each stage.

A plain loop (as in torchtune's recipes) on ``accelerate`` for device placement, mixed precision
and the backward pass. The run directory holds everything needed to resume: a killed run started
again with the same ``--out`` continues from the last checkpointed optimiser step and ends with the
same results as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from petmix import tracking
from petmix.backbone import DEFAULT_MODEL, Backbone, cpu_has_fast_bf16, load_backbone
from petmix.blocks.full import FullConfig
from petmix.blocks.lora import LoRAConfig
from petmix.blocks.prompt import PromptConfig
from petmix.data.collate import encode_answers, encode_prompts, prompt_batch, training_batch
from petmix.data.task import Example, Task
from petmix.data.templates import format_prompt
from petmix.errors import PetmixError
from petmix.evaluate import GenerationConfig, evaluate_tasks
from petmix.methods import Method, get_method
from petmix.methods.base import StageHook, make_hooks
from petmix.methods.sapt import REPLAY_SOURCES
from petmix.metrics import ROUTING_DEFINITION, cl_metrics, routing_accuracy, single_row_metrics
from petmix.mixture import BlockConfig, Mixture
from petmix.peft_io import read_run_imports, use_imported_block
from petmix.router import ROUTER_PRESETS
from petmix.runs import (
    check_run_folder,
    crash_point,
    load_tensors,
    read_json,
    save_tensors,
    verify_safetensors,
    write_json,
    write_jsonl,
)
from petmix.sources import export_prompt, find_source, prompt_meta, resolve_sources
from petmix.validation import Bounds, check_fields, namer

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    method: str = "sapt-lora"
    model: str = DEFAULT_MODEL
    data: str | None = None
    tasks: list[str] = field(default_factory=list)
    stream: str | None = None
    epochs: float = 1.0
    lr: float = 1e-3  # SmolLM2-135M's LoRA rate at CPU budgets (the paper: 3e-4 T5, 5e-5 LLaMA; configs/paper)
    batch_size: int = 8
    grad_accum: int = 1
    max_train: int | None = None
    max_test: int | None = None
    max_source_len: int = 512
    max_target_len: int = 50
    seed: int = 0
    test_seed: int | None = None  # which examples are test (default: seed); fixed across a comparison's seeds
    bf16: bool = False
    lora_r: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    prompt_length: int = 10  # prompt methods: soft prompt tokens per block
    prompt_init: str = "vocab"  # "vocab" (random vocabulary embeddings) or a saved prompt (.safetensors)
    router_hidden: int = 100
    # SAPT's shared attention: "prototype" (petmix's default: tells tasks apart at small budgets) or
    # "paper" (SAPT as published); see petmix.router. None: the preset's temperature (0.05 / 1).
    router: str = "prototype"
    router_temperature: float | None = None
    eval_scope: str = "seen"  # "seen": tasks 1..t after stage t; "all": every task after every stage
    eval_batch_size: int = 16
    max_new_tokens: int = 50
    chat: bool = False
    checkpoint_every: int = 25  # optimiser steps between mid-stage checkpoints
    single_task_results: str | None = None
    router_lr: float | None = 1e-2  # learning rate of the router (query projection, keys); None: lr
    # SAPT's attentive reflection (ARM); used by methods with attention routing. 0 switches it off.
    kl_ratio: float = 0.5
    # Where ARM's pseudo-inputs come from: "features" (pseudo-features sampled from stored per-task
    # statistics of the router's input feature: no examples kept, no generator), "generated" (SAPT's
    # generative replay) or "real" (oracle: real stored inputs).
    replay_source: str = "features"
    replay_batch_size: int = 8
    replay_every: int = 1  # micro-batches between reflection losses
    heldout_fraction: float = 0.1  # part of each task's train split held out (ARM targets); never test
    heldout_max: int = 32
    generator: dict[str, Any] = field(default_factory=dict)  # GeneratorConfig overrides
    # Continual-learning baselines (petmix.methods.baselines)
    olora_lambda1: float = 0.5  # O-LoRA orthogonality weight
    olora_lambda2: float = 0.0  # O-LoRA L2 on the new block
    ewc_lambda: float = 5000.0
    ewc_online: bool = False
    ewc_gamma: float = 1.0  # online EWC: decay of earlier Fisher terms
    ewc_fisher_batches: int = 8
    buffer_per_task: int = 16  # replay: real examples kept per finished task
    buffer_total: int | None = None  # replay: a total budget shared equally by the tasks (instead of per task)
    buffer_sampling: str = "random"  # replay: "random" or "balanced" (round-robin over answers)
    buffer_per_batch: int = 2  # replay and lfpt5: buffer examples added to every micro-batch
    unfreeze: str = "all"  # seq-ft: "all", "last:N" (top N layers, final norm, head) or a name regex
    lwf_alpha: float = 1.0  # LwF: weight of the distillation term
    lwf_temperature: float = 2.0
    lwf_topk: int = 20  # LwF: teacher distribution kept over its top-k tokens per answer position
    l2p_pool_size: int = 10  # L2P: prompts in the shared pool (M)
    l2p_top_k: int = 5  # L2P: prompts selected per input (N)
    l2p_lambda: float = 0.1  # L2P: weight of the key-query matching loss
    # Source-prompt transfer (ATTEMPT, SPoT) and prompt variants (petmix.blocks.prompt)
    sources: list[str] = field(default_factory=list)  # library folders and/or prompt files
    prompt_depth: str | None = None  # "shallow" | "deep"; default: the method's
    prompt_encoder: str | None = None  # "none" | "mlp" | "lstm"; default: the method's
    prompt_encoder_hidden: int = 512
    attempt_token_level: bool = False  # ATTEMPT: score each prompt token, not the max-pooled prompt
    attempt_train_layer_norm: bool = True  # ATTEMPT: train G's LayerNorm (the reference code leaves it frozen)
    attempt_temperature: float | None = None  # ATTEMPT: softmax temperature; default d * e (the paper's)
    spot_probe_steps: int = 10  # SPoT: steps of the probe prompt that picks the source
    # PEFT LoRA adapters as frozen blocks (petmix.peft_io): "task=FOLDER" each; the task's stage then
    # trains only what selects its block (the router), on at most import_examples of its train examples.
    import_adapters: list[str] = field(default_factory=list)
    import_examples: int = 32
    report_to: str | None = None  # trackers: "tensorboard", "all", ... (accelerate's); see petmix.tracking

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", flags: set[str] | None = None,
                  check_files: bool = True) -> TrainConfig:
        """Settings from a mapping (a YAML file, flags, a compare entry, a run's config.json), checked by
        one pass derived from the fields' type hints and bounds (petmix.validation) and then by
        :meth:`validate`. ``flags``: keys given on the command line (messages name them as flags)."""
        name = namer(source, frozenset(flags or ()))
        values = {(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in values.items()}
        cfg = cls(**check_fields(cls, values, name, TRAIN_BOUNDS))
        cfg.validate(source, name, check_files=check_files)
        return cfg

    def validate(self, source: str = "config", name: Callable[[str], str] | None = None,
                 check_files: bool = True) -> None:
        """Relations between settings, and the files they name (``check_files``); types and ranges
        are :func:`petmix.validation.check_fields`' job. Nothing here loads a model or writes a file."""
        name = name or namer(source)
        try:
            get_method(self.method)
        except PetmixError as err:
            raise PetmixError(f"{name('method')}: {err}") from None
        checks = [
            (self.l2p_top_k <= self.l2p_pool_size, "l2p_top_k", f"must be <= l2p_pool_size ({self.l2p_pool_size})"),
            (self.method not in ("attempt", "attempt-m", "spot") or bool(self.sources), "sources",
             f"method {self.method} needs source prompts: set sources (see `petmix sources train`)"),
        ]
        for ok, key, problem in checks:
            if not ok:
                raise PetmixError(f"{name(key)}: {problem}")
        _check_unfreeze(self.unfreeze, name("unfreeze"))
        self.generator_config(name("generator"))
        if self.stream is not None:
            from petmix.data.streams import resolve_stream

            try:
                resolve_stream(self.stream)
            except PetmixError as err:
                raise PetmixError(f"{name('stream')}: {err}") from None
        if not check_files:
            return
        check_model_name(self.model, name("model"))
        if self.data is not None and not Path(self.data).expanduser().is_dir():
            raise PetmixError(f"{name('data')}: {self.data}: no such folder")
        sources: list[Path] = []
        if self.sources:
            try:
                sources = resolve_sources(self.sources)
                for path in sources:
                    verify_safetensors(path)
            except PetmixError as err:
                raise PetmixError(f"{name('sources')}: {err}") from None
        if self.prompt_init != "vocab" and not Path(self.prompt_init).is_file():
            known = [p.stem for p in sources]
            if not sources or self.prompt_init not in known + [prompt_meta(p).get("task") for p in sources]:
                raise PetmixError(f"{name('prompt_init')}: {self.prompt_init!r} is not 'vocab', an existing prompt "
                                  f".safetensors file, or the name of a source prompt ({', '.join(known) or 'no sources'})")
        if Path(self.prompt_init).is_file():
            verify_safetensors(self.prompt_init)
        if self.single_task_results is not None:
            path = Path(self.single_task_results)
            path = path / "results.json" if path.is_dir() else path
            if not path.is_file():
                raise PetmixError(f"{name('single_task_results')}: {path}: no such results file")
            _single_task_diagonal(read_json(path), path)

    def generator_config(self, where: str = "generator"):
        """ARM's generator settings: the ``generator:`` mapping checked like the top-level keys."""
        from petmix.replay.generator import GeneratorConfig

        values = check_fields(GeneratorConfig, self.generator, lambda k: f"{where}.{k}")
        gcfg = GeneratorConfig(**{"bf16": self.bf16, "seed": self.seed, **values})
        try:
            gcfg.validate()
        except PetmixError as err:
            raise PetmixError(f"{where}: {str(err).removeprefix('generator config: ')}") from None
        return gcfg

    def generation(self) -> GenerationConfig:
        return GenerationConfig(self.max_new_tokens, self.eval_batch_size, self.max_source_len, self.chat)


# Ranges and accepted values of TrainConfig's settings (petmix.validation.check_fields). A field
# may declare its bounds in its own metadata instead; an int field declared nowhere must be >= 0.
TRAIN_BOUNDS: dict[str, Bounds] = {
    "epochs": Bounds(gt=0, le=1e6), "lr": Bounds(gt=0), "batch_size": Bounds(ge=1), "grad_accum": Bounds(ge=1),
    "max_train": Bounds(ge=1), "max_test": Bounds(ge=1), "max_source_len": Bounds(ge=8),
    "max_target_len": Bounds(ge=2), "seed": Bounds(ge=0, le=2**32 - 1),
    "lora_r": Bounds(ge=1), "lora_alpha": Bounds(gt=0), "lora_dropout": Bounds(ge=0, lt=1),
    "prompt_length": Bounds(ge=1), "router_hidden": Bounds(ge=1), "eval_scope": Bounds(choices=("seen", "all")),
    "eval_batch_size": Bounds(ge=1), "max_new_tokens": Bounds(ge=1), "checkpoint_every": Bounds(ge=1),
    "router_lr": Bounds(gt=0), "kl_ratio": Bounds(ge=0), "replay_source": Bounds(choices=tuple(REPLAY_SOURCES)),
    "router": Bounds(choices=tuple(ROUTER_PRESETS)), "router_temperature": Bounds(gt=0),
    "replay_batch_size": Bounds(ge=1), "replay_every": Bounds(ge=1), "heldout_fraction": Bounds(gt=0, lt=1),
    "heldout_max": Bounds(ge=1), "olora_lambda1": Bounds(ge=0), "olora_lambda2": Bounds(ge=0),
    "ewc_lambda": Bounds(ge=0), "ewc_gamma": Bounds(ge=0, le=1), "ewc_fisher_batches": Bounds(ge=1),
    "buffer_per_task": Bounds(ge=0), "buffer_total": Bounds(ge=1), "buffer_per_batch": Bounds(ge=0),
    "buffer_sampling": Bounds(choices=("random", "balanced")), "lwf_alpha": Bounds(ge=0),
    "lwf_temperature": Bounds(gt=0), "lwf_topk": Bounds(ge=1), "l2p_pool_size": Bounds(ge=1),
    "l2p_top_k": Bounds(ge=1), "l2p_lambda": Bounds(ge=0), "prompt_depth": Bounds(choices=("shallow", "deep")),
    "prompt_encoder": Bounds(choices=("none", "mlp", "lstm")), "prompt_encoder_hidden": Bounds(ge=1),
    "attempt_temperature": Bounds(gt=0), "spot_probe_steps": Bounds(ge=1), "import_examples": Bounds(ge=1),
}


def check_model_name(model: str, where: str) -> None:
    """A model written as a path must be a folder that exists (a hub id like ``org/name`` is left to
    transformers): otherwise the run would wait on a hub the machine may not reach, then fail."""
    from petmix.backbone import PACKAGED_MODELS

    path = Path(model).expanduser()
    looks_like_path = model.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_like_path and not path.is_dir():
        raise PetmixError(f"{where}: {model}: no such model folder (or give a packaged model: "
                          f"{', '.join(PACKAGED_MODELS)})")


def _check_unfreeze(text: str, where: str) -> None:
    """seq-ft/full-ft's selection: all, last:N (N >= 1) or a regular expression that compiles."""
    if text == "all":
        return
    if text.startswith("last:"):
        n = text.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise PetmixError(f"{where}: last:N needs a whole number N >= 1, got {text!r}")
        return
    try:
        re.compile(text)
    except re.error as err:
        raise PetmixError(f"{where}: {text!r} is neither all, last:N nor a valid regular expression ({err})") from None


def _single_task_diagonal(ref: Any, path: Path) -> dict[str, Any]:
    """A single-task reference run's a[i][i] per task name (FWT's s[i])."""
    ok = (isinstance(ref, dict) and isinstance(ref.get("tasks"), list) and isinstance(ref.get("matrix"), list)
          and ref["matrix"] and all(isinstance(r, list) and len(r) == len(ref["tasks"]) for r in ref["matrix"]))
    if not ok:
        raise PetmixError(f"{path}: not a petmix results file (needs tasks and a matrix with a row per stage)")
    return {n: ref["matrix"][min(i, len(ref["matrix"]) - 1)][i] for i, n in enumerate(ref["tasks"])}


def check_model_settings(cfg: TrainConfig, backbone: Backbone, method: Method) -> None:
    """The relations only the loaded model can answer (right after it loads, before anything is
    written): LoRA target modules exist as linear layers; an unfreeze pattern selects something."""
    names = {n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.Linear)}
    if method.block == "lora" and cfg.target_modules:
        missing = [t for t in cfg.target_modules if t not in names]
        if missing:
            raise PetmixError(f"target_modules: {missing} {'is' if len(missing) == 1 else 'are'} not linear layers of "
                              f"{backbone.name}; its linear layers: {', '.join(sorted(names))}")
    if method.block == "full" and cfg.unfreeze != "all" and not cfg.unfreeze.startswith("last:"):
        pattern = re.compile(cfg.unfreeze)
        if not any(pattern.search(n) for n, _ in backbone.model.named_parameters()):
            raise PetmixError(f"unfreeze: the pattern {cfg.unfreeze!r} matches no parameter of {backbone.name}")


def stages_wall_seconds(stages: list[dict[str, Any]]) -> float:
    """A run's time: training, between-task work (e.g. ARM's generators) and evaluation of every stage."""
    return round(sum(s.get("train_s", 0) + s.get("replay_s", 0) + s.get("eval_s", 0) for s in stages), 1)


# Settings that may change between the sessions of one run without changing what it computes.
RESUMABLE_CHANGES = {"single_task_results", "checkpoint_every", "eval_batch_size", "report_to"}


def settings_diff(old: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """Keys whose recorded value (a run's config.json) differs from ``resolved``: such a run cannot be
    resumed or read as a run of these settings. Keys an older petmix did not write were at their
    defaults then: only recorded keys count."""
    old = {"router": "paper", **old}  # runs from before the presets used the paper's
    if old.get("test_seed") is None and resolved.get("test_seed") == old.get("seed"):
        old["test_seed"] = resolved.get("test_seed")  # its test examples were drawn with its seed: the same
    return sorted(k for k in resolved if k not in RESUMABLE_CHANGES and k in old and old[k] != resolved[k])


def routing_summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Routing accuracy per stage and task (``per_stage[i][j]``, None where task j was not evaluated),
    and its mean over the tasks of the last stage (``final``), with the mean own-block weight."""
    def table(key: str) -> list[list[float | None]]:
        return [[(r.get("routing") or {}).get(n, {}).get(key) for n in names] for r in rows]

    acc, own = table("accuracy"), table("own_weight")
    last_acc = [v for v in (acc[-1] if acc else []) if v is not None]
    last_own = [v for v in (own[-1] if own else []) if v is not None]
    return {"definition": ROUTING_DEFINITION, "per_stage": acc, "own_weight_per_stage": own,
            "final": round(sum(last_acc) / len(last_acc), 4) if last_acc else None,
            "final_own_weight": round(sum(last_own) / len(last_own), 6) if last_own else None}


def block_config(cfg: TrainConfig, method: Method, sources: list[Path] | None = None) -> BlockConfig:
    if method.block == "prompt":
        init = cfg.prompt_init
        if init != "vocab" and not Path(init).is_file() and sources:
            init = str(find_source(init, sources))  # a source prompt named by its task
        return PromptConfig(cfg.prompt_length, init, combine=method.combine, depth=cfg.prompt_depth or method.depth,
                            encoder=cfg.prompt_encoder or method.encoder, encoder_hidden=cfg.prompt_encoder_hidden,
                            sources=[str(p) for p in sources or []] if method.routing == "attempt" else [])
    if method.block == "full":
        return FullConfig(cfg.unfreeze)
    if method.block == "bitfit":
        return "bitfit"
    return LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.target_modules))


def _stage_order(n: int, seed: int, stage: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


class Trainer:
    """Runs a method over a task stream into a run directory."""

    def __init__(self, cfg: TrainConfig, tasks: list[Task], out: str | Path, backbone: Backbone | None = None):
        from accelerate import Accelerator

        self.cfg = cfg
        self.tasks = tasks
        self.out = Path(out)
        self.method: Method = get_method(cfg.method)
        self.accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                                       **tracking.accelerator_kwargs(cfg.report_to, self.out))
        self.step_offset = 0  # optimiser steps of the stages before the current one (tracking's x axis)
        if cfg.bf16 and self.accelerator.device.type == "cpu" and not cpu_has_fast_bf16():
            log.warning("bf16 on a CPU without AVX512-BF16 or AMX: PyTorch's bf16 matmuls are several times "
                        "slower than fp32 here; run without bf16")
        # Data parallel under `accelerate launch`: each process takes a slice of every micro-batch,
        # gradients are averaged before each step, and only the main process evaluates and writes.
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        torch.manual_seed(cfg.seed)
        self.backbone = backbone or load_backbone(cfg.model)
        self.backbone.model.to(self.accelerator.device)
        check_model_settings(cfg, self.backbone, self.method)
        self.sources = resolve_sources(cfg.sources) if cfg.sources else []
        self.mix = Mixture(self.backbone, block_config(cfg, self.method, self.sources), self.method.routing,
                           cfg.router_hidden, cfg.seed, top_k=cfg.l2p_top_k, pool_size=cfg.l2p_pool_size,
                           train_layer_norm=cfg.attempt_train_layer_norm, token_level=cfg.attempt_token_level,
                           temperature=cfg.attempt_temperature, router_preset=cfg.router,
                           router_temperature=cfg.router_temperature)
        self.trainable_count = 0  # parameters the latest stage trained (reported per task)
        self.stages_info: dict[int, dict[str, Any] | None] = {}
        # Which examples the current micro-batch holds, for hooks whose loss needs it (LwF).
        self.step_indices: list[int] = []
        self.stages: list[list[Task]] = [tasks] if self.method.joint else [[t] for t in tasks]
        self.state_dir = self.out / "state"
        self.single_task = self._single_task_scores()
        # Every method trains on the same examples: each task's train split minus a held-out part.
        self.splits = {t.name: t.heldout_split(cfg.heldout_fraction, cfg.seed, cfg.heldout_max)
                       if len(t.train) > 1 else (t.train, t.train) for t in tasks}
        self.hooks = make_hooks(self.method, self)
        self.imported = read_run_imports(cfg, self.method, self.backbone, self.mix, [t.name for t in tasks])

    # ---- run directory -------------------------------------------------------------------
    def _check_run_dir(self) -> dict[str, Any]:
        resolved = {**dataclasses.asdict(self.cfg), "tasks": [t.name for t in self.tasks]}
        cfg_path = self.out / "config.json"
        # A folder where no stage has made progress yet (a run that failed early) takes the new settings.
        started = any((self.out / n).exists() for n in ("state", "state.prev", "stages.json", ".state.old"))
        if cfg_path.exists() and started:
            old = read_json(cfg_path)
            if not isinstance(old, dict):
                raise PetmixError(f"{cfg_path}: damaged file: not a JSON object. Remove it to resume with the "
                                  "settings given now, or start a new --out")
            diff = settings_diff(old, resolved)
            if diff:
                raise PetmixError(f"{cfg_path}: the run directory holds a run with other settings ({diff}); "
                                  "use a new --out or the same settings to resume")
        if self.main:
            write_json(cfg_path, resolved)  # makes the folder
        return resolved

    def _single_task_scores(self) -> list[float | None] | None:
        if not self.cfg.single_task_results:
            return None
        path = Path(self.cfg.single_task_results)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise PetmixError(f"{path}: single-task results not found")
        # The single-task score of task i is the reference run's a[i][i] (per-task-lora).
        diag = _single_task_diagonal(read_json(path), path)
        return [diag.get(t.name) for t in self.tasks]

    def _save_state(self, progress: dict[str, Any], optimizer: torch.optim.Optimizer | None,
                    stats: dict[str, torch.Tensor] | None = None) -> None:
        if self.main:
            self._write_state(progress, optimizer, stats)
        self.accelerator.wait_for_everyone()

    def _write_state(self, progress: dict[str, Any], optimizer: torch.optim.Optimizer | None,
                     stats: dict[str, torch.Tensor] | None) -> None:
        tmp = self.out / ".state.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tensors(tmp / "adapters.safetensors", self.mix.adapter_state())
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        tensors.update({f"stats.{k}": v.detach().cpu().clone() for k, v in (stats or {}).items()})
        meta: dict[str, Any] = {"progress": progress}
        if optimizer is not None:
            sd = optimizer.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            meta["param_groups"] = sd["param_groups"]
        save_tensors(tmp / "trainer.safetensors", tensors)
        crash_point("checkpoint-write")
        write_json(tmp / "trainer.json", meta)
        # The state is swapped in whole, and the previous one stays in state.prev until the new one is
        # in place: a kill at any moment leaves a complete checkpoint (state/, else state.prev/).
        prev, drop = self.out / "state.prev", self.out / ".state.drop"
        shutil.rmtree(drop, ignore_errors=True)
        if self.state_dir.exists():
            if prev.exists():
                prev.rename(drop)
            self.state_dir.rename(prev)
        crash_point("checkpoint-swap")
        tmp.rename(self.state_dir)
        shutil.rmtree(drop, ignore_errors=True)

    def _load_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
        state = self.state_dir
        if not (state / "trainer.json").exists():
            # Killed while swapping checkpoints (or state/ removed by hand after damage): the previous one.
            state = next((d for d in (self.out / "state.prev", self.out / ".state.old") if (d / "trainer.json").exists()),
                         None)
            if state is None:
                return None
            log.info("resuming from the previous checkpoint in %s", state)
        meta = read_json(state / "trainer.json")
        if not isinstance(meta, dict) or not isinstance(meta.get("progress"), dict):
            raise PetmixError(f"{state / 'trainer.json'}: damaged file: no progress record. Remove {state} and "
                              "run again, or start a new --out")
        adapters = load_tensors(state / "adapters.safetensors")
        tensors = load_tensors(state / "trainer.safetensors")
        try:
            self.mix.load_adapter_state(adapters)
        except (KeyError, RuntimeError) as err:
            raise PetmixError(f"{state / 'adapters.safetensors'}: does not fit this run's blocks ({err}); "
                              "start a new --out") from None
        return meta["progress"], tensors, meta

    @staticmethod
    def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

    # ---- training --------------------------------------------------------------------------
    def encode(self, examples: list[Example], stage_tasks: list[Task], owners: list[int]) -> tuple[list, list]:
        tok = self.backbone.tokenizer
        prompts = [self.backbone.render(format_prompt(stage_tasks[o], ex.input), self.cfg.chat)
                   for ex, o in zip(examples, owners)]
        return (encode_prompts(tok, prompts, self.cfg.max_source_len),
                encode_answers(tok, [ex.outputs[0] for ex in examples], self.cfg.max_target_len))

    def batch(self, prompt_ids: list[list[int]], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """A training batch of encoded pairs, on the training device (hooks use it too)."""
        batch = training_batch(self.backbone.tokenizer, prompt_ids, answer_ids, self.backbone.is_seq2seq)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _train_stage(self, stage: int, resume: tuple | None) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        stage_tasks = self.stages[stage]
        examples = [ex for t in stage_tasks for ex in self.splits[t.name][0]]
        owners = [i for i, t in enumerate(stage_tasks) for _ in self.splits[t.name][0]]
        if not examples:
            raise PetmixError(f"task {stage_tasks[0].name}: no training examples")
        imported = self.imported.get(stage_tasks[0].name) if len(stage_tasks) == 1 else None
        if imported is not None:  # a frozen PEFT block: a few examples teach the router to select it
            examples, owners = examples[: cfg.import_examples], owners[: cfg.import_examples]
        prompt_ids, answer_ids = self.encode(examples, stage_tasks, owners)

        if resume is None:
            # The stage's training prompts, for a router that starts the new key at their prototype.
            inputs = prompt_batch(self.backbone.tokenizer, prompt_ids, left=False)
            inputs = {k: v.to(acc.device) for k, v in inputs.items() if k in ("input_ids", "source_mask")}
            trainable = self.method.begin_task(self.mix, stage, len(stage_tasks), inputs)
        else:  # blocks already restored from the checkpoint: only re-select what trains
            trainable = self.method.select_trainable(self.mix)
        if imported is not None:
            trainable = use_imported_block(self.mix, imported, trainable, load=resume is None)
        self.trainable_count = sum(p.numel() for p in trainable)
        optimizer = self._optimizer(trainable) if trainable else None
        progress = {"stage": stage, "epoch": 0, "batch": 0, "step": 0, "stage_done": False, "evaluated": False}
        if resume is not None:
            progress, tensors, meta = resume
            if "param_groups" in meta:
                self._load_optimizer(optimizer, tensors, meta)
            torch.set_rng_state(tensors["rng.torch"])
        n_batches = math.ceil(len(examples) / cfg.batch_size)
        total_batches = max(1, round(cfg.epochs * n_batches)) if trainable else 0
        total_steps = math.ceil(total_batches / cfg.grad_accum)
        name = "+".join(t.name for t in stage_tasks) if len(stage_tasks) <= 2 else f"{len(stage_tasks)} tasks (joint)"
        bar = tqdm(total=total_steps, initial=progress["step"], desc=f"stage {stage + 1}/{len(self.stages)} {name}",
                   unit="step", dynamic_ncols=True, disable=None)
        task_index = self.method.routing_index(stage)
        self.mix.train()
        for hook in self.hooks:
            hook.prepare_stage(self, stage)
        # Running sums survive a resume, so a resumed stage reports what an uninterrupted one does.
        stats = {"weight_sum": torch.zeros(self.mix.num_blocks, dtype=torch.float64),
                 **{f"{h.name}_{k}": torch.zeros((), dtype=torch.float64) for h in self.hooks for k in ("sum", "n")},
                 "loss_sum": torch.zeros((), dtype=torch.float64), "n_seen": torch.zeros((), dtype=torch.float64),
                 "n_batches": torch.zeros((), dtype=torch.float64), "train_s": torch.zeros((), dtype=torch.float64)}
        if resume is not None:
            stats.update({k: tensors[f"stats.{k}"] for k in stats if f"stats.{k}" in tensors})
        done_batches = progress["epoch"] * n_batches + progress["batch"]
        started = time.time() - float(stats["train_s"])
        window: list[float] = []
        while done_batches < total_batches:
            epoch, b = divmod(done_batches, n_batches)
            order = _stage_order(len(examples), cfg.seed, stage, epoch)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size][self.rank::self.world]
            pairs = [(prompt_ids[i], answer_ids[i]) for i in idx]
            pairs += [p for hook in self.hooks for p in hook.extra_examples(done_batches)][self.rank::self.world]
            batch = self.batch([p for p, _ in pairs], [a for _, a in pairs])
            if self.method.joint and self.method.routing == "attempt":  # each input's task picks its target prompt
                batch["task_ids"] = torch.tensor([owners[i] for i in idx], device=acc.device)
            self.step_indices = idx
            with acc.autocast():
                loss, weights = self.mix(batch, task_index)
                total = loss
                for hook in self.hooks:
                    extra = hook.loss(self, done_batches)
                    if extra is not None:
                        total = total + extra
                        stats[f"{hook.name}_sum"] += float(extra.detach())
                        stats[f"{hook.name}_n"] += 1
            acc.backward(total / cfg.grad_accum)
            stats["weight_sum"] += weights.detach().double().sum(0).cpu()
            stats["loss_sum"] += float(loss.detach())
            stats["n_seen"] += len(idx)
            stats["n_batches"] += 1
            window.append(float(loss.detach()))
            done_batches += 1
            last = done_batches == total_batches
            if done_batches % cfg.grad_accum == 0 or last:
                if progress["step"] == 0 and resume is None:
                    self._assert_gradients(trainable)
                if self.world > 1:
                    for p in trainable:
                        p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sum(window) / len(window):.3f}")
                tracking.log_step(acc, sum(window) / len(window), self.step_offset + progress["step"],
                                  [g["lr"] for g in optimizer.param_groups])
                window = []
                progress["epoch"], progress["batch"] = divmod(done_batches, n_batches)
                crash_point("step")
                if progress["step"] % cfg.checkpoint_every == 0 and not last:
                    stats["train_s"] = torch.tensor(time.time() - started, dtype=torch.float64)
                    self._save_state(progress, optimizer, stats)
        bar.close()
        self.mix.eval()
        train_s = time.time() - started
        mean_loss = float(stats["loss_sum"] / stats["n_batches"].clamp(min=1))
        log.info("stage %d (%s): %d steps, mean loss %.4f, %.1f s", stage + 1, name, progress["step"], mean_loss, train_s)
        info = {"train_s": round(train_s, 1), "steps": progress["step"], "mean_loss": round(mean_loss, 5),
                "train_router_weights": ([round(float(w), 6) for w in stats["weight_sum"] / stats["n_seen"]]
                                         if self.mix.routing in ("attention", "key-query") else None)}
        for hook in self.hooks:
            if type(hook).loss is not StageHook.loss:  # hooks that add a loss report its mean
                n = float(stats[f"{hook.name}_n"])  # batches the hook added a loss to
                info[f"mean_{hook.name}_loss"] = round(float(stats[f"{hook.name}_sum"]) / n, 6) if n else None
            info.update(hook.after_stage(self, stage))
        progress.update(stage_done=True, evaluated=False, info=info)
        self._save_state(progress, None)
        return info

    def _optimizer(self, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # Constant learning rate, as SAPT. The router may get its own rate (router_lr).
        router = {id(p) for p in self.mix.router.parameters()} if self.mix.router is not None else set()
        groups = [{"params": [p for p in trainable if id(p) not in router], "lr": self.cfg.lr}]
        routed = [p for p in trainable if id(p) in router]
        if routed:
            groups.append({"params": routed, "lr": self.cfg.router_lr or self.cfg.lr})
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=0.0)

    def _assert_gradients(self, trainable: list[torch.nn.Parameter]) -> None:
        allowed = {id(p) for p in trainable}
        for name, p in self.mix.named_parameters():
            if p.grad is not None and id(p) not in allowed:
                raise AssertionError(f"gradient reached a frozen parameter: {name}")

    # ---- evaluation --------------------------------------------------------------------------
    def _evaluate(self, stage: int) -> dict[str, dict[str, Any]]:
        if self.method.independent:  # single-task methods: the model of stage t knows task t only
            indexed = [(stage, self.tasks[stage])]
        elif self.method.joint or self.cfg.eval_scope == "all":
            indexed = list(enumerate(self.tasks))
        else:
            indexed = list(enumerate(self.tasks[: stage + 1]))
        tasks = [t for _, t in indexed]
        gen = self.cfg.generation()
        with self.accelerator.autocast():
            if self.method.task_id_at_test:
                results = {}
                for j, task in indexed:
                    results.update(evaluate_tasks(self.backbone, [task], gen, self.mix.prepare_fn(j),
                                                  desc=f"eval {task.name}"))
            else:
                results = evaluate_tasks(self.backbone, tasks, gen, self.mix.prepare_fn(), desc=f"eval after stage {stage + 1}")
        self.mix.clear_weights()
        return results

    def _write_results(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        names = [t.name for t in self.tasks]
        matrix = [[r["scores"].get(n) for n in names] for r in rows]
        if self.method.joint:
            metrics = single_row_metrics(matrix[-1])
        elif self.method.independent:  # one model per task: its score is the diagonal
            metrics = single_row_metrics([matrix[i][i] if i < len(matrix) else None for i in range(len(names))])
        else:
            metrics = cl_metrics(matrix, self.single_task)
        per_task = {t.name: {"metric": t.metric, "benchmark": t.benchmark, "template": t.template,
                             "definition": t.definition, "n_train": len(t.train),
                             "n_test": len(t.test), "source": t.source, "notes": t.notes} for t in self.tasks}
        if not self.trainable_count:  # every stage was read back from disk: count what the last one trains
            self.trainable_count = sum(p.numel() for p in self.method.select_trainable(self.mix))
        trainable = self.trainable_count
        payload = {
            "method": self.method.name,
            "method_summary": self.method.summary,
            "task_id_at_test": self.method.task_id_at_test,
            "tasks": names,
            "matrix": matrix,
            "metrics": metrics,
            "single_task": self.single_task,
            "per_task": per_task,
            "stage_names": [r["name"] for r in rows],
            "stages": [{k: v for k, v in r.items() if k != "scores"} for r in rows],
            "trainable_params_per_task": trainable,
            "independent": self.method.independent,
            "sources": getattr(self.mix.pool, "source_names", None) or [p.stem for p in self.sources] or None,
            "model": self.backbone.describe(),
            "wall_s": stages_wall_seconds(rows),
            "routing_accuracy": routing_summary(rows, names) if self.method.routes_per_task else None,
        }
        write_json(self.out / "results.json", payload)
        return payload

    def run(self) -> dict[str, Any]:
        check_run_folder(self.out)  # a damaged file is named before anything is written
        self._check_run_dir()
        self.out.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = read_json(self.out / "stages.json") if (self.out / "stages.json").exists() else []
        loaded = self._load_state()
        start_stage, resume = 0, None
        if loaded is not None:
            progress = loaded[0]
            if progress["stage_done"]:
                # The random state as the uninterrupted run had it here (the next block's initialisation draws on it).
                if "rng.torch" in loaded[1]:
                    torch.set_rng_state(loaded[1]["rng.torch"])
                start_stage = progress["stage"] + (1 if progress["evaluated"] else 0)
                log.info("resuming %s after stage %d", self.out, progress["stage"] + 1)
                if not progress["evaluated"]:
                    rows = rows[: progress["stage"]]
                    self._finish_stage(progress["stage"], rows, progress.get("info"))
                    start_stage = progress["stage"] + 1
            else:
                start_stage, resume = progress["stage"], loaded
                log.info("resuming %s in stage %d at step %d", self.out, progress["stage"] + 1, progress["step"])
        rows = rows[:start_stage]
        tracking.start(self.accelerator, self.cfg)
        for stage in range(start_stage, len(self.stages)):
            self.step_offset = sum(r.get("steps") or 0 for r in rows)
            info = self._train_stage(stage, resume if stage == start_stage else None)
            self._finish_stage(stage, rows, info)
        if not self.main:
            return {}
        payload = self._write_results(rows) if rows else {}
        tracking.log_metrics(self.accelerator, payload.get("metrics") or {}, len(rows) - 1)
        tracking.finish(self.accelerator)  # every log call was flushed: a crash loses nothing logged
        save_tensors(self.out / "adapters.safetensors", self.mix.adapter_state())
        return payload

    def _finish_stage(self, stage: int, rows: list[dict[str, Any]], info: dict[str, Any] | None) -> None:
        if self.main:
            self._evaluate_and_write(stage, rows, info)
        self._save_state({"stage": stage, "epoch": 0, "batch": 0, "step": 0, "stage_done": True,
                          "evaluated": True}, None)
        crash_point("stage-end")

    def _evaluate_and_write(self, stage: int, rows: list[dict[str, Any]], info: dict[str, Any] | None) -> None:
        from petmix import api  # petmix.api imports this module
        started = time.time()
        results = self._evaluate(stage)
        crash_point("eval")
        eval_s = round(time.time() - started, 1)
        for name, res in results.items():
            write_jsonl(self.out / "predictions" / f"stage-{stage + 1}" / f"{name}.jsonl", res["records"])
            crash_point("eval-write")
        save_tensors(self.out / "checkpoints" / f"stage-{stage + 1}.safetensors", self.mix.adapter_state())
        stage_name = "joint" if self.method.joint else self.stages[stage][0].name
        self.stages_info[stage] = info
        info = info or {"train_s": 0.0, "steps": None, "mean_loss": None, "train_router_weights": None}
        row = {"name": stage_name, **info, "eval_s": eval_s, "scores": {n: r["score"] for n, r in results.items()}}
        if self.method.routes_per_task:  # the block of task j is block j: did the router pick it?
            names = [t.name for t in self.tasks]
            row["routing"] = {n: routing_accuracy([rec.get("router_weights") for rec in r["records"]],
                                                  self.mix.num_sources + names.index(n))
                              for n, r in results.items()}
        rows.append(row)
        write_json(self.out / "stages.json", rows)
        self._write_results(rows)
        tracking.log_stage(self.accelerator, stage, rows[-1]["scores"], info.get("train_router_weights"),
                           {n: w for n, r in results.items() if (w := tracking.mean_weights(r["records"]))},
                           api.block_names(self.method, self.mix, [t.name for t in self.tasks]))
        for name, res in results.items():  # the latest stage's predictions, where users look first
            write_jsonl(self.out / "predictions" / f"{name}.jsonl", res["records"])
        self._export_prompts(stage, results)

    def _export_prompts(self, stage: int, results: dict[str, dict[str, Any]]) -> None:
        """Per-task prompt blocks become reusable prompts: prompts/<task>.safetensors + .json."""
        pool = self.mix.pool
        if self.method.block != "prompt" or self.method.routing not in ("task", "attempt", "progressive"):
            return
        stage_tasks = self.stages[stage] if self.method.joint else [self.tasks[stage]]
        first = self.mix.num_sources + (0 if self.method.joint else stage)
        for k, task in enumerate(stage_tasks):
            prompt = pool.export(first + k)
            res = results.get(task.name, {})
            export_prompt(self.out / "prompts" / f"{task.name}.safetensors", prompt, {
                "task": task.name, "method": self.method.name, "backbone": self.backbone.describe()["name"],
                "backbone_path": self.backbone.path, "length": int(prompt.shape[-2]),
                "depth": int(prompt.shape[0]) if prompt.dim() == 3 else 1,
                "metric": res.get("metric"), "score": res.get("score"), "stage": stage + 1,
                "steps": (self.stages_info.get(stage) or {}).get("steps"),
                "note": "ATTEMPT target prompt: used with its sources and G" if self.method.routing == "attempt" else ""})

