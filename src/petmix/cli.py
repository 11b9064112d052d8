"""petmix: continual and multi-task learning of language models with parameter-efficient tuning.

Commands: train (a task stream with a method), compare (several methods, one table), eval (zero-shot),
report (matrix, metrics, heatmaps of a run), predict (answer with a trained run), sources (train and
list a library of source prompts for ATTEMPT and SPoT), export (a run's LoRA blocks as PEFT adapters),
serve (a run behind an OpenAI-compatible API).
See README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from petmix.errors import PetmixError
from petmix.validation import bounds

log = logging.getLogger("petmix")


def _task_specs(args: argparse.Namespace) -> list[str]:
    from petmix.data.streams import resolve_stream

    if getattr(args, "tasks", None):
        return [t.strip() for t in args.tasks.split(",") if t.strip()]
    return resolve_stream(getattr(args, "stream", None) or "default")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="folder of tasks (e.g. ../shared/data/CL_Benchmark); not needed for bigbench: tasks")
    p.add_argument("--tasks", help="comma-separated task names or folders (default: --stream)")
    p.add_argument("--stream", help="named stream (default, superni-order1, long4-order1, ...)")
    p.add_argument("--max-train", type=int, help="cap on training examples per task (seeded sample)")
    p.add_argument("--max-test", type=int, help="cap on test examples per task (seeded sample)")
    p.add_argument("--seed", type=int, default=0)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local model folder or packaged alias (default smollm2-135m)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--max-source-len", type=int, default=512)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--dtype", default="float32", help="weights dtype: float32 (default) or bfloat16")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on CPUs with AVX-512 BF16)")


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "argv")}


@dataclass
class EvalSettings:
    """The eval command's settings, checked by the same pass as TrainConfig's (petmix.validation)."""

    model: str | None = None
    data: str | None = None
    tasks: str | None = None
    stream: str | None = None
    max_train: int | None = field(default=None, metadata=bounds(ge=1))
    max_test: int | None = field(default=None, metadata=bounds(ge=1))
    seed: int = field(default=0, metadata=bounds(ge=0, le=2**32 - 1))
    batch_size: int = field(default=16, metadata=bounds(ge=1))
    max_new_tokens: int = field(default=50, metadata=bounds(ge=1))
    max_source_len: int = field(default=512, metadata=bounds(ge=8))
    chat: bool = False
    dtype: str = field(default="float32", metadata=bounds(choices=("float32", "fp32", "bfloat16", "bf16",
                                                                   "float16", "fp16")))
    bf16: bool = False


def _check_eval_args(args: argparse.Namespace) -> None:
    from petmix.data.streams import resolve_stream
    from petmix.validation import check_fields, namer

    names = {f.name for f in fields(EvalSettings)}
    check_fields(EvalSettings, {k: v for k, v in vars(args).items() if k in names}, namer("command line", names))
    if args.data is not None and not Path(args.data).expanduser().is_dir():
        raise PetmixError(f"--data: {args.data}: no such folder")
    if args.model is not None:
        from petmix.config import check_model_name

        check_model_name(args.model, "--model")
    if args.stream is not None and not args.tasks:
        try:
            resolve_stream(args.stream)
        except PetmixError as err:
            raise PetmixError(f"--stream: {err}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from petmix.backbone import DEFAULT_MODEL, load_backbone
    from petmix.data.loaders import load_tasks
    from petmix.evaluate import GenerationConfig, evaluate_tasks
    from petmix.metrics import single_row_metrics
    from petmix.runs import check_out_dir, setup_logging, write_json, write_jsonl

    setup_logging(None, args.verbose)
    _check_eval_args(args)
    out = check_out_dir(args.out)
    started = time.time()
    tasks = load_tasks(_task_specs(args), args.data, max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    backbone = load_backbone(args.model or DEFAULT_MODEL, dtype=args.dtype)
    setup_logging(out, args.verbose)  # the run folder is made once the inputs and the model are known good
    log.info("model %s", backbone.describe())
    write_json(out / "config.json", {"command": "eval", **_plain_args(args), "model": backbone.name,
                                     "tasks": [t.name for t in tasks]})
    cfg = GenerationConfig(args.max_new_tokens, args.batch_size, args.max_source_len, args.chat)
    import torch

    with torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        results = evaluate_tasks(backbone, tasks, cfg, desc="zero-shot")
    for task in tasks:
        write_jsonl(out / "predictions" / f"{task.name}.jsonl", results[task.name]["records"])
    names = [t.name for t in tasks]
    per_task: dict[str, Any] = {
        t.name: {"metric": t.metric, "score": results[t.name]["score"], "n_test": results[t.name]["n"],
                 "benchmark": t.benchmark, "source": t.source, "notes": t.notes}
        for t in tasks
    }
    row = [results[n]["score"] for n in names]
    payload = {"method": "zero-shot", "tasks": names, "matrix": [row], "metrics": single_row_metrics(row),
               "per_task": per_task, "stage_names": ["zero-shot"], "model": backbone.describe(),
               "wall_s": round(time.time() - started, 1)}
    write_json(out / "results.json", payload)
    _print_scores(names, payload)
    log.info("wrote %s in %.1f s", out / "results.json", time.time() - started)
    return 0


def _print_scores(names: list[str], payload: dict[str, Any]) -> None:
    width = max(len(n) for n in names)
    for n, s in zip(names, payload["matrix"][-1]):
        print(f"{n:<{width}}  {s:6.2f}  ({payload['per_task'][n]['metric']})")
    metrics = payload["metrics"]
    print("  ".join(f"{k}={'-' if v is None else f'{v:.2f}'}" for k, v in metrics.items()))


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _method_help() -> str:
    from petmix.methods import METHODS

    return "one of: " + ", ".join(METHODS) + " (default sapt-lora)"


def _tuned_options_help() -> str:
    from petmix.methods import METHODS

    own = dict.fromkeys(m.tuned_option[0] for m in METHODS.values() if m.tuned_option)
    return ", ".join([*own, "prompt_length"])


def _yaml_mapping(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML mapping ({' '.join(str(err).split())})") from None


def train_flags() -> list[tuple[str, dict[str, Any]]]:
    """``petmix train``'s flags, one per setting (TrainConfig's own and every registered method's options),
    each with the setting's help line and default: derived, never kept by hand. Values are read as text
    and converted by the same validation pass a config file goes through (``TrainConfig.from_dict``)."""
    import typing

    from petmix.config import TrainConfig
    from petmix.validation import _kind

    flags = []
    for owner, f in TrainConfig.settings():
        base, _ = _kind(typing.get_type_hints(owner)[f.name])
        kwargs: dict[str, Any] = {"help": _flag_help(f), "default": argparse.SUPPRESS}
        if base is bool:  # --chat alone is true; --chat false says it
            kwargs.update(nargs="?", const=True, type=_bool, metavar="true|false")
        elif typing.get_origin(base) is dict or base is dict:
            kwargs.update(type=_yaml_mapping, metavar="YAML")
        elif typing.get_origin(base) is list:
            kwargs.update(metavar="A,B,...")
        flags.append(("--" + f.name.replace("_", "-"), kwargs))
    return flags


def _flag_help(f: Any) -> str:
    import dataclasses

    text = f.metadata.get("help", "")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default not in (None, [], {}, "") and "default" not in text:
        text += f" (default {default})"
    rule = f.metadata.get("bounds")
    if rule is not None and rule.choices is None and rule.describe() != "any value":
        text += f"; {rule.describe()}"
    return text.replace("%", "%%")


def _train_config(args: argparse.Namespace, apply_tuned: bool = False, method: str | None = None):
    """The run's settings from --config, tuned values and flags, validated; ``method`` (a command that
    always trains one method, e.g. ``sources train``) is set before validation, so checks that depend
    on the method are its own."""
    import yaml

    from petmix.config import TrainConfig

    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        path = Path(args.config)
        if not path.is_file():
            raise PetmixError(f"--config {args.config}: no such file")
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise PetmixError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            raise PetmixError(f"{path}: malformed YAML ({' '.join(str(err).split())})") from None
        except OSError as err:
            raise PetmixError(f"{path}: cannot read it ({err.strerror})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise PetmixError(f"{path}: expected a mapping of settings (key: value lines) at the top level, "
                              f"got a {type(loaded).__name__}")
        values.update({(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in loaded.items()})
    skip = {"func", "command", "config", "out", "verbose", "methods", "sources_command", "tuned", "seeds", "no_floors", "no_train", "jobs",
            "tune_tasks", "val_fraction", "val_max", "lr_grid", "option_grid", "converge", "tuned_file", "argv"}
    flag_values = {k: v for k, v in vars(args).items() if k not in skip}
    flags = set(flag_values)
    if apply_tuned and getattr(args, "tuned", None):  # tuned settings override the file, flags override both
        from petmix.methods import DEFAULT_METHOD
        from petmix.tune import read_tuned

        method = flag_values.get("method") or values.get("method") or DEFAULT_METHOD
        chosen = read_tuned(args.tuned).get(method, {})
        log.info("settings of %s from %s: %s", method, args.tuned, chosen or "none tuned for this method")
        values.update(chosen)
    values.update(flag_values)  # flags override the file
    if method is not None:
        values["method"] = method
    source = args.config or "command line"
    return TrainConfig.from_dict(values, source, flags=flags)


def _prepare_run(args: argparse.Namespace, default_stream: str = "default", method: str | None = None,
                 imports: bool = False, apply_tuned: bool = False):
    """Everything checked before a model loads or a file is written: settings, --out, an existing run
    folder's files, the task data. Returns (settings, out folder, tasks, backbone): ``imports`` checks
    PEFT adapters to import against the model first (the model is loaded for that, and returned)."""
    from petmix.data.loaders import load_tasks
    from petmix.data.streams import resolve_stream
    from petmix.runs import check_out_dir, check_run_folder, setup_logging

    setup_logging(None, args.verbose)
    cfg = _train_config(args, apply_tuned=apply_tuned, method=method)
    out = check_out_dir(args.out)
    check_run_folder(out)
    backbone = None
    if imports and cfg.import_adapters:  # refuse unusable adapters before the run directory exists
        from petmix.peft_io import preflight_imports

        backbone = preflight_imports(cfg)
    specs = cfg.tasks or resolve_stream(cfg.stream or default_stream)
    tasks = load_tasks(specs, cfg.data, max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed,
                       test_seed=cfg.test_seed)
    return cfg, out, tasks, backbone


def cmd_train(args: argparse.Namespace) -> int:
    from petmix.report import render_report, write_heatmaps
    from petmix.runs import setup_logging
    from petmix.train import Trainer

    cfg, out, tasks, backbone = _prepare_run(args, imports=True, apply_tuned=True)
    trainer = Trainer(cfg, tasks, out, backbone=backbone)  # loads the model; checks what only the model can answer
    setup_logging(out, args.verbose)  # the run folder is made only now
    for t in tasks:
        for note in t.notes:
            log.info("%s: %s", t.name, note)
    trainer.run()
    if not trainer.main:  # under `accelerate launch`, the main process reports
        return 0
    print(render_report(out))
    for path in write_heatmaps(out):
        print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:

    from petmix.compare import Entry, check_entries, load_tuned, run_comparison
    from petmix.data.loaders import load_tasks
    from petmix.data.streams import resolve_stream
    from petmix.runs import check_run_folder, setup_logging
    from petmix.tune import command_line

    entries = [Entry.parse(m.strip()) for m in args.methods.split(",") if m.strip()]
    check_entries(entries)
    if args.jobs < 1:
        raise PetmixError(f"--jobs: at least 1 (runs trained at once), got {args.jobs}")
    cfg, out, tasks, _ = _prepare_run(args)
    for entry in entries:
        check_run_folder(out / entry.label)
    specs = cfg.tasks or resolve_stream(cfg.stream or "default")
    seeds = _seed_list(args.seeds) if getattr(args, "seeds", None) else None
    test_seed = cfg.test_seed if cfg.test_seed is not None else (cfg.seed if seeds else None)

    def tasks_for_seed(seed: int):
        return load_tasks(specs, cfg.data, max_train=cfg.max_train, max_test=cfg.max_test, seed=seed,
                          test_seed=test_seed)

    if seeds:
        tasks = tasks_for_seed(cfg.seed)
    base = cfg.shared_settings()  # each entry trains at its own method's lr and prompt length unless set
    tuned = load_tuned(args.tuned) if getattr(args, "tuned", None) else {}
    record = {"command": command_line(getattr(args, "argv", None)), "tuned_file": getattr(args, "tuned", None)}
    rows = run_comparison(entries, base, tasks, out, seeds=seeds, tasks_for_seed=tasks_for_seed, tuned=tuned,
                          floors=not args.no_floors, record=record,
                          before_first=lambda: setup_logging(out, args.verbose), train=not args.no_train,
                          jobs=args.jobs)
    print((out / "table.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'per_task.md'}, {out / 'matrices.png'}")
    from petmix.report_html import write_compare_html

    print(f"wrote {write_compare_html(out)}")
    failed = [r["label"] for r in rows if "failed" in r]
    if failed:
        print(f"petmix: {len(failed)} entries failed ({', '.join(failed)}); see {out / 'log.txt'}", file=sys.stderr)
        return 1
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PetmixError(f"--seeds: expected comma-separated integers such as 0,1,2, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise PetmixError(f"--seeds: expected distinct seeds such as 0,1,2, not {text!r}")
    return seeds


def _float_list(text: str | None, flag: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PetmixError(f"{flag}: expected comma-separated numbers, not {text!r}") from None


def cmd_tune(args: argparse.Namespace) -> int:

    from petmix.data.loaders import load_tasks
    from petmix.data.streams import resolve_stream
    from petmix.runs import setup_logging
    from petmix.tune import (
        check_kept_candidates,
        command_line,
        option_grid,
        tune_method,
        tuned_table,
        typed_options,
        validation_tasks,
        write_tuned,
    )

    out = Path(args.out)
    cfg = _train_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise PetmixError("--methods: give at least one method")
    if args.jobs < 1:
        raise PetmixError(f"--jobs: at least 1 (candidates trained at once), got {args.jobs}")
    lrs, options = _float_list(args.lr_grid, "--lr-grid"), _float_list(args.option_grid, "--option-grid")
    for method in methods:  # a value the method's option cannot take is named before anything is written
        if options and option_grid(method):
            typed_options(option_grid(method), options)
    specs = (cfg.tasks or resolve_stream(cfg.stream or "default"))[: args.tune_tasks]
    # Uncapped train (the validation split comes out of all of it); the test split is replaced unread.
    loaded = load_tasks(specs, cfg.data, max_train=None, max_test=None, seed=cfg.seed, test_seed=cfg.test_seed)
    tasks = validation_tasks(loaded, args.val_fraction, cfg.seed, args.val_max, cfg.max_train)
    base = {k: v for k, v in cfg.shared_settings().items() if k not in ("tasks", "stream")}
    base["tasks"] = [t.name for t in tasks]
    path = Path(args.tuned_file) if args.tuned_file else out / "tuned.yaml"
    record = {"command": command_line(getattr(args, "argv", None)), "model": cfg.model,
              "selected_on": {"tasks": [t.name for t in tasks], "validation": {t.name: len(t.test) for t in tasks},
                              "train": {t.name: len(t.train) for t in tasks}, "fraction": args.val_fraction,
                              "seed": cfg.seed, "split": "carved from each task's train split; test never read"}}
    for method in methods:  # every kept candidate is checked before the first one trains
        check_kept_candidates(method, base, tasks, out)
    setup_logging(out, args.verbose)  # the inputs are good: the first thing written

    def chosen(method: str, result: dict[str, Any]) -> None:
        write_tuned(path, method, result, record)  # as each method ends: a killed tune keeps what it chose
        log.info("%s: chose %s (validation AP %.2f)", method, result["settings"], result["score"])

    if args.jobs == 1:
        for method in methods:
            chosen(method, tune_method(method, base, tasks, out, lrs=lrs, options=options, converge=args.converge))
    else:  # every method's search at once, each in a thread, their candidates sharing the worker processes
        from concurrent.futures import ThreadPoolExecutor, as_completed

        from petmix.parallel import WorkerPool

        errors = []
        # the workers close first on the way out (Ctrl-C: queued candidates cancelled), then the threads end
        with ThreadPoolExecutor(len(methods)) as threads, WorkerPool(args.jobs) as workers:
            searches = {threads.submit(tune_method, m, base, tasks, out, lrs=lrs, options=options, workers=workers,
                                      converge=args.converge): m
                        for m in methods}
            for search in as_completed(searches):
                try:
                    chosen(searches[search], search.result())
                except Exception as err:  # the other methods' searches go on; the first error is raised after
                    log.error("tune %s failed: %s", searches[search], err)
                    errors.append(err)
        if errors:
            raise errors[0]
    print(tuned_table(path))
    print(f"wrote {path}: use it with --tuned {path}")
    return 0


def cmd_sources_train(args: argparse.Namespace) -> int:
    import shutil

    from petmix.runs import check_run_folder, read_json, setup_logging
    from petmix.sources import SOURCE_METHOD, library_table, write_library
    from petmix.train import Trainer

    # source prompts are shallow prompt-tuning prompts (DESIGN.md section 2)
    cfg, out, tasks, _ = _prepare_run(args, "attempt-sources", method=SOURCE_METHOD)
    check_run_folder(out / "run")
    trainer = Trainer(cfg, tasks, out / "run")
    setup_logging(out, args.verbose)
    trainer.run()
    entries = []
    for task in tasks:
        src = out / "run" / "prompts" / f"{task.name}.safetensors"
        shutil.copyfile(src, out / src.name)
        shutil.copyfile(src.with_suffix(".json"), out / f"{task.name}.json")
        meta = read_json(out / f"{task.name}.json")
        entries.append({"file": src.name, **{k: meta.get(k) for k in ("task", "metric", "score", "length", "backbone",
                                                                          "backbone_path", "steps")}})
    write_library(out, entries)
    print(library_table(out))
    print(f"wrote {out / 'index.json'}: use it with --sources {out}")
    return 0


def cmd_sources_list(args: argparse.Namespace) -> int:
    from petmix.sources import library_table

    print(library_table(args.library))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from petmix.methods import METHODS, get_method

    if args.name:
        _describe_method(get_method(args.name))
        return 0
    width = max(len(n) for n in METHODS)
    for name, m in METHODS.items():
        extra = " [task id at test]" if m.task_id_at_test and not m.independent else ""
        extra += " [single-task]" if m.independent else ""
        print(f"{name:<{width}}  {m.summary}{extra}" + (f"  ({m.paper})" if m.paper else ""))
    return 0


def _describe_method(m: Any) -> None:
    """One method as its registration says it: blocks, router, task id, hooks' options."""
    import dataclasses

    print(f"{m.name}: {m.summary}" + (f"  ({m.paper})" if m.paper else ""))
    blocks = "a new block per task" if m.new_block_per_task else "one block trained on in sequence"
    print(f"  blocks: {m.block}, {blocks}" + (", one joint stage on all tasks" if m.joint else "")
          + (", each task from the same start (single-task)" if m.independent else ""))
    print(f"  router: {m.routing}" + (" (task id given at test)" if m.task_id_at_test else " (no task id at test)"))
    where = "its own tuned pick" if m.tuned_lr is not None else f"its kind's, {m.lr_kind()}"
    print(f"  default lr: {m.default_lr():g} ({where}, docs/tuned.md; --lr sets another, `petmix tune` picks one on train)")
    if m.block == "prompt":
        where = "its own tuned pick" if m.tuned_prompt_length is not None else "the common one"
        print(f"  default prompt length: {m.default_prompt_length()} ({where}, docs/tuned.md; --prompt-length sets another)")
    if m.needs_sources:
        print("  needs source prompts: --sources (see `petmix sources train`)")
    if m.options is None:
        print("  options: none of its own (the shared settings: `petmix train --help`)")
        return
    print("  options:")
    for f in dataclasses.fields(m.options):
        print(f"    --{f.name.replace('_', '-'):<28} {_flag_help(f).replace('%%', '%')}")


def cmd_report(args: argparse.Namespace) -> int:
    from petmix.report import load_results, render_report, write_heatmaps
    from petmix.runs import check_run_folder

    load_results(args.run)  # a missing, damaged or foreign results.json: exit 2 naming it
    check_run_folder(args.run)  # and every other file the report reads, before it writes its figures
    print(render_report(args.run))
    for path in write_heatmaps(args.run):
        print(f"wrote {path}")
    if args.html:
        from petmix.report_html import write_run_html

        print(f"wrote {write_run_html(args.run)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from petmix.api import load
    from petmix.data.task import Task
    from petmix.data.templates import TEMPLATES, format_prompt
    from petmix.report import load_results

    # Every input is checked before the model loads.
    results = load_results(args.run)
    inputs = list(args.input or [])
    if args.input_file is not None:
        path = Path(args.input_file)
        if not path.is_file():
            raise PetmixError(f"--input-file {args.input_file}: no such file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise PetmixError(f"--input-file {path}: not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise PetmixError(f"--input-file {path}: cannot read it ({err.strerror})") from None
        inputs += [line for line in text.splitlines() if line.strip()]
    if not inputs or not any(x.strip() for x in inputs):
        raise PetmixError("--input: give --input TEXT (repeatable) or --input-file FILE with non-empty lines")
    if args.template is not None and args.template not in TEMPLATES:
        raise PetmixError(f"--template: must be one of: {', '.join(TEMPLATES)}; got {args.template!r}")
    per_task = results.get("per_task") if isinstance(results.get("per_task"), dict) else {}
    if args.task is not None and args.task not in results["tasks"]:
        raise PetmixError(f"--task: {args.task!r} is not a task of this run ({', '.join(results['tasks'])})")
    if args.raw:
        prompts = inputs
    else:
        info = per_task.get(args.task) if args.task else next(iter(per_task.values()), {})
        info = info if isinstance(info, dict) else {}
        definition = args.definition if args.definition is not None else (info.get("definition", "") if args.task else "")
        template = args.template or info.get("template", "plain")
        if template not in TEMPLATES:
            template = "plain"
        shell = Task("input", str(definition), "rougeL", [], [], template)
        prompts = [format_prompt(shell, text) for text in inputs]
    model = load(args.run)
    answers = model.generate(prompts, task=args.task)
    for text, ans in zip(inputs, answers):
        print(f"input:  {_printable(text)}\noutput: {_printable(ans.text)}")
        if ans.router_weights:
            ranked = sorted(ans.router_weights.items(), key=lambda kv: -kv[1])
            print("router: " + ", ".join(f"{k} {v:.3f}" for k, v in ranked))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from petmix.peft_io import export_run
    from petmix.runs import check_run_folder

    if not Path(args.run).is_dir():
        raise PetmixError(f"{args.run}: no such run folder")
    check_run_folder(args.run)  # a damaged file: exit 2 naming it, before anything is written
    for path in export_run(args.run, args.to, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def _printable(text: str, limit: int = 300) -> str:
    """Text safe to echo on a terminal: control characters (escape codes) shown escaped, long text cut."""
    shown = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[:limit] + f"... ({len(text)} characters)"


def cmd_serve(args: argparse.Namespace) -> int:
    from petmix.runs import setup_logging
    from petmix.serve import serve

    setup_logging(None, args.verbose)
    serve(args.run, args.host, args.port, args.model_name, args.max_batch, args.max_wait_ms)
    return 0


def _add_train_flags(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    """Training settings: flags left out keep the config file's value (or the default)."""
    p.add_argument("--config", help="YAML file with the same keys as the flags (flags override it)")
    for flag, kwargs in train_flags():
        if with_method or flag != "--method":
            p.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petmix", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="zero-shot evaluation of a model on tasks; writes RUN/results.json")
    _add_data_args(p)
    _add_generation_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="learn a task stream with a method; writes the matrix, metrics and heatmaps")
    _add_train_flags(p)
    p.add_argument("--tuned", help="settings file written by `petmix tune`: the method's tuned lr and option "
                                   "(flags still win)")
    p.add_argument("--out", required=True, help="run directory (an existing one is resumed)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="run several methods on one stream; one table of AP, F.Ra, FWT, BWT")
    p.add_argument("--methods", required=True,
                   help="comma-separated entries: method, or label=method:key=value:... (e.g. no-arm=sapt-lora:kl_ratio=0)")
    _add_train_flags(p, with_method=False)
    p.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): each entry runs once per seed into "
                                   "OUT/<label>/seed-<s>; the table shows mean ± std and marks differences within noise")
    p.add_argument("--tuned", help="settings file written by `petmix tune` (each method's lr and option; "
                                   "an entry's own key=value still wins)")
    p.add_argument("--no-floors", action="store_true", help="leave out the majority-label and zero-shot floor rows")
    p.add_argument("--no-train", action="store_true", help="train nothing: tabulate the runs already finished in "
                                                           "OUT (the rest show as not yet run)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process with its "
                   "own copy of the model (default 1; on a GPU they share it, on a CPU they share the cores); "
                   "a seed's per-task-lora runs before the rest of that seed")
    p.add_argument("--out", required=True, help="comparison directory (one run directory per entry)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tune", help="choose each method's lr (and its most sensitive option) on a validation "
                                    "split carved from train; writes a file compare and train read")
    p.add_argument("--methods", required=True, help="comma-separated methods to tune")
    _add_train_flags(p, with_method=False)
    p.add_argument("--tune-tasks", type=int, default=2, help="the stream's first N tasks are tuned on (default 2)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each task's train split held out "
                                                                    "for validation (default 0.2)")
    p.add_argument("--val-max", type=int, default=100, help="at most this many validation examples per task")
    p.add_argument("--lr-grid", help="comma-separated learning rates (searched as given; default: a log-spaced grid per method kind, grown past a winning end)")
    p.add_argument("--option-grid", help="comma-separated values of the method's tuned option "
                                         f"({_tuned_options_help()})")
    p.add_argument("--converge", action="store_true",
                   help="after the one pass (the rate, then the option), move the option and then the rate to a "
                        "neighbouring value while one scores more than one validation answer better (the option "
                        "past a winning end of its grid too), until a pass moves neither (3 passes at most)")
    p.add_argument("--jobs", type=int, default=1, help="candidates trained at once, each in its own process "
                   "(default 1): every method is searched at once, its rounds (the rates, then its option's "
                   "values) filling the workers the other methods leave free")
    p.add_argument("--tuned-file", help="where to write the choices (default OUT/tuned.yaml; other methods' "
                                        "entries in it are kept)")
    p.add_argument("--out", required=True, help="tuning directory (one run per candidate, resumable)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("sources", help="source prompts for ATTEMPT and SPoT: train a library, list one")
    ssub = p.add_subparsers(dest="sources_command", required=True)
    q = ssub.add_parser("train", help="prompt-tune each source task; write DIR/<task>.safetensors and DIR/index.json")
    _add_train_flags(q, with_method=False)
    q.add_argument("--out", required=True, help="library folder (the training run goes to DIR/run, resumable)")
    q.set_defaults(func=cmd_sources_train)
    q = ssub.add_parser("list", help="the prompts of a library with their tasks and scores")
    q.add_argument("library")
    q.set_defaults(func=cmd_sources_list)

    p = sub.add_parser("methods", help="list the methods with what they do and their papers; "
                                       "`petmix methods NAME` shows one with its options")
    p.add_argument("name", nargs="?", help="a method to describe: what it adds, trains and routes, and its options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("report", help="print a run's matrix and metrics; write matrix.png and router.png")
    p.add_argument("run")
    p.add_argument("--html", action="store_true", help="also write RUN/report.html: one self-contained page")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="answer inputs with a trained run (automatic routing)")
    p.add_argument("run")
    p.add_argument("--input", action="append", help="an input (repeatable)")
    p.add_argument("--input-file", help="one input per line")
    p.add_argument("--definition", help="task definition to put in the prompt template")
    p.add_argument("--task", help="format as this task of the run (its definition); needed by task-id methods")
    p.add_argument("--template", help="superni, long or plain (default: the run's)")
    p.add_argument("--raw", action="store_true", help="inputs are complete prompts; no template")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a run's LoRA blocks as PEFT adapters (DIR/<task>/), its router and a model card")
    p.add_argument("run")
    p.add_argument("--to", required=True, help="folder to write (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --to folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="answer a trained run over an OpenAI-compatible HTTP API (/v1/completions, ...)")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests answered together")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="most time a free worker waits for a request still being read, to batch with it")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by compare and tune with their outputs
    try:
        return args.func(args)
    except PetmixError as err:
        print(f"petmix: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("petmix: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `petmix methods | head`: the reader left; no traceback, nothing more to write
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
