"""A run's resumable state: ``RUN/state/`` holds the blocks and router, the optimiser, the random state
and the stage's running statistics after the last checkpointed step.

The state is written to a temporary folder and swapped in whole; the previous one stays in
``state.prev/`` until the new one is in place, so a kill at any moment leaves a complete checkpoint
(``state/``, else ``state.prev/``). A killed run started again with the same ``--out`` continues from it
and ends with the same results as an uninterrupted run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from petmix.errors import PetmixError
from petmix.mixture import Mixture
from petmix.runs import crash_point, load_tensors, read_json, save_tensors, write_json

log = logging.getLogger(__name__)


def save_checkpoint(out: Path, mix: Mixture, progress: dict[str, Any], optimizer: torch.optim.Optimizer | None,
                    stats: dict[str, torch.Tensor] | None = None) -> None:
    """Write the state of a run in ``out`` (the main process calls it)."""
    tmp, state_dir = out / ".state.tmp", out / "state"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "adapters.safetensors", mix.adapter_state())
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"stats.{k}": v.detach().cpu().clone() for k, v in (stats or {}).items()})
    meta: dict[str, Any] = {"progress": progress}
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        meta["param_groups"] = sd["param_groups"]
    save_tensors(tmp / "trainer.safetensors", tensors)
    crash_point("checkpoint-write")
    write_json(tmp / "trainer.json", meta)
    prev, drop = out / "state.prev", out / ".state.drop"
    shutil.rmtree(drop, ignore_errors=True)
    if state_dir.exists():
        if prev.exists():
            prev.rename(drop)
        state_dir.rename(prev)
    crash_point("checkpoint-swap")
    tmp.rename(state_dir)
    shutil.rmtree(drop, ignore_errors=True)


def load_checkpoint(out: Path, mix: Mixture) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
    """The saved progress, tensors and metadata of a run (its blocks and router loaded into ``mix``), or
    None when the run has no checkpoint yet."""
    state = out / "state"
    if not (state / "trainer.json").exists():
        # Killed while swapping checkpoints (or state/ removed by hand after damage): the previous one.
        state = next((d for d in (out / "state.prev", out / ".state.old") if (d / "trainer.json").exists()), None)
        if state is None:
            return None
        log.info("resuming from the previous checkpoint in %s", state)
    meta = read_json(state / "trainer.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("progress"), dict):
        raise PetmixError(f"{state / 'trainer.json'}: damaged file: no progress record. Remove {state} and "
                          "run again, or start a new --out")
    adapters = load_tensors(state / "adapters.safetensors")
    tensors = load_tensors(state / "trainer.safetensors")
    try:
        mix.load_adapter_state(adapters)
    except (KeyError, RuntimeError) as err:
        raise PetmixError(f"{state / 'adapters.safetensors'}: does not fit this run's blocks ({err}); "
                          "start a new --out") from None
    return meta["progress"], tensors, meta


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore an optimiser's state saved by :func:`save_checkpoint`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
