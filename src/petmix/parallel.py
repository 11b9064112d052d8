"""Training runs in worker processes, several at once: ``compare --jobs`` (``train_runs``) and ``tune --jobs``
(``WorkerPool``: every method's search at once, sharing the workers).

Each run trains in a spawned process that loads its own copy of the model (on a GPU the processes share
it; on a CPU they share the cores: each gets cores / N threads unless ``OMP_NUM_THREADS`` is set). A run
is the one the caller would have trained in-process: same config, same tasks, same folder. Workers log
to stderr and into the caller's log file, each line tagged with its run's name.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petmix.data.task import Task
from petmix.train import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One training run to make: what ``Trainer(cfg, tasks, where).run()`` would make in-process."""

    cfg: TrainConfig
    tasks: list[Task]
    where: Path
    tag: str  # its name in the log
    key: Any = None  # the caller's handle on it


def worker_logging(tag: str, log_file: str | None, level: int) -> None:
    """A worker's log lines, tagged with its current run: to stderr and the caller's log file. A worker
    process trains one run after another, so the previous run's handlers go first."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_petmix_worker", False)]:
        root.removeHandler(h)
        h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))  # the caller's log.txt, appended
    for h in handlers:
        h.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{tag}] %(name)s: %(message)s", "%H:%M:%S"))
        h._petmix_worker = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)


def exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Run in each worker as it starts: once its caller is gone (killed, e.g. ``kill PID``, which skips the
    pool's shutdown), the worker exits within ``every_s``. Otherwise it would train on into its run folder
    while a resumed command trains the same run there."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)  # the run resumes from its last finished stage, as after any kill

    threading.Thread(target=watch, name="petmix-exit-with-parent", daemon=True).start()


def _train_worker(run: Run, threads: int, log_file: str | None, level: int) -> tuple[dict[str, Any] | None, str | None]:
    """One run in a worker process: (results, None), or (None, the error)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # the machine's cores, shared out; a set OMP_NUM_THREADS wins
        torch.set_num_threads(threads)
    worker_logging(run.tag, log_file, level)
    try:
        return Trainer(run.cfg, run.tasks, run.where).run(), None
    except Exception as err:  # returned, not raised: any exception, picklable or not, reaches the caller
        log.exception("%s failed; going on with the other runs", run.tag)
        return None, f"{type(err).__name__}: {err}"


def _log_target() -> tuple[str | None, int]:
    """The caller's log.txt (the file setup_logging opened) and level, for the workers to log to as well."""
    log_file = next((h.baseFilename for h in logging.getLogger().handlers
                     if isinstance(h, logging.FileHandler) and getattr(h, "_petmix", False)), None)
    return log_file, logging.getLogger().getEffectiveLevel()


class WorkerPool:
    """``jobs`` spawned worker processes that runs are submitted to: by ``train_runs`` (``compare --jobs``),
    or by several threads at once (``tune --jobs`` searches each method in its own thread; a round of one
    method's candidates waits only for its own runs while the other methods' candidates fill the free
    workers: one method at a time would leave workers idle, as a round has three or four candidates and
    the next round depends on it)."""

    def __init__(self, jobs: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.log_file, self.level = _log_target()
        # spawn, not fork: a forked child would inherit the parent's torch threads and locks mid-state
        self._pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=exit_with_parent, initargs=(os.getpid(),))

    def submit(self, run: Run) -> Future:
        """Queue ``run``; its future gives (results, None) or (None, the error)."""
        log.info("%s: training (%s) into %s", run.tag, run.cfg.method, run.where)
        return self._pool.submit(_train_worker, run, self.threads, self.log_file, self.level)

    def train(self, runs: list[Run]) -> list[tuple[dict[str, Any] | None, str | None]]:
        """Train ``runs`` (queued behind what other threads asked for) and wait for them: (results, None) or
        (None, the error) for each, in order."""
        futures = [self.submit(run) for run in runs]
        out = []
        for future in futures:
            try:
                out.append(future.result())
            except Exception as err:  # the worker itself died (killed, out of memory)
                out.append((None, f"{type(err).__name__}: {err}"))
        return out

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def train_runs(todo: list[Run], jobs: int, finished: Callable[[Run, dict[str, Any] | None, str | None], None],
               ready: Callable[[Run], bool] = lambda run: True) -> None:
    """Train ``todo`` in ``jobs`` worker processes, in order, starting a run only once ``ready(run)`` (asked
    again whenever a run ends: a run that reads another's results waits for it); ``finished(run, results,
    error)`` gets each run as it ends. Whatever ``ready`` holds back once nothing runs starts anyway, so
    that a dependency that failed shows as the waiting run's own error rather than a hang."""
    from concurrent.futures import FIRST_COMPLETED, wait

    waiting = list(todo)
    running: dict[Future, Run] = {}
    with WorkerPool(jobs) as pool:
        while waiting or running:
            startable = [r for r in waiting if ready(r)] or ([] if running else waiting[:1])
            for run in startable[: jobs - len(running)]:
                waiting.remove(run)
                running[pool.submit(run)] = run
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                try:
                    results, error = future.result()
                except Exception as err:  # the worker itself died (killed, out of memory)
                    results, error = None, f"{type(err).__name__}: {err}"
                finished(run, results, error)
