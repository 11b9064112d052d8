"""A method says, per task: whether a new block is added, which parameters train, and how blocks
are weighed (routing). The training loop (``petmix.train``) is the same for all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petmix.blocks.full import BackbonePool
from petmix.errors import PetmixError
from petmix.mixture import TASK_ID_ROUTINGS, Mixture
from petmix.router import AttemptAttention, SharedAttentionRouter

if TYPE_CHECKING:
    from petmix.train import Trainer


class StageHook:
    """What a method adds to the shared training loop: an extra loss term, and work between tasks.

    ``name`` labels the hook's loss in the stage records (``mean_<name>_loss``).
    """

    name = "hook"

    def prepare_stage(self, trainer: Trainer, stage: int) -> None:
        """Before the first step of a stage (also when a stage is resumed)."""

    def loss(self, trainer: Trainer, micro_batch: int) -> torch.Tensor | None:
        """An extra loss for this micro-batch, or None."""
        return None

    def extra_examples(self, micro_batch: int) -> list[tuple[list[int], list[int]]]:
        """Encoded (prompt, answer) pairs to add to this micro-batch."""
        return []

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        """After a stage's last step, before evaluation; returns what to record for the stage."""
        return {}


@dataclass(frozen=True)
class Method:
    name: str
    routing: str                 # see petmix.mixture.ROUTINGS
    new_block_per_task: bool     # False: one block (or one shared pool), trained on in sequence
    joint: bool = False          # True: one stage on all tasks at once (multi-task learning)
    block: str = "lora"          # "lora" | "prompt" | "full" | "bitfit" (see petmix.blocks)
    hooks: tuple[str, ...] = ()  # extra losses and between-task work (see make_hooks)
    combine: str = "sum"         # prompt blocks: "sum" (weighted) or "concat" (selected prompts in a row)
    independent: bool = False    # single-task PET: every task learned from the same start, scored alone
    depth: str = "shallow"       # prompt blocks: "shallow" or "deep" (a prompt at every layer)
    encoder: str = "none"        # prompt blocks: reparameterisation "none" | "mlp" | "lstm"
    summary: str = ""
    paper: str = ""

    @property
    def routes_per_task(self) -> bool:
        """A router picks among one block per task with no task id: routing accuracy applies."""
        return self.routing == "attention" and self.new_block_per_task and not self.joint

    @property
    def task_id_at_test(self) -> bool:
        return self.routing in TASK_ID_ROUTINGS or self.independent

    def begin_task(self, mix: Mixture, task_index: int, n_tasks: int = 1,
                   inputs: dict[str, torch.Tensor] | None = None) -> list[nn.Parameter]:
        """Add this task's block (if the method does), freeze everything else, return what trains.
        ``n_tasks``: tasks in the stage (a joint stage of ATTEMPT-m gets one target prompt per task);
        ``inputs``: the task's training prompts, for routers that place a new key from the data."""
        trained = mix.num_blocks - mix.num_sources
        if self.routing == "key-query":  # L2P: the whole pool exists from the start and is shared
            while mix.num_blocks < mix.pool_size:
                mix.add_task()
        elif self.joint and self.routing == "attempt":
            while mix.num_blocks - mix.num_sources < n_tasks:
                mix.add_task()
        elif self.new_block_per_task or trained == 0:
            mix.add_task(inputs)
        elif self.independent and isinstance(mix.pool, BackbonePool):
            mix.pool.reset()  # full-ft, bitfit: each task starts from the pretrained weights
        if self.independent and isinstance(mix.router, AttemptAttention):
            # single-task ATTEMPT: one G per target task, initialised from the run's seed (seed 0 as before)
            mix.router.reset(seed=1000 + task_index + 100_003 * getattr(mix, "seed", 0))
        return self.select_trainable(mix)

    def select_trainable(self, mix: Mixture) -> list[nn.Parameter]:
        """Freeze everything but the newest block (and, with a router, its key and the query projection)."""
        mix.requires_grad_(False)
        current = mix.num_blocks - 1
        if self.routing == "key-query":  # L2P: every prompt of the pool and every key
            assert mix.router is not None
            trainable = [p for i in range(mix.num_blocks) for p in mix.pool.block_parameters(i)]
            trainable += list(mix.router.keys)
        elif isinstance(mix.router, AttemptAttention):
            # ATTEMPT: the target prompt(s) (every task's, in ATTEMPT-m's joint stage) and G.
            first = mix.num_sources if self.joint else current
            trainable = [p for i in range(first, mix.num_blocks) for p in mix.pool.block_parameters(i)]
            trainable += mix.router.trainable()
        else:
            trainable = list(mix.pool.block_parameters(current))
        if isinstance(mix.router, SharedAttentionRouter):
            # SAPT: the new block and what the router's preset trains (the paper's: the new key and the
            # shared query projection; the prototype preset's: the new key); old keys stay frozen.
            trainable += mix.router.trainable(current)
        for p in trainable:
            p.requires_grad_(True)
        assert_only_trainable(mix, trainable)
        return trainable

    def routing_index(self, task_index: int) -> int | None:
        """Which block the task id selects (task-id routings only)."""
        return task_index if self.routing in TASK_ID_ROUTINGS else None


def assert_only_trainable(module: nn.Module, expected: list[nn.Parameter]) -> None:
    want = {id(p) for p in expected}
    got = {id(p) for p in module.parameters() if p.requires_grad}
    if want != got:
        raise AssertionError(f"trainable parameters differ from the method's set ({len(got)} vs {len(want)} tensors)")


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sapt-lora", "attention", True, hooks=("arm",),
               summary="SAPT: a LoRA block per task, shared attentive learning and selection (no task id)",
               paper="Zhao et al., ACL 2024"),
        Method("seq-lora", "sum", False, summary="one LoRA trained on the tasks in sequence (SeqLoRA)"),
        Method("inc-lora", "sum", True,
               summary="a new LoRA per task, earlier ones frozen, all summed with weight 1, no router (IncLoRA)"),
        Method("per-task-lora", "task", True,
               summary="one LoRA per task, evaluated with the true task's block (task id given): single-task scores"),
        Method("mtl-lora", "sum", False, joint=True,
               summary="one LoRA on all tasks jointly (multi-task learning): upper reference"),
        Method("o-lora", "sum", True, hooks=("orthogonality",),
               summary="a new LoRA per task, orthogonal to the earlier ones (lambda1 |A_t A_i^T|), all summed",
               paper="Wang et al., EMNLP 2023 Findings"),
        Method("ewc", "sum", False, hooks=("ewc",),
               summary="one LoRA in sequence with a Fisher-weighted penalty toward each earlier task's weights",
               paper="Kirkpatrick et al., PNAS 2017"),
        Method("replay", "sum", False, hooks=("replay",),
               summary="one LoRA in sequence, real examples of earlier tasks mixed into every batch"),
        Method("replay-ft", "sum", False, block="full", hooks=("replay",),
               summary="full fine-tuning in sequence, real examples of earlier tasks mixed into every batch"),
        Method("seq-ft", "sum", False, block="full",
               summary="full fine-tuning of the backbone in sequence (SeqFT); --unfreeze last:N trains only the top N layers"),
        Method("lwf", "sum", False, hooks=("lwf",),
               summary="one LoRA in sequence; new-task inputs are also fitted to the previous model's output "
                       "distributions (temperature-scaled KL on the answer tokens)",
               paper="Li and Hoiem, ECCV 2016 (Learning without Forgetting)"),
        Method("l2p", "key-query", False, block="prompt", combine="concat", hooks=("l2p",),
               summary="a shared pool of prompts with learnable keys; the frozen model's mean hidden state of the "
                       "input is the query; the top-k prompts by cosine are concatenated (no task id)",
               paper="Wang et al., CVPR 2022 (Learning to Prompt)"),
        Method("lfpt5", "sum", False, block="prompt", hooks=("lfpt5",),
               summary="one soft prompt in sequence; generated pseudo-samples of earlier tasks (inputs from a "
                       "per-task generator, labels from the model after that task) are mixed into every batch",
               paper="Qin and Joty, ICLR 2022 (LFPT5)"),
        Method("prog-prompt", "progressive", True, block="prompt", combine="concat",
               summary="a new prompt per task; task t trains its prompt after the frozen prompts of tasks 1..t-1, "
                       "concatenated; the task id picks how many prompts at test",
               paper="Razdaibiedina et al., ICLR 2023 (Progressive Prompts)"),
        # Single-task PET methods (ATTEMPT's comparison, DESIGN.md section 3): each task from the same start.
        Method("prompt-tuning", "task", True, block="prompt", independent=True,
               summary="a soft prompt in front of the input, the only trained weights",
               paper="Lester et al., EMNLP 2021"),
        Method("prefix-tuning", "task", True, block="prompt", independent=True, depth="deep", encoder="mlp",
               summary="a prompt at every layer, reparameterised by an MLP during training",
               paper="Li and Liang, ACL 2021"),
        Method("p-tuning", "task", True, block="prompt", independent=True, encoder="lstm",
               summary="an input prompt produced by a BiLSTM + MLP prompt encoder (--prompt-encoder mlp for an MLP)",
               paper="Liu et al., 2021 (GPT Understands, Too)"),
        Method("p-tuning-v2", "task", True, block="prompt", independent=True, depth="deep",
               summary="deep prompts: a trained prompt at every layer, no reparameterisation",
               paper="Liu et al., ACL 2022"),
        Method("bitfit", "sum", False, block="bitfit", independent=True,
               summary="bias terms only (zero biases added to bias-free linear layers)",
               paper="Ben Zaken et al., ACL 2022"),
        Method("lora", "task", True, independent=True, summary="a LoRA block per task on the query and value projections",
               paper="Hu et al., ICLR 2022"),
        Method("full-ft", "sum", False, block="full", independent=True,
               summary="every weight of the backbone, from the pretrained weights for each task"),
        Method("spot", "task", True, block="prompt", independent=True, hooks=("spot",),
               summary="prompt tuning from the source prompt most similar to a briefly trained probe prompt "
                       "(cosine of average tokens)",
               paper="Vu et al., ACL 2022 (SPoT)"),
        Method("attempt", "attempt", True, block="prompt", independent=True,
               summary="instance prompt P_target + sum_j a_j P_j over frozen source prompts and the target; "
                       "only the target prompt and the attention G train",
               paper="Asai et al., EMNLP 2022 (ATTEMPT)"),
        Method("attempt-m", "attempt", True, joint=True, block="prompt",
               summary="ATTEMPT multi-task: a target prompt per task, one shared G, batches mixing tasks",
               paper="Asai et al., EMNLP 2022 (ATTEMPT-m)"),
        Method("sapt-prompt", "attention", True, block="prompt", hooks=("arm",),
               summary="SAPT with a soft prompt per task: the instance prompt is the router-weighted sum",
               paper="Zhao et al., ACL 2024"),
        Method("seq-prompt", "sum", False, block="prompt", summary="one soft prompt trained on the tasks in sequence"),
        Method("per-task-prompt", "task", True, block="prompt",
               summary="one soft prompt per task, evaluated with the true task's prompt (task id given)"),
        Method("mtl-prompt", "sum", False, joint=True, block="prompt",
               summary="one soft prompt on all tasks jointly: upper reference"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PetmixError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def make_hooks(method: Method, trainer: Trainer) -> list[StageHook]:
    """The method's hooks for a run, as its settings configure them (a hook may be switched off)."""
    hooks: list[StageHook] = []
    for name in method.hooks:
        if name == "arm":
            from petmix.methods.sapt import AttentiveReflection

            cfg = trainer.cfg
            if cfg.kl_ratio > 0:  # kl_ratio 0 switches SAPT's reflection off
                hooks.append(AttentiveReflection(trainer.out, cfg.kl_ratio, cfg.replay_source,
                                                 cfg.replay_batch_size, cfg.replay_every, cfg.seed))
        elif name == "orthogonality":
            from petmix.methods.baselines import OrthogonalLoRA

            hooks.append(OrthogonalLoRA(trainer.cfg.olora_lambda1, trainer.cfg.olora_lambda2))
        elif name == "ewc":
            from petmix.methods.baselines import ElasticWeightConsolidation

            cfg = trainer.cfg
            hooks.append(ElasticWeightConsolidation(trainer.out, cfg.ewc_lambda, cfg.ewc_online, cfg.ewc_gamma,
                                                    cfg.ewc_fisher_batches))
        elif name == "replay":
            from petmix.methods.baselines import ExperienceReplay

            cfg = trainer.cfg
            hooks.append(ExperienceReplay(trainer.out, cfg.buffer_per_task, cfg.buffer_per_batch, cfg.seed,
                                          cfg.buffer_total, cfg.buffer_sampling))
        elif name == "lwf":
            from petmix.methods.baselines import LearningWithoutForgetting

            cfg = trainer.cfg
            hooks.append(LearningWithoutForgetting(trainer.out, cfg.lwf_alpha, cfg.lwf_temperature, cfg.lwf_topk))
        elif name == "l2p":
            from petmix.methods.baselines import KeyMatching

            hooks.append(KeyMatching(trainer.cfg.l2p_lambda))
        elif name == "spot":
            from petmix.methods.attempt import SourceTransfer

            hooks.append(SourceTransfer(trainer.out, trainer.sources, trainer.cfg.spot_probe_steps))
        elif name == "lfpt5":
            from petmix.methods.baselines import PseudoSampleReplay

            cfg = trainer.cfg
            hooks.append(PseudoSampleReplay(trainer.out, cfg.buffer_per_batch, cfg.seed))
        else:
            raise ValueError(f"unknown hook {name!r}")
    return hooks
