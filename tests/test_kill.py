"""A run killed with SIGKILL at any moment, then started again with the same command, ends with
the same results as a run that was never interrupted (issue 14).

The runs are real ``petmix`` processes on the tiny model. ``PETMIX_CRASH_AT=point[:k]`` makes a
process kill itself (SIGKILL, as ``kill -9`` or a power cut) the k-th time it passes a named point
(petmix.runs.crash_point): a training step, writing a checkpoint (between its files, and between
the old checkpoint's retirement and the new one's arrival), ARM's pseudo-input generation, the
evaluation after a stage, and between stages. One chain of processes passes every point: each
process resumes the previous one's run folder and is killed at the next point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import petmix

SRC = str(Path(petmix.__file__).resolve().parents[1])
WORDS = ["yes", "no", "cat"]


def _tasks(root: Path, n: int) -> str:
    names = []
    for t in range(n):
        d = root / f"task{t}"
        d.mkdir(parents=True)
        w = WORDS[t]
        rows = [{"input": f"say {w} number {i}", "output": w} for i in range(11)]
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
        (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
        (d / "task.json").write_text(json.dumps({"definition": f"Answer {w}.", "metric": "exact_match"}))
        names.append(str(d))
    return ",".join(names)


class Runner:
    """petmix commands in forked children of one process that imported petmix once (tests/forkrun.py)."""

    def __init__(self, logs: Path):
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkrun.py"))], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.logs, self.n = logs, 0

    def __call__(self, argv: list[str], crash: str | None = None) -> None:
        self.n += 1
        log = self.logs / f"run{self.n}.log"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "crash": crash, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        text = log.read_text() if log.exists() else ""
        if crash:
            assert result["signal"] == 9, f"not killed at {crash} ({result}):\n{text[-3000:]}"
        else:
            assert result["rc"] == 0, f"{result}:\n{text[-3000:]}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("logs"))
    yield r
    r.close()


def _outcome(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    return {"matrix": res["matrix"], "metrics": res["metrics"], "stage_names": res["stage_names"]}


def test_killed_training_resumes_to_the_same_results(tiny_llama_path, tmp_path, runner):
    tasks = _tasks(tmp_path / "data", 2)
    cfg = tmp_path / "cfg.yaml"
    # ARM with generated pseudo-inputs, so that pseudo-input generation is one of the kill points;
    # a checkpoint after every optimiser step, so that kills land between checkpoints too.
    cfg.write_text("method: sapt-lora\nepochs: 1\nbatch_size: 2\nlr: 0.005\nmax_new_tokens: 3\n"
                   "checkpoint_every: 1\nreplay_source: generated\n"
                   "generator: {epochs: 1, max_train: 8, max_rounds: 1, samples_per_round: 2, max_new_tokens: 6}\n")
    common = ["train", "--config", str(cfg), "--model", str(tiny_llama_path), "--tasks", tasks]
    runner([*common, "--out", str(tmp_path / "ref")])
    run = tmp_path / "killed"
    points = ["checkpoint-write:2",  # stage 1, inside a checkpoint: tensors written, trainer.json not yet
              "checkpoint-swap:1",  # old checkpoint moved to state.prev, new one not yet in place
              "pseudo",  # ARM: pseudo-inputs generated, not yet stored
              "eval",  # evaluation after stage 1 done, nothing of it written
              "stage-end",  # between stages
              "step:2",  # stage 2, ARM's reflection loss on the stored pseudo-inputs
              None]  # the last process finishes the run
    for point in points:
        runner([*common, "--out", str(run)], point)
    assert _outcome(run) == _outcome(tmp_path / "ref")
    a, b = load_file(run / "adapters.safetensors"), load_file(tmp_path / "ref" / "adapters.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    pseudo = sorted(p.name for p in (run / "pseudo").iterdir())
    assert pseudo == sorted(p.name for p in (tmp_path / "ref" / "pseudo").iterdir())
    for name in pseudo:
        assert (run / "pseudo" / name).read_text() == (tmp_path / "ref" / "pseudo" / name).read_text() or \
            name.endswith(".json")  # the info file records timings


def test_killed_comparison_resumes_to_the_same_table(tiny_llama_path, tmp_path, runner):
    tasks = _tasks(tmp_path / "data", 2)
    common = ["compare", "--methods", "a=seq-lora,b=inc-lora", "--model", str(tiny_llama_path), "--tasks", tasks,
              "--epochs", "1", "--batch-size", "2", "--lr", "0.005", "--max-new-tokens", "3", "--checkpoint-every", "1"]
    runner([*common, "--out", str(tmp_path / "ref")])
    # Entry a makes 2 x 4 optimiser steps: the 6th is in its second stage; then one in entry b.
    for point in ("step:6", "step:5", None):
        runner([*common, "--out", str(tmp_path / "killed")], point)
    for label in ("a", "b"):
        assert _outcome(tmp_path / "killed" / label) == _outcome(tmp_path / "ref" / label)
    table = (tmp_path / "killed" / "table.csv").read_text().splitlines()
    ref = (tmp_path / "ref" / "table.csv").read_text().splitlines()
    drop_wall = lambda rows: [",".join(c for i, c in enumerate(r.split(",")) if i != 6) for r in rows]  # noqa: E731
    assert drop_wall(table) == drop_wall(ref)


def test_damaged_checkpoint_is_refused_then_the_previous_one_resumes(tiny_llama_path, tmp_path, runner, capsys):
    """A damaged checkpoint gets exit 2 naming the file and state.prev; removing state/ resumes from
    state.prev (the chain above checks that resuming from state.prev gives the same results)."""
    import shutil

    from petmix.cli import main

    tasks = _tasks(tmp_path / "data", 1)
    common = ["train", "--model", str(tiny_llama_path), "--tasks", tasks, "--method", "inc-lora", "--epochs", "1",
              "--batch-size", "2", "--lr", "0.005", "--max-new-tokens", "2", "--checkpoint-every", "1",
              "--out", str(tmp_path / "run")]
    runner(common, "step:3")
    path = tmp_path / "run" / "state" / "trainer.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "trainer.safetensors" in err and "state.prev" in err and "Traceback" not in err
    shutil.rmtree(tmp_path / "run" / "state")
    assert main(common) == 0
    assert len(_outcome(tmp_path / "run")["matrix"]) == 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_workers_stop_when_their_caller_is_killed(tmp_path):
    """`compare --jobs` / `tune --jobs` train in worker processes. Killing the command (SIGKILL here; a
    plain `kill` skips the pool's shutdown as well) must not leave them training on into run folders that
    the resumed command trains again."""
    import signal
    import time

    caller = (
        "import os, time\n"
        "from petmix.parallel import WorkerPool\n"
        "with WorkerPool(1) as pool:\n"
        "    print(pool._pool.submit(os.getpid).result(), flush=True)\n"
        "    pool._pool.submit(time.sleep, 300)\n"  # a long run, in the worker
        "    time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", caller], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": SRC})
    worker = None
    try:
        worker = int(proc.stdout.readline())
        time.sleep(1)  # the worker is in its long run
        assert _alive(worker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived its killed caller"
    finally:
        proc.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
