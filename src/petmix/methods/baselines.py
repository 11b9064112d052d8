"""Continual-learning baselines as hooks on the shared loop (DESIGN.md section 4).

- O-LoRA (Wang et al., EMNLP 2023 Findings): a new LoRA per task, all summed at test time; while task t
  trains, ``lambda1 * sum_i |A_t A_i^T|`` (entrywise absolute sum, over every layer and earlier task i)
  keeps the new block's subspace orthogonal to the earlier ones, plus an optional ``lambda2 * ||block_t||^2``.
- EWC (Kirkpatrick et al., PNAS 2017): one LoRA trained in sequence with the penalty
  ``lambda/2 * sum_k F_k (theta - theta*_k)^2``; ``F_k`` is the diagonal empirical Fisher after task k.
  The online variant (Schwarz et al., 2018) keeps one anchor and ``F = gamma F_old + F_new``.
- Replay: one LoRA trained in sequence, with real examples of earlier tasks kept in a buffer and mixed
  into every batch. Unlike SAPT's ARM it keeps real data: it is a different setting, said in its outputs.
- LwF (Li and Hoiem, ECCV 2016): before task t trains, the model as it is (after task t-1) answers the
  new task's training inputs; its temperature-scaled output distributions over the answer tokens
  (top-k kept) become soft targets: ``alpha * T^2 * KL(teacher || student)`` is added to the loss.
- L2P (Wang et al., CVPR 2022): the key-query matching loss ``lambda * sum_selected (1 - cos(q, k))``.
- LFPT5 (Qin and Joty, ICLR 2022): after each task, pseudo-inputs from a per-task generator are labelled
  by the model just trained on that task; these generated (input, label) pairs are replayed like a
  buffer. (LFPT5 trains one prompt to both solve and generate; petmix uses the separate generator it
  shares with SAPT's ARM, so that no real example of an earlier task is kept.)
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from petmix.data.collate import IGNORE
from petmix.data.task import Example
from petmix.methods.base import StageHook
from petmix.runs import load_tensors as load_file
from petmix.runs import read_json, save_tensors, write_json

if TYPE_CHECKING:
    from petmix.train import Trainer

log = logging.getLogger(__name__)


def orthogonality_loss(new_a: list[torch.Tensor], old_a: list[list[torch.Tensor]]) -> torch.Tensor:
    """sum over layers l and earlier blocks i of sum |A_new[l] A_i[l]^T| (O-LoRA's L_orth)."""
    total = new_a[0].new_zeros(())
    for layer, a_new in enumerate(new_a):
        for blocks in old_a:
            total = total + (a_new @ blocks[layer].t()).abs().sum()
    return total


class OrthogonalLoRA(StageHook):
    name = "orthogonality"

    def __init__(self, lambda1: float, lambda2: float):
        self.lambda1, self.lambda2 = lambda1, lambda2

    def loss(self, trainer: Trainer, micro_batch: int) -> torch.Tensor | None:
        pool = trainer.mix.pool
        t = pool.num_blocks - 1
        layers = list(pool.layers.values())
        new_a = [layer.lora_A[t] for layer in layers]
        total = None
        if t > 0 and self.lambda1 > 0:
            old_a = [[layer.lora_A[i].detach() for layer in layers] for i in range(t)]
            total = self.lambda1 * orthogonality_loss(new_a, old_a)
        if self.lambda2 > 0:
            l2 = sum((p ** 2).sum() for p in pool.block_parameters(t))
            total = self.lambda2 * l2 if total is None else total + self.lambda2 * l2
        return total


class ElasticWeightConsolidation(StageHook):
    name = "ewc"

    def __init__(self, run_dir: Path, lam: float, online: bool, gamma: float, fisher_batches: int):
        self.path = Path(run_dir) / "ewc.safetensors"
        self.lam, self.online, self.gamma, self.fisher_batches = lam, online, gamma, fisher_batches
        # stage -> (theta*, F); keyed by stage so that a resumed stage cannot add its anchor twice
        self.anchors: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        if self.path.is_file():
            saved = load_file(self.path)
            for key in {k.split(".")[1] for k in saved}:
                n = sum(1 for k in saved if k.startswith(f"anchor.{key}."))
                self.anchors[int(key)] = ([saved[f"anchor.{key}.{i}"] for i in range(n)],
                                          [saved[f"fisher.{key}.{i}"] for i in range(n)])

    def terms(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """(anchor, Fisher) pairs of the penalty: one per task, or one (online: latest anchor, decayed sum of F)."""
        stages = sorted(self.anchors)
        if not self.online or not stages:
            return [self.anchors[k] for k in stages]
        fisher = [torch.zeros_like(f) for f in self.anchors[stages[0]][1]]
        for k in stages:
            fisher = [self.gamma * acc + f for acc, f in zip(fisher, self.anchors[k][1])]
        return [(self.anchors[stages[-1]][0], fisher)]

    def penalty(self, params: list[torch.Tensor]) -> torch.Tensor:
        total = params[0].new_zeros(())
        for anchor, fisher in self.terms():
            for p, a, f in zip(params, anchor, fisher):
                total = total + (f.to(p.device) * (p - a.to(p.device)) ** 2).sum()
        return 0.5 * self.lam * total

    def loss(self, trainer: Trainer, micro_batch: int) -> torch.Tensor | None:
        if not self.anchors:
            return None
        return self.penalty(trainer.mix.pool.block_parameters(0))

    def add_task(self, stage: int, params: list[torch.Tensor], fisher: list[torch.Tensor]) -> None:
        self.anchors[stage] = ([p.detach().clone() for p in params], fisher)

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        params = trainer.mix.pool.block_parameters(0)
        fisher = diagonal_fisher(trainer, stage, params, self.fisher_batches)
        self.add_task(stage, params, fisher)
        if trainer.main:
            tensors = {}
            for k, (anchor, fish) in self.anchors.items():
                tensors.update({f"anchor.{k}.{i}": a.cpu().contiguous() for i, a in enumerate(anchor)})
                tensors.update({f"fisher.{k}.{i}": f.cpu().contiguous() for i, f in enumerate(fish)})
            save_tensors(self.path, tensors)
        return {"fisher_mean": float(sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher))}


def diagonal_fisher(trainer: Trainer, stage: int, params: list[torch.Tensor], batches: int) -> list[torch.Tensor]:
    """Empirical diagonal Fisher: mean over batches of the squared gradient of the task loss."""
    fisher = [torch.zeros_like(p) for p in params]
    examples = trainer.splits[trainer.tasks[stage].name][0]
    bs = trainer.cfg.batch_size
    n = 0
    for b in range(min(batches, (len(examples) + bs - 1) // bs)):
        chunk = examples[b * bs:(b + 1) * bs]
        prompts, answers = trainer.encode(chunk, [trainer.tasks[stage]], [0] * len(chunk))
        batch = trainer.batch(prompts, answers)
        with trainer.accelerator.autocast():
            loss, _ = trainer.mix(batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f += g.detach().float() ** 2
        n += 1
    return [f / max(n, 1) for f in fisher]


class ExperienceReplay(StageHook):
    """A buffer of real examples of finished tasks, ``per_batch`` of them added to every micro-batch.

    Size: ``per_task`` examples of each task, or (``total``) a fixed budget shared equally by the tasks
    seen so far, earlier tasks giving up examples as new ones arrive. Sampling: ``random`` (uniform) or
    ``balanced`` (round-robin over the task's distinct answers, so rare labels are kept too).
    """

    name = "replay"

    def __init__(self, run_dir: Path, per_task: int, per_batch: int, seed: int, total: int | None = None,
                 sampling: str = "random"):
        if sampling not in ("random", "balanced"):
            raise ValueError(f"buffer sampling must be random or balanced, not {sampling!r}")
        self.path = Path(run_dir) / "replay_buffer.json"
        self.per_task, self.per_batch, self.seed = per_task, per_batch, seed
        self.total, self.sampling = total, sampling
        # stage -> [(prompt ids, answer ids)]: real examples kept from each finished task
        self.kept: dict[int, list[tuple[list[int], list[int]]]] = {}
        if self.path.is_file():
            self.kept = {int(k): [tuple(x) for x in v] for k, v in read_json(self.path).items()}

    @property
    def buffer(self) -> list[tuple[list[int], list[int]]]:
        return [ex for k in sorted(self.kept) for ex in self.kept[k]]

    def choose(self, examples: list[Example], k: int, stage: int) -> list[Example]:
        rng = random.Random(self.seed + stage)
        k = min(k, len(examples))
        if self.sampling == "random":
            return rng.sample(examples, k)
        by_label: dict[str, list[Example]] = {}
        for ex in rng.sample(examples, len(examples)):
            by_label.setdefault(ex.outputs[0], []).append(ex)
        groups, chosen = list(by_label.values()), []
        while len(chosen) < k:
            for group in groups:
                if group and len(chosen) < k:
                    chosen.append(group.pop())
        return chosen

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        task = trainer.tasks[stage]
        quota = self.per_task if self.total is None else self.total // (len(self.kept) + 1)
        chosen = self.choose(trainer.splits[task.name][0], quota, stage)
        prompts, answers = trainer.encode(chosen, [task], [0] * len(chosen))
        if self.total is not None:  # earlier tasks shrink to the new equal share (their first examples stay)
            self.kept = {k: v[:quota] for k, v in self.kept.items()}
        self.kept[stage] = list(zip(prompts, answers))
        if trainer.main:
            write_json(self.path, {str(k): v for k, v in self.kept.items()})
        return {"replay_buffer": len(self.buffer), "replay": "real examples of earlier tasks (Replay baseline)"}

    def extra_examples(self, micro_batch: int) -> list[tuple[list[int], list[int]]]:
        buffer = self.buffer
        if not buffer or self.per_batch <= 0:
            return []
        start = micro_batch * self.per_batch  # deterministic cycling: a resumed run sees the same batches
        return [buffer[(start + k) % len(buffer)] for k in range(self.per_batch)]


def answer_positions(logits: torch.Tensor, labels: torch.Tensor, seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict answer tokens ``[B, S, V]`` and the mask ``[B, S]`` of those positions."""
    if not seq2seq:  # a decoder's logits at position p predict the token at p + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels != IGNORE


def distillation_loss(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_probs: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Mean over positions of ``-sum_k p_teacher,k log softmax(student / T)[id_k]`` (KL up to a constant)."""
    logp = torch.log_softmax(student.float() / temperature, dim=-1)
    return -(teacher_probs.float() * logp.gather(-1, teacher_ids.long())).sum(-1).mean()


class LearningWithoutForgetting(StageHook):
    name = "lwf"

    def __init__(self, run_dir: Path, alpha: float, temperature: float, topk: int):
        self.dir = Path(run_dir)
        self.alpha, self.temperature, self.topk = alpha, temperature, topk
        self.ids: list[torch.Tensor] = []  # per training example: [answer positions, k] teacher token ids
        self.probs: list[torch.Tensor] = []

    def _path(self, stage: int) -> Path:
        return self.dir / "lwf" / f"teacher-stage-{stage + 1}.safetensors"

    def prepare_stage(self, trainer: Trainer, stage: int) -> None:
        self.ids, self.probs = [], []
        trainer.mix.keep_logits = stage > 0
        if stage == 0:
            return
        path = self._path(stage)
        if not path.is_file():  # a resumed stage reads the teacher it started with, never the half-trained model
            ids, probs = self.teacher_outputs(trainer, stage)
            if trainer.main:
                offsets = torch.tensor([0] + [len(x) for x in ids]).cumsum(0)
                save_tensors(path, {"ids": torch.cat(ids).int(), "probs": torch.cat(probs).half(), "offsets": offsets})
            trainer.accelerator.wait_for_everyone()
        saved = load_file(path)
        off = saved["offsets"].tolist()
        self.ids = [saved["ids"][a:b] for a, b in zip(off[:-1], off[1:])]
        self.probs = [saved["probs"][a:b] for a, b in zip(off[:-1], off[1:])]

    @torch.no_grad()
    def teacher_outputs(self, trainer: Trainer, stage: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The current model's top-k answer-token distributions on the stage's training examples."""
        task = trainer.tasks[stage]
        examples = trainer.splits[task.name][0]
        prompts, answers = trainer.encode(examples, [task], [0] * len(examples))
        mix, bs = trainer.mix, trainer.cfg.eval_batch_size
        ids, probs = [], []
        was_training = mix.training
        mix.eval()
        for start in range(0, len(examples), bs):
            batch = trainer.batch(prompts[start:start + bs], answers[start:start + bs])
            with trainer.accelerator.autocast():
                mix(batch)
            logits, mask = answer_positions(mix.last_logits, mix.last_labels, trainer.backbone.is_seq2seq)
            for r in range(logits.shape[0]):
                p = torch.softmax(logits[r][mask[r]].float() / self.temperature, dim=-1)
                top = p.topk(min(self.topk, p.shape[-1]), dim=-1)
                ids.append(top.indices.cpu())
                probs.append((top.values / top.values.sum(-1, keepdim=True)).cpu())
        mix.train(was_training)
        return ids, probs

    def loss(self, trainer: Trainer, micro_batch: int) -> torch.Tensor | None:
        if not self.ids:
            return None
        mix = trainer.mix
        logits, mask = answer_positions(mix.last_logits, mix.last_labels, trainer.backbone.is_seq2seq)
        total = None
        for r, i in enumerate(trainer.step_indices):
            student = logits[r][mask[r]]
            n = min(len(student), len(self.ids[i]))
            term = distillation_loss(student[:n], self.ids[i][:n].to(student.device),
                                     self.probs[i][:n].to(student.device), self.temperature)
            total = term if total is None else total + term
        if total is None:
            return None
        return self.alpha * self.temperature ** 2 * total / len(trainer.step_indices)

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        trainer.mix.keep_logits = False
        return {}


class KeyMatching(StageHook):
    """L2P's surrogate loss that pulls the selected keys toward the queries that selected them."""

    name = "key_match"

    def __init__(self, lam: float):
        self.lam = lam

    def loss(self, trainer: Trainer, micro_batch: int) -> torch.Tensor | None:
        match = trainer.mix.router.last_match_loss
        return None if match is None or self.lam <= 0 else self.lam * match

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        return {"key_query": "top-k prompts by key-query matching (no task id)"}


class PseudoSampleReplay(ExperienceReplay):
    """LFPT5's replay: generated inputs of each finished task, labelled by the model after that task."""

    name = "lfpt5"

    def __init__(self, run_dir: Path, per_batch: int, seed: int):
        super().__init__(run_dir, 0, per_batch, seed)
        self.path = Path(run_dir) / "lfpt5_pseudo_samples.json"
        self._read()

    def _read(self) -> None:
        saved = read_json(self.path) if self.path.is_file() else {}
        self.kept = {int(k): [tuple(x) for x in v["ids"]] for k, v in saved.items()}

    def after_stage(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        if stage == len(trainer.tasks) - 1:
            return {"replay": "generated pseudo-samples (LFPT5)"}
        info = self._make(trainer, stage) if trainer.main else {}
        trainer.accelerator.wait_for_everyone()
        if not trainer.main:
            self._read()
        return info

    def _make(self, trainer: Trainer, stage: int) -> dict[str, Any]:
        import time

        from petmix.data.templates import format_prompt
        from petmix.evaluate import generate
        from petmix.replay.generator import generate_pseudo_inputs

        cfg, task = trainer.cfg, trainer.tasks[stage]
        started = time.time()
        inputs, details = generate_pseudo_inputs(cfg.model, task, cfg.generator_config(), n_train=len(task.train))
        with trainer.accelerator.autocast():
            labels, _ = generate(trainer.backbone, [format_prompt(task, x) for x in inputs], cfg.generation(),
                                 trainer.mix.prepare_fn(), desc=f"label pseudo-inputs of {task.name}")
        trainer.mix.clear_weights()
        pairs = [(x, y) for x, y in zip(inputs, labels) if y.strip()]
        examples = [Example(x, [y]) for x, y in pairs]
        prompts, answers = trainer.encode(examples, [task], [0] * len(examples)) if examples else ([], [])
        self.kept[stage] = list(zip(prompts, answers))
        saved = read_json(self.path) if self.path.is_file() else {}
        saved[str(stage)] = {"task": task.name, "samples": [{"input": x, "label": y} for x, y in pairs],
                             "ids": [list(p) for p in self.kept[stage]], "generator": details}
        write_json(self.path, saved)
        log.info("LFPT5: %d pseudo-samples for %s in %.1f s", len(pairs), task.name, time.time() - started)
        return {"replay": "generated pseudo-samples (LFPT5)", "pseudo_samples": len(pairs),
                "replay_s": round(time.time() - started, 1)}
