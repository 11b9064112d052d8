"""Experiment tracking (``--report-to tensorboard``, or any tracker accelerate supports where installed).

What is logged: ``loss`` at every optimiser step (x axis: optimiser steps over the whole stream), and
after each stage (x axis: the stage, 1-based) ``matrix/<task>`` (the row a[i][.] of the accuracy matrix),
``router/train/<block>`` (the mean router weight on the stage's own training inputs) and
``router/test/<task>/<block>`` (the mean weight each task's test inputs give each block), then
``metrics/<name>`` after the last stage. TensorBoard's files go to ``RUN/tracking/petmix/``.

Nothing here is imported, and nothing is written, unless ``report_to`` is set: accelerate loads a
tracker's package only when asked for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from petmix.errors import PetmixError

PROJECT = "petmix"
EXTRAS = {"tensorboard": "pip install 'petmix[tensorboard]'"}


def tracker_names(report_to: str | None) -> list[str]:
    """The trackers asked for (``"tensorboard"``, ``"tensorboard,wandb"``, ``"all"``), checked to be installed."""
    names = [n.strip() for n in (report_to or "").split(",") if n.strip() and n.strip() != "none"]
    if not names:
        return []
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [str(t) for t in LoggerType.list()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise PetmixError(f"report_to: unknown tracker {name!r} (accelerate knows: {', '.join(known)})")
        if name != "all" and name not in available:
            hint = EXTRAS.get(name, f"pip install {name}")
            raise PetmixError(f"report_to: tracker {name!r} is not installed ({hint})")
    return names


def accelerator_kwargs(report_to: str | None, out: Path) -> dict[str, Any]:
    """Arguments for ``Accelerator(...)``: none at all without trackers."""
    names = tracker_names(report_to)
    return {"log_with": names, "project_dir": str(out / "tracking")} if names else {}


def _hparam(v: Any) -> bool | int | float | str:
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def start(accelerator, cfg) -> None:
    if accelerator.log_with:
        config = {k: _hparam(v) for k, v in cfg.to_dict().items()}
        accelerator.init_trackers(PROJECT, config=config)


def log_step(accelerator, loss: float, step: int, lrs: list[float]) -> None:
    if accelerator.log_with:
        values = {"loss": loss, "lr": lrs[0]}
        if len(lrs) > 1:
            values["lr_router"] = lrs[1]
        accelerator.log(values, step=step)


def log_stage(accelerator, stage: int, scores: dict[str, float | None], train_weights: list[float] | None,
              test_weights: dict[str, list[float]], block_names: list[str]) -> None:
    """After stage ``stage`` (0-based): its row of the matrix and where the router sent inputs."""
    if not accelerator.log_with:
        return
    values: dict[str, Any] = {f"matrix/{t}": float(s) for t, s in scores.items() if s is not None}
    for b, w in enumerate(train_weights or []):
        values[f"router/train/{_block(block_names, b)}"] = float(w)
    for task, row in test_weights.items():
        for b, w in enumerate(row):
            values[f"router/test/{task}/{_block(block_names, b)}"] = float(w)
    accelerator.log(values, step=stage + 1)


def log_metrics(accelerator, metrics: dict[str, float | None], stage: int) -> None:
    if accelerator.log_with:
        accelerator.log({f"metrics/{k}": float(v) for k, v in metrics.items() if v is not None}, step=stage + 1)


def finish(accelerator) -> None:
    if accelerator.log_with:
        accelerator.end_training()


def _block(names: list[str], b: int) -> str:
    return names[b] if b < len(names) else f"block{b + 1}"


def mean_weights(records: list[dict[str, Any]]) -> list[float] | None:
    """Mean ``router_weights`` over prediction records (None when the method has no router)."""
    rows = [r["router_weights"] for r in records if r.get("router_weights")]
    if not rows:
        return None
    return [sum(r[b] for r in rows) / len(rows) for b in range(len(rows[0]))]
