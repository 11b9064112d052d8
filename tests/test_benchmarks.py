"""The benchmark scripts still run against the library as it is now (on the tiny model, a few steps).

They import petmix's internals (Mixture, pools, the trainer's batch order), so a refactor that changes
those can break a script nobody runs until hours of benchmark time are lost. No time is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_vs_peft_step_and_pool_size(tiny_llama_path, tmp_path):
    out = tmp_path / "vs_peft.json"
    proc = _run([str(ROOT / "benchmarks/vs_peft.py"), "--model", str(tiny_llama_path), "--parts", "a,c",
                 "--sets", "fixed", "--fixed", "2x24", "--reps", "1", "--precisions", "fp32", "--plain",
                 "--blocks", "1,3", "--out", str(out)], tmp_path)
    assert "ratio to PEFT LoRA, 1 adapter" in proc.stdout
    results = json.loads(out.read_text())["parts a,c"]["results"]
    step = next(v for k, v in results.items() if k.startswith("(a) training step"))
    assert set(step) == {"PEFT LoRA, 1 adapter", "petmix sapt-lora, 15 blocks", "petmix sapt-lora, 15 blocks (plain)"}
    pool = next(v for k, v in results.items() if k.startswith("(c)"))
    assert set(pool) == {"1 blocks", "3 blocks"} and all(len(t) == 1 and t[0] > 0 for t in pool.values())


def test_step_time(tiny_llama_path, tmp_path):
    out = tmp_path / "step_time.json"
    _run([str(ROOT / "benchmarks/step_time.py"), "--model", str(tiny_llama_path), "--blocks", "1,2",
          "--batch-size", "2", "--seq-len", "16", "--reps", "1", "--out", str(out)], tmp_path)
    assert out.is_file()


def test_vs_arrow(tiny_llama_path, tmp_path):
    out = tmp_path / "arrow"
    proc = _run([str(ROOT / "benchmarks/vs_arrow.py"), "--model", str(tiny_llama_path),
                 "--data", str(ROOT / "tests/fixtures/cl_layout"),
                 "--set", "tasks=[task001_tiny_colour_qa, task002_tiny_summary]", "--max-train", "8",
                 "--max-test", "3", "--epochs", "1", "--set", "batch_size=4", "--import-examples", "4",
                 "--top-k", "1", "--out", str(out)], tmp_path)
    for row in ("petmix router (imported blocks)", "oracle (own adapter)", "uniform mixture (1/n)", "PEFT Arrow top_k=1"):
        assert f"| {row} |" in proc.stdout
