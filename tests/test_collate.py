"""Token-level encoding: truncation keeps the answer, loss only on answer tokens, input-only masks."""

from __future__ import annotations

from tiny import tiny_tokenizer

from petmix.data.collate import (
    IGNORE,
    encode_answers,
    encode_prompts,
    prompt_batch,
    training_batch,
    truncate_middle,
)


def test_truncate_middle_keeps_head_and_tail():
    ids = list(range(100))
    out = truncate_middle(ids, 40)
    assert len(out) == 40 and out[:20] == list(range(20)) and out[-20:] == list(range(80, 100))
    assert truncate_middle(ids, 200) == ids


def test_long_prompt_never_costs_the_answer():
    tok = tiny_tokenizer()
    prompt = "Definition: " + "very long definition " * 50 + "\nInput: x\nOutput: "
    p = encode_prompts(tok, [prompt], 32)
    a = encode_answers(tok, ["the cat sat on the mat"], 16)
    assert len(p[0]) == 32
    assert a[0][-1] == tok.eos_token_id and len(a[0]) <= 16
    assert tok.decode(p[0][-8:]).endswith("Output: ")  # the cue to answer survives truncation
    batch = training_batch(tok, p, a, seq2seq=False)
    labels = batch["labels"][0].tolist()
    assert labels[:32] == [IGNORE] * 32 and labels[32:32 + len(a[0])] == a[0]  # loss on the answer only
    assert batch["source_mask"][0].tolist() == [1] * 32 + [0] * len(a[0])  # router sees the input only


def test_answer_is_cut_to_max_target_len_with_eos():
    tok = tiny_tokenizer()
    a = encode_answers(tok, ["the cat sat on the mat " * 5], 6)
    assert len(a[0]) == 6 and a[0][-1] == tok.eos_token_id


def test_padding_sides():
    tok = tiny_tokenizer()
    ids = [[5, 6, 7], [8]]
    left = prompt_batch(tok, ids, left=True)
    assert left["input_ids"][1].tolist() == [tok.pad_token_id] * 2 + [8]
    assert left["attention_mask"][1].tolist() == [0, 0, 1]
    seq2seq = training_batch(tok, ids, [[9, tok.eos_token_id], [tok.eos_token_id]], seq2seq=True)
    assert seq2seq["labels"][1].tolist() == [tok.eos_token_id, IGNORE]
    assert seq2seq["input_ids"][1].tolist() == [8, tok.pad_token_id, tok.pad_token_id]
