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


def length_groups(attention_mask: torch.Tensor, min_saving: float = 0.1, group_cost: float = 0.03,
                  max_groups: int = 4) -> list[tuple[torch.Tensor, int]]:
    """Rows of a padded batch in groups of similar length, each with the width its rows need.

    A frozen backbone computes every padded position; run as groups cut to their own width, a batch
    whose lengths differ computes fewer. Groups are contiguous runs of the rows sorted by length, chosen
    to minimise padded positions plus ``group_cost`` of the batch's positions per extra group (a call's
    overhead and smaller matmuls); the batch stays whole unless that saves ``min_saving`` of them.
    Widths assume right padding (a row needs the positions up to its last unmasked one).
    """
    b, t = attention_mask.shape
    positions = torch.arange(1, t + 1, device=attention_mask.device)
    need = (attention_mask.ne(0) * positions).amax(1)  # per row: the positions up to its last token
    order = torch.argsort(need, stable=True)
    lengths = need[order].tolist()
    whole = [(torch.arange(b, device=attention_mask.device), t)]
    if b < 2:
        return whole
    penalty = group_cost * b * t
    # best[k][j]: least cost of the first j sorted rows in k groups; cut[k][j]: where the last group starts.
    inf = float("inf")
    best = [[inf] * (b + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (b + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for j in range(1, b + 1):
            for i in range(j):
                cost = best[k - 1][i] + (j - i) * lengths[j - 1] + (penalty if k > 1 else 0.0)
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_groups + 1), key=lambda g: best[g][b])
    if best[k][b] > (1 - min_saving) * b * t or k == 1:
        return whole
    groups, j = [], b
    while k > 0:
        i = cut[k][j]
        groups.append((order[i:j], int(lengths[j - 1])))
        j, k = i, k - 1
    return groups[::-1]
