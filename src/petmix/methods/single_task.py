"""Single-task PET methods (ATTEMPT's comparison, DESIGN.md section 3): each task learned from the same
start and scored alone; the block kind and its options are the method."""

from __future__ import annotations

from petmix.methods.base import Method, register_method

register_method(
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
           tuned_prompt_length=20,  # docs/tuned.md: ATTEMPT benchmark, 56.0 at 20 against 51.0 at 10 and 49.0 at 5
           summary="deep prompts: a trained prompt at every layer, no reparameterisation",
           paper="Liu et al., ACL 2022"),
    Method("bitfit", "sum", False, block="bitfit", independent=True,
           summary="bias terms only (zero biases added to bias-free linear layers)",
           paper="Ben Zaken et al., ACL 2022"),
    Method("lora", "task", True, independent=True, summary="a LoRA block per task on the query and value projections",
           paper="Hu et al., ICLR 2022"),
    Method("full-ft", "sum", False, block="full", independent=True,
           summary="every weight of the backbone, from the pretrained weights for each task"),
)
