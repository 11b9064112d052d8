"""Reusable soft prompts: export from a run, a library of source prompts, and finding them again.

A saved prompt is ``<name>.safetensors`` (tensor ``prompt``, ``[L, d]``) next to ``<name>.json``
(its task, backbone, length, method, score). A library is a folder of them with an ``index.json``
listing them in order. ATTEMPT and SPoT take ``sources``: library folders and/or prompt files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from petmix.errors import PetmixError
from petmix.runs import read_json, save_tensors, write_json

# Source prompts are shallow prompt-tuning prompts, one per source task (DESIGN.md section 2).
SOURCE_METHOD = "prompt-tuning"


def export_prompt(path: str | Path, prompt: torch.Tensor, meta: dict[str, Any]) -> Path:
    path = Path(path)
    save_tensors(path, {"prompt": prompt.detach().float().cpu().contiguous()})
    write_json(path.with_suffix(".json"), {**meta, "shape": list(prompt.shape), "file": path.name})
    return path


def prompt_meta(path: str | Path) -> dict[str, Any]:
    side = Path(path).with_suffix(".json")
    return read_json(side) if side.is_file() else {"task": Path(path).stem}


def source_digests(specs: list[str]) -> dict[str, str]:
    """Each source prompt file's name -> the first 16 hex digits of its SHA-256. A run records them: the
    same folder retrained (on other hardware, or with another thread count) holds other prompts."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in resolve_sources(specs)}


def resolve_sources(specs: list[str]) -> list[Path]:
    """Prompt files from ``specs``: each a library folder (its index order) or a ``.safetensors`` file."""
    out: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            index = path / "index.json"
            if index.is_file():
                out += [path / e["file"] for e in _index_entries(index)]
            else:
                out += sorted(path.glob("*.safetensors"))
        elif path.is_file():
            out.append(path)
        else:
            raise PetmixError(f"{path}: no such source prompt file or library folder")
    if len(set(out)) != len(out):
        raise PetmixError(f"sources: a prompt is listed twice ({[str(p) for p in out]})")
    return out


def find_source(name: str, sources: list[Path]) -> Path:
    """The source prompt called ``name`` (file stem or task name)."""
    for path in sources:
        if name in (path.stem, prompt_meta(path).get("task")):
            return path
    raise PetmixError(f"no source prompt named {name!r} among {[p.stem for p in sources]}")


def _index_entries(index: Path) -> list[dict[str, Any]]:
    """The entries of a library's index.json, checked: each names its prompt file."""
    data = read_json(index)
    rows = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in rows):
        raise PetmixError(f"{index}: not a source-prompt index (expected {{\"prompts\": [{{\"file\": ...}}, ...]}})")
    return rows


def write_library(out_dir: str | Path, entries: list[dict[str, Any]]) -> Path:
    """``index.json`` of a library: one entry per prompt (file, task, score, ...)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "index.json", {"prompts": entries})
    return out_dir / "index.json"


def library_table(out_dir: str | Path) -> str:
    index = Path(out_dir) / "index.json"
    if not index.is_file():
        raise PetmixError(f"{index}: not a source-prompt library (no index.json)")
    rows = _index_entries(index)
    lines = ["| prompt | task | metric | score | length | backbone | steps |", "|---|---|---|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e['file']} | {e['task']} | {e.get('metric', '')} | {e.get('score', '')} | "
                     f"{e.get('length', '')} | {e.get('backbone', '')} | {e.get('steps', '')} |")
    return "\n".join(lines)
