"""A run's settings: ``TrainConfig``.

Its own fields are the settings every method shares (data, model, blocks, router, optimisation,
evaluation). Each method's settings live in its options dataclass beside its code
(``petmix/methods/<method>.py``); a ``TrainConfig`` holds every registered method's options as plain
attributes too (``cfg.kl_ratio``), so config files, compare entries and flags stay flat. Every
setting, generic or a method's, declares its type, default, bounds and help line in one place: the
validation pass (``petmix.validation``) and the ``petmix train`` flags (``petmix.cli``) are derived
from them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petmix.backbone import DEFAULT_MODEL
from petmix.errors import PetmixError
from petmix.evaluate import GenerationConfig
from petmix.methods import DEFAULT_METHOD, METHODS, get_method, option_fields, setting
from petmix.router import ROUTER_PRESETS
from petmix.runs import read_json, verify_safetensors
from petmix.validation import check_fields, check_keys, namer

# Settings whose None means "the method's own" (``Method.default_lr``, ``Method.default_prompt_length``).
METHOD_DEFAULTED = ("lr", "prompt_length")


@dataclass(init=False, eq=False)
class TrainConfig:
    method: str = setting(DEFAULT_METHOD, "see `petmix methods`")
    model: str = setting(DEFAULT_MODEL, "local model folder or packaged alias (default smollm2-135m)")
    data: str | None = setting(None, "folder of tasks (e.g. ../shared/data/CL_Benchmark); not needed for bigbench: tasks")
    tasks: list[str] = setting(help="comma-separated task names or folders, in stream order", factory=list)
    stream: str | None = setting(None, "named stream instead of tasks (default, superni-order1, ...)")
    epochs: float = setting(1.0, "epochs per task (fractions allowed)", gt=0, le=1e6)
    # None: the method's own (Method.default_lr: DEFAULT_LRS by kind, or the method's tuned_lr, chosen by
    # `petmix tune` on the default model; the papers' rates are in configs/paper: 3e-4 T5, 5e-5 LLaMA)
    lr: float | None = setting(None, "learning rate (constant); default the method's (`petmix methods NAME`): 1e-1 "
                                     "raw soft prompts (1e-2 seq-prompt and lfpt5, 3e-2 prog-prompt, 3e-3 l2p), 3e-2 ATTEMPT, 3e-3 deep prompts, 1e-3 LoRA (3e-3 sapt-lora, "
                                     "per-task-lora; 3e-4 mtl-lora), BitFit and prompt encoders, 1e-5 full weights", gt=0)
    batch_size: int = setting(8, "examples per micro-batch", ge=1)
    grad_accum: int = setting(1, "micro-batches per optimiser step", ge=1)
    max_train: int | None = setting(None, "cap on training examples per task", ge=1)
    max_test: int | None = setting(None, "cap on test examples per task", ge=1)
    max_source_len: int = setting(512, "prompt tokens (longer prompts lose their middle)", ge=8)
    max_target_len: int = setting(50, "answer tokens", ge=2)
    seed: int = setting(0, "seed for sampling, data order and initialisation", ge=0, le=2**32 - 1)
    test_seed: int | None = setting(None, "seed that picks the test examples (default: seed); compare --seeds fixes it",
                                    ge=0)
    bf16: bool = setting(False, "bfloat16 autocast (CPU and GPU; slow on CPUs without AVX512-BF16 or AMX)")
    lora_r: int = setting(4, "LoRA rank", ge=1)
    lora_alpha: float = setting(32.0, "LoRA alpha", gt=0)
    lora_dropout: float = setting(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] = setting(help="comma-separated module names to put LoRA on (default q and v "
                                             "projections)", factory=list)
    # None: the method's own (Method.default_prompt_length: `petmix tune`'s pick, docs/tuned.md, else 10)
    prompt_length: int | None = setting(None, "prompt methods: soft prompt tokens per block; default the method's: 10 "
                                              "(5 seq-prompt and lfpt5, 20 l2p and p-tuning-v2)", ge=1)
    prompt_init: str = setting("vocab", "prompt methods: vocab (random vocabulary embeddings), a saved prompt "
                                        ".safetensors, or the task name of a source prompt (with sources)")
    prompt_depth: str | None = setting(None, "prompt methods: shallow or deep (a prompt at every layer); default "
                                             "the method's", choices=("shallow", "deep"))
    prompt_encoder: str | None = setting(None, "prompt methods: none, mlp or lstm reparameterisation; default the "
                                               "method's", choices=("none", "mlp", "lstm"))
    prompt_encoder_hidden: int = setting(512, "hidden width of the prompt encoder", ge=1)
    prompt_encoder_residual: bool = setting(False, "prompt methods with an encoder: add its output to the raw prompt, its last "
                                                   "layer starting at zero, so training starts from the raw prompt "
                                                   "(residual reparameterisation; not the papers' default)")
    unfreeze: str = setting("all", "full-backbone blocks: all (default), last:N (top N layers, final norm, head) "
                                   "or a name regex")
    sources: list[str] = setting(help="source-prompt libraries or .safetensors files, comma-separated (methods "
                                      "that start from source prompts; prompt_init by task name)", factory=list)
    # The router of methods with a learned one (petmix.router): SAPT's shared attention preset
    # "prototype" (petmix's default: tells tasks apart at small budgets) or "paper" (SAPT as published).
    router: str = setting("prototype", "SAPT's shared attention: prototype (default: tells tasks apart at small "
                                       "budgets) or paper (SAPT as published)", choices=ROUTER_PRESETS)
    router_temperature: float | None = setting(None, "softmax temperature of the shared attention (default: the "
                                                     "preset's, 0.05 prototype / 1 paper)", gt=0)
    router_hidden: int = setting(100, "hidden size of the router's query projection", ge=1)
    router_lr: float | None = setting(1e-2, "learning rate of the router (query projection, keys); none: lr", gt=0)
    eval_scope: str = setting("seen", "seen (tasks so far, default) or all (every task after every stage)",
                              choices=("seen", "all"))
    eval_batch_size: int = setting(16, "generation batch size", ge=1)
    max_new_tokens: int = setting(50, "generation length cap", ge=1)
    chat: bool = setting(False, "wrap prompts in the model's chat template")
    checkpoint_every: int = setting(25, "optimiser steps between mid-stage checkpoints", ge=1)
    single_task_results: str | None = setting(None, "a single-task reference run (or its results.json) giving the "
                                                    "single-task scores for FWT")
    heldout_fraction: float = setting(0.1, "part of each task's train split held out (e.g. ARM's targets); never "
                                           "test", gt=0, lt=1)
    heldout_max: int = setting(32, "at most this many held-out examples per task (0: none, every train example "
                               "trains: few-shot settings)", ge=0)
    generator: dict[str, Any] = setting(help="settings of the per-task generator of pseudo-inputs (methods that "
                                             "generate them), a YAML mapping: e.g. '{keep: 8, epochs: 2}'",
                                        factory=dict)
    # PEFT LoRA adapters as frozen blocks (petmix.peft_io): "task=FOLDER" each; the task's stage then
    # trains only what selects its block (the router), on at most import_examples of its train examples.
    import_adapters: list[str] = setting(help="PEFT LoRA adapters as frozen blocks, one per task: "
                                              "task=FOLDER,task=FOLDER (the task's stage then trains only the "
                                              "router)", factory=list)
    import_examples: int = setting(32, "train examples per imported task that teach the router", ge=1)
    report_to: str | None = setting(None, "trackers: tensorboard (pip install 'petmix[tensorboard]'), all, or any "
                                          "accelerate supports; logs the loss per step, router weights and matrix "
                                          "per stage to RUN/tracking")

    def __init__(self, **values: Any):
        """Generic settings by keyword, and any registered method's options (``kl_ratio=0.1``)."""
        options = option_fields()
        # The keys given a value (null leaves a key at its default, e.g. lr: the method's own); compare
        # passes only these on to its entries.
        self.explicit = frozenset(k for k, v in values.items() if v is not None)
        for f in dataclasses.fields(self):
            value = values.pop(f.name) if f.name in values else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            setattr(self, f.name, value)
        for name, (_, f) in options.items():
            setattr(self, name, values.pop(name) if name in values else f.default)
        if values:
            raise TypeError(f"TrainConfig got unknown settings {sorted(values)}")
        method = METHODS.get(self.method)  # unset METHOD_DEFAULTED keys: the method's own (an unknown one is validate()'s)
        if method is not None and self.lr is None:
            self.lr = method.default_lr(self.prompt_encoder, self.prompt_depth)
        if method is not None and self.prompt_length is None:
            self.prompt_length = method.default_prompt_length()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def shared_settings(self) -> dict[str, Any]:
        """The settings a comparison or tuning hands to each of its methods: all but the method, and but
        the keys left unset that each method defaults on its own (``METHOD_DEFAULTED``)."""
        return {k: v for k, v in self.to_dict().items()
                if k != "method" and (k not in METHOD_DEFAULTED or k in self.explicit)}

    def to_dict(self) -> dict[str, Any]:
        """Every setting, flat (what a run's config.json records)."""
        out = {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.update({name: _copy(getattr(self, name)) for name in option_fields() if hasattr(self, name)})
        return out

    @staticmethod
    def settings() -> Iterator[tuple[type, dataclasses.Field]]:
        """Every setting's (declaring class, field): the generic ones, then each method's options."""
        for f in dataclasses.fields(TrainConfig):
            yield TrainConfig, f
        yield from option_fields().values()

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", flags: set[str] | None = None,
                  check_files: bool = True) -> TrainConfig:
        """Settings from a mapping (a YAML file, flags, a compare entry, a run's config.json), checked by
        one pass derived from the fields' type hints and bounds (petmix.validation) and then by
        :meth:`validate`. ``flags``: keys given on the command line (messages name them as flags)."""
        name = namer(source, frozenset(flags or ()))
        values = {(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in values.items()}
        options = option_fields()
        generic = {f.name for f in dataclasses.fields(cls)}
        check_keys(values, generic | set(options), name)
        checked = check_fields(cls, {k: v for k, v in values.items() if k in generic}, name)
        by_class: dict[type, dict[str, Any]] = {}
        for k, v in values.items():
            if k in options:
                by_class.setdefault(options[k][0], {})[k] = v
        for option_class, given in by_class.items():
            checked.update(check_fields(option_class, given, name))
        cfg = cls(**checked)
        cfg.validate(source, name, check_files=check_files)
        return cfg

    def validate(self, source: str = "config", name: Callable[[str], str] | None = None,
                 check_files: bool = True) -> None:
        """Relations between settings (the method's own among them), and the files they name
        (``check_files``); types and ranges are :func:`petmix.validation.check_fields`' job. Nothing here
        loads a model or writes a file."""
        name = name or namer(source)
        try:
            method = get_method(self.method)
        except PetmixError as err:
            raise PetmixError(f"{name('method')}: {err}") from None
        for key, problem in method.check(self):
            raise PetmixError(f"{name(key)}: {problem}")
        _check_unfreeze(self.unfreeze, name("unfreeze"))
        # Like prompt_length, it means nothing to other blocks (a compare or tune base may be LoRA).
        if self.prompt_encoder_residual and method.block == "prompt" and (self.prompt_encoder or method.encoder) in (None, "none"):
            raise PetmixError(f"{name('prompt_encoder_residual')}: {self.method} has no prompt encoder (set "
                              f"prompt_encoder mlp or lstm, or use p-tuning or prefix-tuning)")
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
        self._check_prompt_files(name)
        if self.single_task_results is not None:
            path = Path(self.single_task_results)
            path = path / "results.json" if path.is_dir() else path
            if not path.is_file():
                raise PetmixError(f"{name('single_task_results')}: {path}: no such results file")
            single_task_diagonal(read_json(path), path)

    def _check_prompt_files(self, name: Callable[[str], str]) -> None:
        from petmix.sources import prompt_meta, resolve_sources

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

    def generator_config(self, where: str = "generator"):
        """The pseudo-input generator's settings: the ``generator:`` mapping checked like the top-level keys."""
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


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


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
    """A full-backbone block's selection: all, last:N (N >= 1) or a regular expression that compiles."""
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


def single_task_diagonal(ref: Any, path: Path) -> dict[str, Any]:
    """A single-task reference run's a[i][i] per task name (FWT's s[i])."""
    ok = (isinstance(ref, dict) and isinstance(ref.get("tasks"), list) and isinstance(ref.get("matrix"), list)
          and ref["matrix"] and all(isinstance(r, list) and len(r) == len(ref["tasks"]) for r in ref["matrix"]))
    if not ok:
        raise PetmixError(f"{path}: not a petmix results file (needs tasks and a matrix with a row per stage)")
    return {n: ref["matrix"][min(i, len(ref["matrix"]) - 1)][i] for i, n in enumerate(ref["tasks"])}
