"""Batched greedy generation and per-task scoring. No task id ever reaches the model.

``prepare`` is the hook a mixture uses to route: it receives each tokenised batch (with
``source_mask``) and returns the keyword arguments for ``model.generate`` plus, optionally, the
per-input router weights ``[batch, blocks]`` so that they are recorded next to each prediction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from petmix.backbone import Backbone
from petmix.data.collate import encode_prompts, prompt_batch
from petmix.data.task import Task
from petmix.data.templates import format_prompt
from petmix.metrics import score, task_score

log = logging.getLogger(__name__)

PrepareFn = Callable[[dict[str, torch.Tensor]], tuple[dict[str, Any], torch.Tensor | None]]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 50
    batch_size: int = 16
    max_source_len: int = 512
    chat: bool = False


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[str],
    cfg: GenerationConfig | None = None,
    prepare: PrepareFn | None = None,
    desc: str = "generate",
) -> tuple[list[str], list[list[float]] | None]:
    """Greedy answers for ``prompts`` (and router weights, if ``prepare`` gives them), in input order."""
    cfg = cfg or GenerationConfig()
    tok, model = backbone.tokenizer, backbone.model
    ids = encode_prompts(tok, [backbone.render(p, cfg.chat) for p in prompts], cfg.max_source_len)
    # Longest first: batches of similar length waste less padding, and the first batch shows the peak memory.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    texts: list[str] = [""] * len(ids)
    weights: list[list[float]] | None = None
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(ids), desc=desc, unit="ex", dynamic_ncols=True, leave=False, disable=None)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        batch = prompt_batch(tok, [ids[i] for i in idx], left=not backbone.is_seq2seq)
        batch = {k: v.to(backbone.device) for k, v in batch.items()}
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        routed = None
        if prepare is not None:
            kwargs, routed = prepare(batch)
        out = model.generate(
            **kwargs,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if not backbone.is_seq2seq and "input_ids" in kwargs:
            out = out[:, kwargs["input_ids"].shape[1]:]  # decoders echo the prompt; embeds-only calls do not
        for row, i in enumerate(idx):
            texts[i] = tok.decode(out[row], skip_special_tokens=True).strip()
        if routed is not None:
            if weights is None:
                weights = [[] for _ in ids]
            for row, i in enumerate(idx):
                weights[i] = [round(float(w), 6) for w in routed[row].float().cpu()]
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return texts, weights


def evaluate_tasks(
    backbone: Backbone,
    tasks: list[Task],
    cfg: GenerationConfig | None = None,
    prepare: PrepareFn | None = None,
    split: str = "test",
    desc: str = "evaluate",
) -> dict[str, dict[str, Any]]:
    """Score every task on its split. All tasks' inputs go through one pooled, length-sorted generation."""
    prompts, owners = [], []
    for t, task in enumerate(tasks):
        for ex in getattr(task, split):
            prompts.append(format_prompt(task, ex.input))
            owners.append(t)
    start = time.time()
    texts, weights = generate(backbone, prompts, cfg, prepare, desc=desc)
    elapsed = time.time() - start
    results: dict[str, dict[str, Any]] = {}
    k = 0
    for task in tasks:
        records = []
        for ex in getattr(task, split):
            rec = {"input": ex.input, "prediction": texts[k], "references": ex.outputs,
                   "score": round(score(task.metric, texts[k], ex.outputs), 4)}
            if weights is not None:
                rec["router_weights"] = weights[k]
            records.append(rec)
            k += 1
        value = task_score(task.metric, [r["prediction"] for r in records], [r["references"] for r in records])
        results[task.name] = {"metric": task.metric, "score": round(value, 4), "n": len(records), "records": records}
    log.info("evaluated %d examples of %d tasks in %.1f s", len(prompts), len(tasks), elapsed)
    return results
