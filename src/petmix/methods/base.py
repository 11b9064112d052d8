"""What a method is, and the registry generic code reads methods from.

A method is one module in ``petmix/methods/``: an options dataclass (its settings, each with a type, a
default, bounds and a help line: they become config keys and ``petmix train`` flags), its hooks on the
shared training loop (``StageHook``), and one :func:`register_method` call whose :class:`Method` says
which blocks it adds, what trains, which router weighs the blocks and whether it needs a task id.
Generic code (trainer, mixture, api, compare, report, cli) asks the ``Method`` and its router; it never
names a method or a hook. ``docs/adding-a-method.md`` walks through adding one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from petmix.errors import PetmixError

if TYPE_CHECKING:
    from pathlib import Path

    from petmix.backbone import Backbone
    from petmix.data.task import Example, Task
    from petmix.mixture import Mixture


class Stage(Protocol):
    """What a hook may use of the run it joins (``petmix.train.Trainer`` provides it): the model, the
    settings, the tasks and their training splits, and the encoding the loop uses. Nothing else."""

    cfg: Any                       # the run's TrainConfig
    out: Path                      # the run folder: a hook keeps what must survive a kill here
    mix: Mixture                   # backbone, pool and router
    backbone: Backbone
    method: Method
    tasks: list[Task]
    splits: dict[str, tuple[list[Example], list[Example]]]  # task -> (train, held out)
    sources: list[Path]            # source prompts of the run (methods that start from them)
    step_indices: list[int]        # which training examples the current micro-batch holds
    accelerator: Any               # accelerate's Accelerator: autocast, process sync
    main: bool                     # the main process (the one that writes)

    def encode(self, examples: list[Example], stage_tasks: list[Task], owners: list[int]) -> tuple[list, list]: ...

    def batch(self, prompt_ids: list[list[int]], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]: ...


class StageHook:
    """What a method adds to the shared training loop: an extra loss term, and work between tasks.

    ``name`` labels the hook's loss in the stage records (``mean_<name>_loss``). ``keep_logits``: the
    hook's loss reads every logit of the forward (the trainer then asks the mixture for them).
    """

    name = "hook"
    keep_logits = False

    def prepare_stage(self, trainer: Stage, stage: int) -> None:
        """Before the first step of a stage (also when a stage is resumed)."""

    def loss(self, trainer: Stage, micro_batch: int, output: Any) -> torch.Tensor | None:
        """An extra loss for this micro-batch, or None. ``output``: the mixture's forward
        (``petmix.mixture.MixOutput``: loss, weights, router loss, logits when asked for)."""
        return None

    def extra_examples(self, micro_batch: int) -> list[tuple[list[int], list[int]]]:
        """Encoded (prompt, answer) pairs to add to this micro-batch."""
        return []

    def after_stage(self, trainer: Stage, stage: int) -> dict[str, Any]:
        """After a stage's last step, before evaluation; returns what to record for the stage."""
        return {}


# A hook factory builds one hook for a run from the trainer and the method's options (None: switched off).
HookFactory = Callable[[Stage, Any], "StageHook | None"]


# The learning rate a method trains at when none is set, by what trains (``Method.lr_kind``). Raw soft
# prompts (and ATTEMPT's attention G, which trains with its prompt) want a rate ~30x LoRA's, a prompt at
# every layer a tenth of that. docs/tuned.md says which values `petmix tune` picked on the default model.
DEFAULT_LRS: dict[str, float] = {"prompt": 1e-1, "prompt-attention": 3e-2, "prompt-deep": 3e-3,
                                 "prompt-encoder": 1e-3, "lora": 1e-3, "full": 1e-5}

# Soft prompt tokens per block when a run sets none and the method has no length of its own (``Method.
# tuned_prompt_length``).
DEFAULT_PROMPT_LENGTH = 10


@dataclass(frozen=True)
class Method:
    """A registered method. Subclass it to change how a task begins or what trains (see ``l2p.py``)."""

    name: str
    routing: str                 # the router kind that weighs the blocks (petmix.router.ROUTERS)
    new_block_per_task: bool     # False: one block (or one shared pool), trained on in sequence
    joint: bool = False          # True: one stage on all tasks at once (multi-task learning)
    block: str = "lora"          # "lora" | "prompt" | "full" | "bitfit" (see petmix.blocks)
    hooks: tuple[HookFactory, ...] = ()  # extra losses and between-task work
    options: type | None = None  # the method's settings dataclass (config keys and flags)
    combine: str = "sum"         # prompt blocks: "sum" (weighted) or "concat" (selected prompts in a row)
    independent: bool = False    # single-task PET: every task learned from the same start, scored alone
    depth: str = "shallow"       # prompt blocks: "shallow" or "deep" (a prompt at every layer)
    encoder: str = "none"        # prompt blocks: reparameterisation "none" | "mlp" | "lstm"
    needs_sources: bool = False  # starts from a library of source prompts (petmix sources train)
    reference: bool = False      # the single-task reference of a comparison (its diagonal gives FWT)
    # The option `petmix tune` searches beside the learning rate, and its grid.
    tuned_option: tuple[str, tuple[float, ...]] | None = None
    # The stage record (stages.json) of the loss term the option multiplies, if it multiplies one: where that
    # term is ~0 in every stage of the run at the default, no value of the option changes the run.
    tuned_option_loss: str | None = None
    tuned_lr: float | None = None  # `petmix tune`'s pick on the default model where it is not its kind's default
    tuned_prompt_length: int | None = None  # likewise, where it is not DEFAULT_PROMPT_LENGTH (prompt methods)
    summary: str = ""
    paper: str = ""

    # ---- what generic code asks -------------------------------------------------------------------
    def lr_kind(self, prompt_encoder: str | None = None, prompt_depth: str | None = None) -> str:
        """What trains, as far as the learning rate goes: prompt (raw soft prompts), prompt-attention (a raw
        prompt and ATTEMPT's attention G at one rate: ``attempt.py``), prompt-deep (a raw prompt at every
        layer), prompt-encoder (prompts behind an MLP/LSTM), lora (LoRA, BitFit and other small weights) or
        full (backbone weights). ``prompt_*``: a run's own setting, else the method's."""
        if self.block == "full":
            return "full"
        if self.block == "prompt":
            if (prompt_encoder or self.encoder) not in (None, "none"):
                return "prompt-encoder"
            return "prompt-deep" if (prompt_depth or self.depth) == "deep" else "prompt"
        return "lora"

    def default_lr(self, prompt_encoder: str | None = None, prompt_depth: str | None = None) -> float:
        """The learning rate when a run sets none: the method's own tuned pick (``tuned_lr``) where the run
        trains what the method trains, else its kind's (``DEFAULT_LRS`` by ``lr_kind``)."""
        kind = self.lr_kind(prompt_encoder, prompt_depth)
        if self.tuned_lr is not None and kind == self.lr_kind():
            return self.tuned_lr
        return DEFAULT_LRS[kind]

    def default_prompt_length(self) -> int:
        """Prompt tokens per block when a run sets none: the method's own tuned pick, else the common one."""
        return self.tuned_prompt_length or DEFAULT_PROMPT_LENGTH

    def router_class(self) -> type:
        from petmix.router import ROUTERS

        return ROUTERS[self.routing]

    @property
    def routes_per_task(self) -> bool:
        """A router picks among one block per task with no task id: routing accuracy applies."""
        return self.router_class().selects_per_task and self.new_block_per_task and not self.joint

    @property
    def task_id_at_test(self) -> bool:
        return self.router_class().needs_task_id or self.independent

    @property
    def records_router_weights(self) -> bool:
        """Training records the mean router weights (a learned, per-input router)."""
        return self.router_class().learned

    def routing_index(self, task_index: int) -> int | None:
        """Which task the router is told (task-id routers only)."""
        return task_index if self.router_class().needs_task_id else None

    def router_options(self, options: Any) -> dict[str, Any]:
        """Settings of the method's own that its router is built with (``petmix.router.make_router``)."""
        return {}

    def options_from(self, cfg: Any) -> Any:
        """The method's options dataclass filled from a run's settings (None without options)."""
        if self.options is None:
            return None
        return self.options(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(self.options)})

    def block_names(self, mix: Mixture, tasks: list[str]) -> list[str]:
        """Each block named by what it learned: its task, ``source:<task>`` (frozen source prompts), or
        ``shared`` (one block trained on every task)."""
        if self.new_block_per_task:
            names = [f"source:{n}" for n in mix.pool.source_names] if mix.num_sources else []
            names += tasks
        else:
            names = ["shared"]
        return names[: mix.num_blocks]

    # ---- what a task changes ----------------------------------------------------------------------
    def begin_task(self, mix: Mixture, task_index: int, n_tasks: int = 1,
                   inputs: dict[str, torch.Tensor] | None = None) -> list[nn.Parameter]:
        """Add this task's block (if the method does), freeze everything else, return what trains.
        ``n_tasks``: tasks in the stage (a joint stage); ``inputs``: the task's training prompts, for
        routers that place a new key from the data."""
        trained = mix.num_blocks - mix.num_sources
        if self.new_block_per_task or trained == 0:
            mix.add_task(inputs)
        elif self.independent and hasattr(mix.pool, "reset"):
            mix.pool.reset()  # full-ft, bitfit: each task starts from the pretrained weights
        return self.select_trainable(mix)

    def trained_blocks(self, mix: Mixture) -> range:
        """The pool's blocks that train in the current stage: the newest."""
        return range(mix.num_blocks - 1, mix.num_blocks)

    def select_trainable(self, mix: Mixture) -> list[nn.Parameter]:
        """Freeze everything but the trained blocks and what the router trains with them."""
        mix.requires_grad_(False)
        trainable = [p for i in self.trained_blocks(mix) for p in mix.pool.block_parameters(i)]
        trainable += mix.router.trainable(mix.num_blocks - 1)
        for p in trainable:
            p.requires_grad_(True)
        assert_only_trainable(mix, trainable)
        return trainable

    def build_hooks(self, trainer: Stage) -> list[StageHook]:
        """The method's hooks for a run, from its options (a factory may switch its hook off)."""
        options = self.options_from(trainer.cfg)
        return [hook for make in self.hooks if (hook := make(trainer, options)) is not None]

    def check(self, cfg: Any) -> list[tuple[str, str]]:
        """Relations between settings this method needs: (key, problem) pairs."""
        problems = []
        if self.needs_sources and not cfg.sources:
            problems.append(("sources", f"method {self.name} needs source prompts: set sources "
                                        "(see `petmix sources train`)"))
        options = self.options_from(cfg)
        if options is not None and hasattr(options, "check"):
            problems += options.check()
        if options is not None and hasattr(options, "uses_heldout") and options.uses_heldout() and cfg.heldout_max == 0:
            problems.append(("heldout_max", f"method {self.name} learns from held-out train examples, and "
                                            "heldout_max 0 leaves none: use heldout_max >= 1"))
        return problems


def assert_only_trainable(module: nn.Module, expected: list[nn.Parameter]) -> None:
    want = {id(p) for p in expected}
    got = {id(p) for p in module.parameters() if p.requires_grad}
    if want != got:
        raise AssertionError(f"trainable parameters differ from the method's set ({len(got)} vs {len(want)} tensors)")


METHODS: dict[str, Method] = {}
_OPTION_FIELDS: dict[str, tuple[type, dataclasses.Field]] = {}  # option name -> (its class, its field)


def register_method(*methods: Method) -> None:
    """Make methods known to every command (``petmix methods``, train, compare, flags, configs).

    Options of different methods may share a name only when they mean the same (same type and
    default): e.g. replay's and LFPT5's ``buffer_per_batch``."""
    for method in methods:
        if method.options is not None:
            for f in dataclasses.fields(method.options):
                seen = _OPTION_FIELDS.get(f.name)
                if seen is not None and seen[0] is not method.options and (
                        seen[1].type != f.type or seen[1].default != f.default):
                    raise ValueError(f"option {f.name} of {method.name} clashes with {seen[0].__name__}'s")
                _OPTION_FIELDS.setdefault(f.name, (method.options, f))
        METHODS[method.name] = method


def unregister_method(name: str) -> None:
    """Forget a method and the options only it declared (plugins and tests that add one for a while)."""
    method = METHODS.pop(name)
    if method.options is not None and all(m.options is not method.options for m in METHODS.values()):
        for f in dataclasses.fields(method.options):
            if _OPTION_FIELDS.get(f.name, (None,))[0] is method.options:
                del _OPTION_FIELDS[f.name]


def foreign_options(method: str) -> set[str]:
    """The option names that no setting of ``method`` reads: other methods' options. A run records every
    option in its config.json, but a run of one method does not depend on another's (a change of LwF's
    default leaves an O-LoRA run what it was)."""
    m = METHODS.get(method)
    own = {f.name for f in dataclasses.fields(m.options)} if m is not None and m.options is not None else set()
    return set(_OPTION_FIELDS) - own


def option_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every registered method option: name -> (the options class that declares it, its field)."""
    return dict(_OPTION_FIELDS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PetmixError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            **bounds: Any) -> Any:
    """A settings field with its help line and bounds: ``kl_ratio: float = setting(0.5, "...", ge=0)``."""
    from petmix.validation import Bounds

    metadata: dict[str, Any] = {"help": help}
    if bounds:
        metadata["bounds"] = Bounds(**bounds)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
