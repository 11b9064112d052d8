"""The training loop over a task stream: one stage per task, evaluation after each stage.

A plain loop (as in torchtune's recipes) on ``accelerate`` for device placement, mixed precision
and the backward pass. The method (``petmix.methods``) says what each stage adds and trains and
which hooks join the loop; the mixture (``petmix.mixture``) routes and computes the loss; the run
directory (``petmix.checkpoint``) holds everything needed to resume: a killed run started again with
the same ``--out`` continues from the last checkpointed optimiser step and ends with the same results
as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from petmix import tracking
from petmix.backbone import Backbone, cpu_has_fast_bf16, load_backbone
from petmix.build import build_mixture, check_model_settings
from petmix.checkpoint import load_checkpoint, load_optimizer, save_checkpoint
from petmix.config import TrainConfig, single_task_diagonal
from petmix.data.collate import encode_answers, encode_prompts, prompt_batch, training_batch
from petmix.data.task import Example, Task
from petmix.data.templates import format_prompt
from petmix.errors import PetmixError
from petmix.evaluate import evaluate_tasks
from petmix.methods import Method, StageHook, foreign_options, get_method
from petmix.metrics import ROUTING_DEFINITION, cl_metrics, routing_accuracy, single_row_metrics
from petmix.peft_io import read_run_imports, use_imported_block
from petmix.runs import (
    check_run_folder,
    crash_point,
    holding,
    read_json,
    read_jsonl,
    save_tensors,
    write_json,
    write_jsonl,
)
from petmix.sources import export_prompt, resolve_sources, source_digests

__all__ = ["TrainConfig", "Trainer"]  # TrainConfig lives in petmix.config; importable from here as before

log = logging.getLogger(__name__)


def stages_wall_seconds(stages: list[dict[str, Any]]) -> float:
    """A run's time: training, between-task work (e.g. ARM's generators) and evaluation of every stage."""
    return round(sum(s.get("train_s", 0) + s.get("replay_s", 0) + s.get("eval_s", 0) for s in stages), 1)


# Settings that may change between the sessions of one run without changing what it computes.
RESUMABLE_CHANGES = {"single_task_results", "checkpoint_every", "eval_batch_size", "report_to"}


def device_label(device: torch.device) -> str:
    """Where a run computed, as its results record it: its wall times are comparable only on like devices."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'})"
    return device.type


def settings_diff(old: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """Keys whose recorded value (a run's config.json) differs from ``resolved``: such a run cannot be
    resumed or read as a run of these settings. Keys an older petmix did not write were at their
    defaults then: only recorded keys count. Other methods' options do not count either: the run never
    read them."""
    old = {"router": "paper", **old}  # runs from before the presets used the paper's
    if old.get("test_seed") is None and resolved.get("test_seed") == old.get("seed"):
        old["test_seed"] = resolved.get("test_seed")  # its test examples were drawn with its seed: the same
    ignored = RESUMABLE_CHANGES | foreign_options(str(resolved.get("method")))
    return sorted(k for k in resolved if k not in ignored and k in old and old[k] != resolved[k])


def finished_run(run_dir: Path, method: str, n_tasks: int) -> bool:
    """``run_dir`` holds a run of ``method`` on ``n_tasks`` tasks with every stage done: one matrix row
    per stage (a joint method has one stage)."""
    path = Path(run_dir) / "results.json"
    stages = 1 if get_method(method).joint else n_tasks
    return path.is_file() and len(read_json(path).get("matrix") or []) == stages


def run_settings_diff(run_dir: Path, cfg: TrainConfig, task_names: list[str]) -> list[str]:
    """``settings_diff`` of the run in ``run_dir`` (empty if it holds none yet): a finished run with
    other settings must not be read (into a table, or as a tuning candidate's score) as if it had these."""
    path = run_dir / "config.json"
    if not path.is_file():
        return []
    return settings_diff(read_json(path), run_identity(cfg, task_names))


def run_identity(cfg: TrainConfig, task_names: list[str]) -> dict[str, Any]:
    """What a run's config.json records and a kept run must match: the settings, the tasks and, where it
    reads source prompts, their digests (runs from before these were recorded match on the rest)."""
    identity = {**cfg.to_dict(), "tasks": list(task_names)}
    if cfg.sources:
        identity["source_digests"] = source_digests(cfg.sources)
    return identity


def routing_summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Routing accuracy per stage and task (``per_stage[i][j]``, None where task j was not evaluated),
    and its mean over the tasks of the last stage (``final``), with the mean own-block weight."""
    def table(key: str) -> list[list[float | None]]:
        return [[(r.get("routing") or {}).get(n, {}).get(key) for n in names] for r in rows]

    acc, own = table("accuracy"), table("own_weight")
    last_acc = [v for v in (acc[-1] if acc else []) if v is not None]
    last_own = [v for v in (own[-1] if own else []) if v is not None]
    return {"definition": ROUTING_DEFINITION, "per_stage": acc, "own_weight_per_stage": own,
            "final": round(sum(last_acc) / len(last_acc), 4) if last_acc else None,
            "final_own_weight": round(sum(last_own) / len(last_own), 6) if last_own else None}


def _stage_order(n: int, seed: int, stage: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


class Trainer:
    """Runs a method over a task stream into a run directory."""

    def __init__(self, cfg: TrainConfig, tasks: list[Task], out: str | Path, backbone: Backbone | None = None):
        from accelerate import Accelerator

        self.cfg = cfg
        self.tasks = tasks
        self.out = Path(out)
        self.method: Method = get_method(cfg.method)
        self.accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                                       **tracking.accelerator_kwargs(cfg.report_to, self.out))
        self.step_offset = 0  # optimiser steps of the stages before the current one (tracking's x axis)
        if cfg.bf16 and self.accelerator.device.type == "cpu" and not cpu_has_fast_bf16():
            log.warning("bf16 on a CPU without AVX512-BF16 or AMX: PyTorch's bf16 matmuls are several times "
                        "slower than fp32 here; run without bf16")
        # Data parallel under `accelerate launch`: each process takes a slice of every micro-batch,
        # gradients are averaged before each step, and only the main process evaluates and writes.
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        torch.manual_seed(cfg.seed)
        self.backbone = backbone or load_backbone(cfg.model)
        self.backbone.model.to(self.accelerator.device)
        check_model_settings(cfg, self.backbone, self.method)
        self.sources = resolve_sources(cfg.sources) if cfg.sources else []
        self.mix = build_mixture(cfg, self.method, self.backbone, self.sources)
        self.trainable_count = 0  # parameters the latest stage trained (reported per task)
        self.stages_info: dict[int, dict[str, Any] | None] = {}
        # Which examples the current micro-batch holds, for hooks whose loss needs it (LwF).
        self.step_indices: list[int] = []
        self.stages: list[list[Task]] = [tasks] if self.method.joint else [[t] for t in tasks]
        self.single_task = self._single_task_scores()
        # Every method trains on the same examples: each task's train split minus a held-out part.
        self.splits = {t.name: t.heldout_split(cfg.heldout_fraction, cfg.seed, cfg.heldout_max)
                       if len(t.train) > 1 else (t.train, t.train) for t in tasks}
        self.hooks = self.method.build_hooks(self)
        self.imported = read_run_imports(cfg, self.method, self.backbone, self.mix, [t.name for t in tasks])

    # ---- run directory -------------------------------------------------------------------
    def _check_run_dir(self) -> dict[str, Any]:
        resolved = run_identity(self.cfg, [t.name for t in self.tasks])
        cfg_path = self.out / "config.json"
        # A folder where no stage has made progress yet (a run that failed early) takes the new settings.
        started = any((self.out / n).exists() for n in ("state", "state.prev", "stages.json", ".state.old"))
        if cfg_path.exists() and started:
            old = read_json(cfg_path)
            if not isinstance(old, dict):
                raise PetmixError(f"{cfg_path}: damaged file: not a JSON object. Remove it to resume with the "
                                  "settings given now, or start a new --out")
            diff = settings_diff(old, resolved)
            if diff:
                raise PetmixError(f"{cfg_path}: the run directory holds a run with other settings ({diff}); "
                                  "use a new --out or the same settings to resume")
        return resolved

    def _single_task_scores(self) -> list[float | None] | None:
        if not self.cfg.single_task_results:
            return None
        path = Path(self.cfg.single_task_results)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise PetmixError(f"{path}: single-task results not found")
        # The single-task score of task i is the reference run's a[i][i] (per-task-lora).
        diag = single_task_diagonal(read_json(path), path)
        return [diag.get(t.name) for t in self.tasks]

    def _save_state(self, progress: dict[str, Any], optimizer: torch.optim.Optimizer | None,
                    stats: dict[str, torch.Tensor] | None = None) -> None:
        if self.main:
            save_checkpoint(self.out, self.mix, progress, optimizer, stats)
        self.accelerator.wait_for_everyone()

    # ---- training --------------------------------------------------------------------------
    def encode(self, examples: list[Example], stage_tasks: list[Task], owners: list[int]) -> tuple[list, list]:
        tok = self.backbone.tokenizer
        prompts = [self.backbone.render(format_prompt(stage_tasks[o], ex.input), self.cfg.chat)
                   for ex, o in zip(examples, owners)]
        return (encode_prompts(tok, prompts, self.cfg.max_source_len),
                encode_answers(tok, [ex.outputs[0] for ex in examples], self.cfg.max_target_len))

    def batch(self, prompt_ids: list[list[int]], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """A training batch of encoded pairs, on the training device (hooks use it too)."""
        batch = training_batch(self.backbone.tokenizer, prompt_ids, answer_ids, self.backbone.is_seq2seq)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _train_stage(self, stage: int, resume: tuple | None) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        stage_tasks = self.stages[stage]
        examples = [ex for t in stage_tasks for ex in self.splits[t.name][0]]
        owners = [i for i, t in enumerate(stage_tasks) for _ in self.splits[t.name][0]]
        if not examples:
            raise PetmixError(f"task {stage_tasks[0].name}: no training examples")
        imported = self.imported.get(stage_tasks[0].name) if len(stage_tasks) == 1 else None
        if imported is not None:  # a frozen PEFT block: a few examples teach the router to select it
            examples, owners = examples[: cfg.import_examples], owners[: cfg.import_examples]
        prompt_ids, answer_ids = self.encode(examples, stage_tasks, owners)

        if resume is None:
            # The stage's training prompts, for a router that starts the new key at their prototype.
            inputs = prompt_batch(self.backbone.tokenizer, prompt_ids, left=False)
            inputs = {k: v.to(acc.device) for k, v in inputs.items() if k in ("input_ids", "source_mask")}
            trainable = self.method.begin_task(self.mix, stage, len(stage_tasks), inputs)
        else:  # blocks already restored from the checkpoint: only re-select what trains
            trainable = self.method.select_trainable(self.mix)
        if imported is not None:
            trainable = use_imported_block(self.mix, imported, trainable, load=resume is None)
        self.trainable_count = sum(p.numel() for p in trainable)
        optimizer = self._optimizer(trainable) if trainable else None
        progress = {"stage": stage, "epoch": 0, "batch": 0, "step": 0, "stage_done": False, "evaluated": False}
        if resume is not None:
            progress, tensors, meta = resume
            if "param_groups" in meta:
                load_optimizer(optimizer, tensors, meta)
            torch.set_rng_state(tensors["rng.torch"])
        n_batches = math.ceil(len(examples) / cfg.batch_size)
        total_batches = max(1, round(cfg.epochs * n_batches)) if trainable else 0
        total_steps = math.ceil(total_batches / cfg.grad_accum)
        name = "+".join(t.name for t in stage_tasks) if len(stage_tasks) <= 2 else f"{len(stage_tasks)} tasks (joint)"
        bar = tqdm(total=total_steps, initial=progress["step"], desc=f"stage {stage + 1}/{len(self.stages)} {name}",
                   unit="step", dynamic_ncols=True, disable=None)
        task_index = self.method.routing_index(stage)
        self.mix.train()
        for hook in self.hooks:
            hook.prepare_stage(self, stage)
        # Running sums survive a resume, so a resumed stage reports what an uninterrupted one does.
        stats = {"weight_sum": torch.zeros(self.mix.num_blocks, dtype=torch.float64),
                 **{f"{h.name}_{k}": torch.zeros((), dtype=torch.float64) for h in self.hooks for k in ("sum", "n")},
                 "loss_sum": torch.zeros((), dtype=torch.float64), "n_seen": torch.zeros((), dtype=torch.float64),
                 "n_batches": torch.zeros((), dtype=torch.float64), "train_s": torch.zeros((), dtype=torch.float64)}
        if resume is not None:
            stats.update({k: tensors[f"stats.{k}"] for k in stats if f"stats.{k}" in tensors})
        done_batches = progress["epoch"] * n_batches + progress["batch"]
        started = time.time() - float(stats["train_s"])
        window: list[float] = []
        while done_batches < total_batches:
            epoch, b = divmod(done_batches, n_batches)
            order = _stage_order(len(examples), cfg.seed, stage, epoch)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size][self.rank::self.world]
            pairs = [(prompt_ids[i], answer_ids[i]) for i in idx]
            pairs += [p for hook in self.hooks for p in hook.extra_examples(done_batches)][self.rank::self.world]
            batch = self.batch([p for p, _ in pairs], [a for _, a in pairs])
            if self.method.joint and self.mix.router.needs_task_id:  # each input's task picks its own block
                batch["task_ids"] = torch.tensor([owners[i] for i in idx], device=acc.device)
            self.step_indices = idx
            with acc.autocast():
                output = self.mix(batch, task_index, keep_logits=any(h.keep_logits for h in self.hooks))
                loss, weights = output.loss, output.weights
                total = loss
                for hook in self.hooks:
                    extra = hook.loss(self, done_batches, output)
                    if extra is not None:
                        total = total + extra
                        stats[f"{hook.name}_sum"] += float(extra.detach())
                        stats[f"{hook.name}_n"] += 1
            acc.backward(total / cfg.grad_accum)
            stats["weight_sum"] += weights.detach().double().sum(0).cpu()
            stats["loss_sum"] += float(loss.detach())
            stats["n_seen"] += len(idx)
            stats["n_batches"] += 1
            window.append(float(loss.detach()))
            done_batches += 1
            last = done_batches == total_batches
            if done_batches % cfg.grad_accum == 0 or last:
                if progress["step"] == 0 and resume is None:
                    self._assert_gradients(trainable)
                if self.world > 1:
                    for p in trainable:
                        p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sum(window) / len(window):.3f}")
                tracking.log_step(acc, sum(window) / len(window), self.step_offset + progress["step"],
                                  [g["lr"] for g in optimizer.param_groups])
                window = []
                progress["epoch"], progress["batch"] = divmod(done_batches, n_batches)
                crash_point("step")
                if progress["step"] % cfg.checkpoint_every == 0 and not last:
                    stats["train_s"] = torch.tensor(time.time() - started, dtype=torch.float64)
                    self._save_state(progress, optimizer, stats)
        bar.close()
        self.mix.eval()
        train_s = time.time() - started
        mean_loss = float(stats["loss_sum"] / stats["n_batches"].clamp(min=1))
        log.info("stage %d (%s): %d steps, mean loss %.4f, %.1f s", stage + 1, name, progress["step"], mean_loss, train_s)
        info = {"train_s": round(train_s, 1), "steps": progress["step"], "mean_loss": round(mean_loss, 5),
                "train_router_weights": ([round(float(w), 6) for w in stats["weight_sum"] / stats["n_seen"]]
                                         if self.method.records_router_weights else None)}
        for hook in self.hooks:
            if type(hook).loss is not StageHook.loss:  # hooks that add a loss report its mean
                n = float(stats[f"{hook.name}_n"])  # batches the hook added a loss to
                info[f"mean_{hook.name}_loss"] = round(float(stats[f"{hook.name}_sum"]) / n, 6) if n else None
            info.update(hook.after_stage(self, stage))
        progress.update(stage_done=True, evaluated=False, info=info)
        self._save_state(progress, None)
        return info

    def _optimizer(self, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # Constant learning rate, as SAPT. The router may get its own rate (router_lr).
        router = {id(p) for p in self.mix.router.parameters()} if self.mix.router is not None else set()
        groups = [{"params": [p for p in trainable if id(p) not in router], "lr": self.cfg.lr}]
        routed = [p for p in trainable if id(p) in router]
        if routed:
            groups.append({"params": routed, "lr": self.cfg.router_lr or self.cfg.lr})
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=0.0)

    def _assert_gradients(self, trainable: list[torch.nn.Parameter]) -> None:
        allowed = {id(p) for p in trainable}
        for name, p in self.mix.named_parameters():
            if p.grad is not None and id(p) not in allowed:
                raise AssertionError(f"gradient reached a frozen parameter: {name}")

    # ---- evaluation --------------------------------------------------------------------------
    def _evaluate(self, stage: int, rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every task the stage's model is scored on: its results, and the keys of the task-id evaluations
        that a later stage may reuse (``_task_eval_key``)."""
        if self.method.independent:  # single-task methods: the model of stage t knows task t only
            indexed = [(stage, self.tasks[stage])]
        elif self.method.joint or self.cfg.eval_scope == "all":
            indexed = list(enumerate(self.tasks))
        else:
            indexed = list(enumerate(self.tasks[: stage + 1]))
        tasks = [t for _, t in indexed]
        gen = self.cfg.generation()
        keys: dict[str, str] = {}
        with self.accelerator.autocast():
            if self.method.task_id_at_test:
                results = {}
                before = rows[-1].get("eval_keys", {}) if rows else {}
                for j, task in indexed:
                    key = self._task_eval_key(j)
                    if key is not None:
                        keys[task.name] = key
                    if key is not None and before.get(task.name) == key:
                        log.info("%s: the blocks its task id selects are unchanged since its last evaluation; "
                                 "its predictions are reused", task.name)
                        results[task.name] = self._earlier_result(stage, task, rows[-1]["scores"][task.name])
                        continue
                    results.update(evaluate_tasks(self.backbone, [task], gen, self.mix.prepare_fn(j),
                                                  desc=f"eval {task.name}"))
            else:
                results = evaluate_tasks(self.backbone, tasks, gen, self.mix.prepare_fn(), desc=f"eval after stage {stage + 1}")
        self.mix.clear_weights()
        return results, keys

    # Task-id routing: the blocks task j's evaluation weighs do not depend on the input, so its answers
    # depend only on the frozen backbone, those blocks and the router. Where all of these are bit-identical
    # to the previous stage's (same digest in stages.json), greedy decoding of the same batches gives the
    # same answers and the previous stage's are reused (per-task-lora: 5 of 15 task evaluations on 5
    # tasks), after a resume too.
    reuse_unchanged_evals = True

    def _task_eval_key(self, j: int) -> str | None:
        """A digest of what task j's evaluation reads besides the frozen backbone (which blocks task id j
        weighs, how much, those blocks' tensors and the router's), or None where no later stage evaluates
        the task again with the same routing (no task id, or one model per task)."""
        router = self.mix.router
        if not (self.reuse_unchanged_evals and router.needs_task_id and not self.method.independent):
            return None
        probe = torch.zeros(1, 1, dtype=torch.long, device=self.backbone.device)
        weights = self.mix.weights_for(probe, torch.ones_like(probe), j).detach().reshape(1, -1)
        used = torch.nonzero(weights.ne(0).any(0)).flatten()
        digest = hashlib.sha256()
        for t in [used, weights[:, used], *(p.detach() for i in used.tolist() for p in self.mix.pool.block_parameters(i)),
                  *router.state_dict().values()]:
            t = t.cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def _earlier_result(self, stage: int, task: Task, score: float) -> dict[str, Any]:
        """Task's result as the previous stage wrote it, router weights extended by zeros to the blocks
        added since (task-id routing gives them no weight)."""
        n = self.mix.num_blocks
        records = read_jsonl(self.out / "predictions" / f"stage-{stage}" / f"{task.name}.jsonl")
        for r in records:
            w = r.get("router_weights")
            if isinstance(w, list) and all(isinstance(x, float) for x in w):
                r["router_weights"] = w + [0.0] * (n - len(w))
        return {"metric": task.metric, "score": score, "n": len(records), "records": records}

    def _write_results(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        names = [t.name for t in self.tasks]
        matrix = [[r["scores"].get(n) for n in names] for r in rows]
        if self.method.joint:
            metrics = single_row_metrics(matrix[-1])
        elif self.method.independent:  # one model per task: its score is the diagonal
            metrics = single_row_metrics([matrix[i][i] if i < len(matrix) else None for i in range(len(names))])
        else:
            metrics = cl_metrics(matrix, self.single_task)
        per_task = {t.name: {"metric": t.metric, "benchmark": t.benchmark, "template": t.template,
                             "definition": t.definition, "n_train": len(t.train),
                             "n_test": len(t.test), "source": t.source, "notes": t.notes} for t in self.tasks}
        if not self.trainable_count:  # every stage was read back from disk: count what the last one trains
            self.trainable_count = sum(p.numel() for p in self.method.select_trainable(self.mix))
        trainable = self.trainable_count
        payload = {
            "method": self.method.name,
            "method_summary": self.method.summary,
            "task_id_at_test": self.method.task_id_at_test,
            "tasks": names,
            "matrix": matrix,
            "metrics": metrics,
            "single_task": self.single_task,
            "per_task": per_task,
            "stage_names": [r["name"] for r in rows],
            "stages": [{k: v for k, v in r.items() if k != "scores"} for r in rows],
            "trainable_params_per_task": trainable,
            "independent": self.method.independent,
            "sources": getattr(self.mix.pool, "source_names", None) or [p.stem for p in self.sources] or None,
            "model": self.backbone.describe(),
            "wall_s": stages_wall_seconds(rows),
            "device": device_label(self.accelerator.device),
            "routing_accuracy": routing_summary(rows, names) if self.method.routes_per_task else None,
        }
        write_json(self.out / "results.json", payload)
        return payload

    def run(self) -> dict[str, Any]:
        check_run_folder(self.out)  # a damaged file is named before anything is written
        resolved = self._check_run_dir()
        self.out.mkdir(parents=True, exist_ok=True)
        with holding(self.out) if self.main else nullcontext():  # one process writes here at a time
            if self.main:
                write_json(self.out / "config.json", resolved)
            return self._run()

    def _run(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = read_json(self.out / "stages.json") if (self.out / "stages.json").exists() else []
        loaded = load_checkpoint(self.out, self.mix)
        start_stage, resume = 0, None
        if loaded is not None:
            progress = loaded[0]
            if progress["stage_done"]:
                # The random state as the uninterrupted run had it here (the next block's initialisation draws on it).
                if "rng.torch" in loaded[1]:
                    torch.set_rng_state(loaded[1]["rng.torch"])
                start_stage = progress["stage"] + (1 if progress["evaluated"] else 0)
                log.info("resuming %s after stage %d", self.out, progress["stage"] + 1)
                if not progress["evaluated"]:
                    rows = rows[: progress["stage"]]
                    self._finish_stage(progress["stage"], rows, progress.get("info"))
                    start_stage = progress["stage"] + 1
            else:
                start_stage, resume = progress["stage"], loaded
                log.info("resuming %s in stage %d at step %d", self.out, progress["stage"] + 1, progress["step"])
        rows = rows[:start_stage]
        tracking.start(self.accelerator, self.cfg)
        for stage in range(start_stage, len(self.stages)):
            self.step_offset = sum(r.get("steps") or 0 for r in rows)
            info = self._train_stage(stage, resume if stage == start_stage else None)
            self._finish_stage(stage, rows, info)
        if not self.main:
            return {}
        payload = self._write_results(rows) if rows else {}
        tracking.log_metrics(self.accelerator, payload.get("metrics") or {}, len(rows) - 1)
        tracking.finish(self.accelerator)  # every log call was flushed: a crash loses nothing logged
        save_tensors(self.out / "adapters.safetensors", self.mix.adapter_state())
        return payload

    def _finish_stage(self, stage: int, rows: list[dict[str, Any]], info: dict[str, Any] | None) -> None:
        if self.main:
            self._evaluate_and_write(stage, rows, info)
        self._save_state({"stage": stage, "epoch": 0, "batch": 0, "step": 0, "stage_done": True,
                          "evaluated": True}, None)
        crash_point("stage-end")

    def _evaluate_and_write(self, stage: int, rows: list[dict[str, Any]], info: dict[str, Any] | None) -> None:
        started = time.time()
        results, keys = self._evaluate(stage, rows)
        crash_point("eval")
        eval_s = round(time.time() - started, 1)
        for name, res in results.items():
            write_jsonl(self.out / "predictions" / f"stage-{stage + 1}" / f"{name}.jsonl", res["records"])
            crash_point("eval-write")
        save_tensors(self.out / "checkpoints" / f"stage-{stage + 1}.safetensors", self.mix.adapter_state())
        stage_name = "joint" if self.method.joint else self.stages[stage][0].name
        self.stages_info[stage] = info
        info = info or {"train_s": 0.0, "steps": None, "mean_loss": None, "train_router_weights": None}
        row = {"name": stage_name, **info, "eval_s": eval_s, "scores": {n: r["score"] for n, r in results.items()}}
        if keys:
            row["eval_keys"] = keys
        if self.method.routes_per_task:  # the block of task j is block j: did the router pick it?
            names = [t.name for t in self.tasks]
            row["routing"] = {n: routing_accuracy([rec.get("router_weights") for rec in r["records"]],
                                                  self.mix.num_sources + names.index(n))
                              for n, r in results.items()}
        rows.append(row)
        write_json(self.out / "stages.json", rows)
        self._write_results(rows)
        tracking.log_stage(self.accelerator, stage, rows[-1]["scores"], info.get("train_router_weights"),
                           {n: w for n, r in results.items() if (w := tracking.mean_weights(r["records"]))},
                           self.method.block_names(self.mix, [t.name for t in self.tasks]))
        for name, res in results.items():  # the latest stage's predictions, where users look first
            write_jsonl(self.out / "predictions" / f"{name}.jsonl", res["records"])
        self._export_prompts(stage, results)

    def _export_prompts(self, stage: int, results: dict[str, dict[str, Any]]) -> None:
        """Per-task prompt blocks become reusable prompts: prompts/<task>.safetensors + .json."""
        pool = self.mix.pool
        if self.method.block != "prompt" or not self.mix.router.needs_task_id:
            return
        stage_tasks = self.stages[stage] if self.method.joint else [self.tasks[stage]]
        first = self.mix.num_sources + (0 if self.method.joint else stage)
        for k, task in enumerate(stage_tasks):
            prompt = pool.export(first + k)
            res = results.get(task.name, {})
            export_prompt(self.out / "prompts" / f"{task.name}.safetensors", prompt, {
                "task": task.name, "method": self.method.name, "backbone": self.backbone.describe()["name"],
                "backbone_path": self.backbone.path, "length": int(prompt.shape[-2]),
                "depth": int(prompt.shape[0]) if prompt.dim() == 3 else 1,
                "metric": res.get("metric"), "score": res.get("score"), "stage": stage + 1,
                "steps": (self.stages_info.get(stage) or {}).get("steps"),
                "note": "target prompt: used with its sources and the router" if self.mix.num_sources else ""})

