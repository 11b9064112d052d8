"""Token-level encoding of (prompt, answer) pairs for both model families.

Prompt and answer are tokenised separately, so training and generation see exactly the same
prompt tokens. A prompt longer than ``max_source_len`` loses its middle: the head keeps the task
definition, the tail keeps the end of the input and the ``Output:`` cue. The answer is cut to
``max_target_len`` (end-of-sequence token included) and is never dropped for the sake of the prompt.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100
TAIL_TOKENS = 32


def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    if max_len <= 0 or len(ids) <= max_len:
        return ids
    tail = min(TAIL_TOKENS, max_len // 2)
    return ids[: max_len - tail] + ids[len(ids) - tail:]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_source_len: int) -> list[list[int]]:
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    return [truncate_middle(list(x), max_source_len) for x in ids]


def encode_answers(tokenizer: PreTrainedTokenizerBase, answers: list[str], max_target_len: int) -> list[list[int]]:
    ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [list(x)[: max(max_target_len - 1, 0)] + [eos] for x in ids]


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def prompt_batch(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
    """A batch of prompts for generation; decoders pad on the left so new tokens line up."""
    mask = [[1] * len(s) for s in prompt_ids]
    batch = {
        "input_ids": pad(prompt_ids, tokenizer.pad_token_id, left=left),
        "attention_mask": pad(mask, 0, left=left),
    }
    batch["source_mask"] = batch["attention_mask"].clone()
    return batch


def training_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    answer_ids: list[list[int]],
    seq2seq: bool,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch with loss only on answer tokens.

    ``source_mask`` marks the prompt tokens: routers pool over the input only, never the answer.
    """
    pad_id = tokenizer.pad_token_id
    if seq2seq:
        batch = prompt_batch(tokenizer, prompt_ids, left=False)
        batch["labels"] = pad(answer_ids, IGNORE)
        return batch
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids)]
    labels = [[IGNORE] * len(p) + a for p, a in zip(prompt_ids, answer_ids)]
    source = [[1] * len(p) + [0] * len(a) for p, a in zip(prompt_ids, answer_ids)]
    return {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad(labels, IGNORE),
        "source_mask": pad(source, 0),
    }
