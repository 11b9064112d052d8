"""References a continual method is read against: a block per task used with the true task id (the
single-task scores, whose diagonal gives FWT), and one block trained on all tasks jointly (multi-task
learning, the upper reference)."""

from __future__ import annotations

from petmix.methods.base import Method, register_method

register_method(
    Method("per-task-lora", "task", True, reference=True,
           tuned_lr=3e-3,  # docs/tuned.md: SuperNI, 50.3 at 3e-3 against 47.0 at 1e-3 and 32.8 at 1e-2
           summary="one LoRA per task, evaluated with the true task's block (task id given): single-task scores"),
    Method("per-task-prompt", "task", True, block="prompt",
           summary="one soft prompt per task, evaluated with the true task's prompt (task id given)"),
    Method("mtl-lora", "sum", False, joint=True,
           tuned_lr=3e-4,  # docs/tuned.md: SuperNI, 49.5 at 3e-4 (ties 50.0 at 3e-3), 47.2 at 1e-4, 46.7 at 1e-3
           summary="one LoRA on all tasks jointly (multi-task learning): upper reference"),
    Method("mtl-prompt", "sum", False, joint=True, block="prompt",
           summary="one soft prompt on all tasks jointly: upper reference"),
)
