"""Sequential baselines: blocks trained on the tasks one after another with nothing against forgetting
(SeqLoRA, SeqFT, a sequential soft prompt) or with a new frozen-after-use block per task summed at
weight 1 (IncLoRA)."""

from __future__ import annotations

from petmix.methods.base import Method, register_method

register_method(
    Method("seq-lora", "sum", False, summary="one LoRA trained on the tasks in sequence (SeqLoRA)"),
    Method("inc-lora", "sum", True, tuned_lr=3e-3,  # docs/tuned.md: SuperNI, 60.4 at 3e-3 against 56.5 at 1e-3 and 2.3 at 1e-2
           summary="a new LoRA per task, earlier ones frozen, all summed with weight 1, no router (IncLoRA)"),
    Method("seq-ft", "sum", False, block="full",
           summary="full fine-tuning of the backbone in sequence (SeqFT); --unfreeze last:N trains only the top N layers"),
    Method("seq-prompt", "sum", False, block="prompt", tuned_lr=1e-2,  # docs/tuned.md: SuperNI, 48.0 at 1e-2
           tuned_prompt_length=5,  # docs/tuned.md: SuperNI, 49.2 at 5 against 48.0 at 10 (20's 50.0: a tie, under one answer)
           summary="one soft prompt trained on the tasks in sequence"),
)
