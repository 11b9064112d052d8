"""LwF (Li and Hoiem, ECCV 2016): before task t trains, the model as it is (after task t-1) answers the
new task's training inputs; its temperature-scaled output distributions over the answer tokens (top-k
kept) become soft targets: ``alpha * T^2 * KL(teacher || student)`` is added to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from petmix.data.collate import IGNORE
from petmix.methods.base import Method, StageHook, register_method, setting
from petmix.runs import load_tensors as load_file
from petmix.runs import save_tensors

if TYPE_CHECKING:
    from petmix.methods.base import Stage


@dataclass
class LwFOptions:
    # 0.01: `petmix tune`'s pick on the default model (docs/tuned.md: SuperNI at 1e-3, 54.65 against 52.30 at
    # 0.1 and 36.22 at LwF's usual 1); at 1 the distillation outweighs the new task's labels on a shared LM head.
    lwf_alpha: float = setting(0.01, "lwf: weight of the distillation term (LwF's usual: 1)", ge=0)
    lwf_temperature: float = setting(2.0, "lwf: distillation temperature", gt=0)
    lwf_topk: int = setting(20, "lwf: teacher distribution kept over its top-k tokens per answer position", ge=1)


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

    def prepare_stage(self, trainer: Stage, stage: int) -> None:
        self.ids, self.probs = [], []
        self.keep_logits = stage > 0  # the loss reads the logits from the second task on
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
    def teacher_outputs(self, trainer: Stage, stage: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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
                out = mix(batch, keep_logits=True)
            logits, mask = answer_positions(out.logits, out.labels, trainer.backbone.is_seq2seq)
            for r in range(logits.shape[0]):
                p = torch.softmax(logits[r][mask[r]].float() / self.temperature, dim=-1)
                top = p.topk(min(self.topk, p.shape[-1]), dim=-1)
                ids.append(top.indices.cpu())
                probs.append((top.values / top.values.sum(-1, keepdim=True)).cpu())
        mix.train(was_training)
        return ids, probs

    def loss(self, trainer: Stage, micro_batch: int, output: Any) -> torch.Tensor | None:
        if not self.ids:
            return None
        logits, mask = answer_positions(output.logits, output.labels, trainer.backbone.is_seq2seq)
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

    def after_stage(self, trainer: Stage, stage: int) -> dict[str, Any]:
        self.keep_logits = False
        return {}


register_method(Method(
    "lwf", "sum", False, options=LwFOptions,
    # Its distillation targets sit on the same answer positions, through the same LM head, as the new task's
    # labels (LwF's classifier keeps one head per task), so the weight decides between learning and keeping.
    tuned_option=("lwf_alpha", (0.01, 0.1, 1.0)),
    # Its rate is its kind's 1e-3 (docs/tuned.md: SuperNI at alpha 0.01, 54.65 against 46.46 at 3e-4 and 50.30 at 3e-3).
    hooks=(lambda trainer, o: LearningWithoutForgetting(trainer.out, o.lwf_alpha, o.lwf_temperature, o.lwf_topk),),
    summary="one LoRA in sequence; new-task inputs are also fitted to the previous model's output "
            "distributions (temperature-scaled KL on the answer tokens)",
    paper="Li and Hoiem, ECCV 2016 (Learning without Forgetting)"))
