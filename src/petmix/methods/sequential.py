"""Sequential baselines: blocks trained on the tasks one after another with nothing against forgetting
(SeqLoRA, SeqFT, a sequential soft prompt) or with a new frozen-after-use block per task summed at
weight 1 (IncLoRA)."""

from __future__ import annotations

from petmix.methods.base import Method, register_method

register_method(
    Method("seq-lora", "sum", False, summary="one LoRA trained on the tasks in sequence (SeqLoRA)"),
    # Its kind's 1e-3: tuned on all five SuperNI tasks it scores 26.89 there against 11.98 at 3e-3, the pick of
    # the two-task tuning (60.40 at 3e-3 against 56.50 at 1e-3), which cannot see its forgetting (docs/tuned.md).
    Method("inc-lora", "sum", True,
           summary="a new LoRA per task, earlier ones frozen, all summed with weight 1, no router (IncLoRA)"),
    Method("seq-ft", "sum", False, block="full",
           summary="full fine-tuning of the backbone in sequence (SeqFT); --unfreeze last:N trains only the top N layers"),
    Method("seq-prompt", "sum", False, block="prompt", tuned_lr=1e-2,  # docs/tuned.md: SuperNI, 48.0 at 1e-2
           tuned_prompt_length=5,  # docs/tuned.md: SuperNI, 49.2 at 5 against 48.0 at 10 (20's 50.0: a tie, under one answer)
           summary="one soft prompt trained on the tasks in sequence"),
)
