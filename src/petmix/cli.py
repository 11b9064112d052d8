"""The ``petmix`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from petmix.errors import PetmixError

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


def cmd_eval(args: argparse.Namespace) -> int:
    from petmix.backbone import DEFAULT_MODEL, load_backbone
    from petmix.data.loaders import load_tasks
    from petmix.evaluate import GenerationConfig, evaluate_tasks
    from petmix.runs import results_payload, setup_logging, write_json, write_jsonl

    out = Path(args.out)
    setup_logging(out, args.verbose)
    started = time.time()
    tasks = load_tasks(_task_specs(args), args.data, max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    backbone = load_backbone(args.model or DEFAULT_MODEL, dtype=args.dtype)
    log.info("model %s", backbone.describe())
    write_json(out / "config.json", {"command": "eval", **vars(args), "model": backbone.name,
                                     "tasks": [t.name for t in tasks]})
    cfg = GenerationConfig(args.max_new_tokens, args.batch_size, args.max_source_len, args.chat)
    results = evaluate_tasks(backbone, tasks, cfg, desc="zero-shot")
    for task in tasks:
        write_jsonl(out / "predictions" / f"{task.name}.jsonl", results[task.name]["records"])
    names = [t.name for t in tasks]
    per_task: dict[str, Any] = {
        t.name: {"metric": t.metric, "score": results[t.name]["score"], "n_test": results[t.name]["n"],
                 "benchmark": t.benchmark, "source": t.source, "notes": t.notes}
        for t in tasks
    }
    payload = results_payload(names, [[results[n]["score"] for n in names]], per_task,
                              model=backbone.describe(), elapsed_s=round(time.time() - started, 1),
                              stage_names=["zero-shot"])
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petmix", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="zero-shot evaluation of a model on tasks; writes RUN/results.json")
    _add_data_args(p)
    _add_generation_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PetmixError as err:
        print(f"petmix: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("petmix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
