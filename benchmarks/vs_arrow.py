"""petmix's router against PEFT's Arrow over the same library of per-task LoRA adapters, no task id.

1. Train one LoRA per task on the stream, same settings for all (method ``lora``: every task from the
   same start), and export them as PEFT adapters (``petmix export``).
2. petmix's router over those adapters: a ``sapt-lora`` run that imports them as frozen blocks
   (``import_adapters``) and trains only the router, on ``--import-examples`` train examples per task.
3. On the same test inputs, with no task id: petmix's router, PEFT's Arrow (``create_arrow_model``,
   top_k 1, 2, 3), the oracle (each input's own adapter, at weight 1) and the uniform mixture (every
   adapter at weight 1/n). Reports AP (mean task score), routing accuracy (share of a task's inputs
   whose largest weight is its own adapter; for Arrow: whose own adapter wins the most per-token,
   per-layer top-1 votes over the prompt) and generation time (seconds for all test inputs).

Also checks, on the benchmark's model, that PEFT's logits with one exported adapter equal petmix's
with that block at weight 1. Training runs are resumable; their in-run evaluations use 2 test examples
per task (the comparison evaluates everything itself). Other seeds (training sample, initialisation,
data order; the same test examples) with ``--set seed=S --set test_seed=0``, then ``--combine`` for the
mean ± std table. Usage:

    .venv/bin/python benchmarks/vs_arrow.py --config benchmarks/configs/superni5_cpu.yaml \\
        --data ../shared/data/CL_Benchmark --max-test 100 --out runs/bench/vs_arrow/superni5
    .venv/bin/python benchmarks/vs_arrow.py --config benchmarks/configs/long4_cpu.yaml \\
        --data ../shared/data/CL_Benchmark --max-test 100 --out runs/bench/vs_arrow/long4
    .venv/bin/python benchmarks/vs_arrow.py --combine runs/bench/vs_arrow/long4 runs/bench/vs_arrow/long4-seed1 \
        runs/bench/vs_arrow/long4-seed2 --out runs/bench/vs_arrow/long4-seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from petmix.api import load
from petmix.backbone import Backbone, load_backbone
from petmix.data.collate import encode_prompts, prompt_batch
from petmix.data.loaders import load_tasks
from petmix.data.streams import resolve_stream
from petmix.data.task import Task
from petmix.evaluate import GenerationConfig, evaluate_tasks
from petmix.peft_io import export_run
from petmix.runs import setup_logging, write_json
from petmix.train import TrainConfig, Trainer

log = logging.getLogger("vs_arrow")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    values = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    values = {k.replace("-", "_"): v for k, v in (values or {}).items()}
    for key in ("data", "max_train", "max_test", "model", "epochs"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values.setdefault("lr", 1e-3)  # the measured tables' rate (before sapt-lora had its own default); --set lr=X
    for item in args.set or []:
        key, _, value = item.partition("=")
        values[key.replace("-", "_")] = yaml.safe_load(value)
    return values


def train_run(values: dict[str, Any], tasks: list[Task], out: Path, **overrides: Any) -> Path:
    cfg = TrainConfig.from_dict({**values, **overrides}, "vs_arrow")
    short = [dataclasses.replace(t, test=t.test[:2]) for t in tasks]  # in-run evaluation: a smoke check only
    if not (out / "results.json").is_file() or len(json.loads((out / "stages.json").read_text())) < len(tasks):
        Trainer(cfg, short, out).run()
    return out


def timed(backbone: Backbone, tasks: list[Task], gen: GenerationConfig, prepare, bf16: bool, label: str):
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        results = evaluate_tasks(backbone, tasks, gen, prepare, desc=label)
    return results, time.perf_counter() - started


def fixed_weights(mix, rows: torch.Tensor | None = None, uniform: bool = False):
    """A prepare hook that gives every input the same weights (uniform), or the one-hot row of its task."""

    def prepare(batch):
        b, n = batch["input_ids"].shape[0], mix.num_blocks
        if uniform:
            w = torch.full((b, n), 1.0 / n, device=batch["input_ids"].device)
        else:
            w = rows.expand(b, n).to(batch["input_ids"].device)
        return mix.pool.model_inputs(batch, w), w

    return prepare


class ArrowVotes:
    """Per-input top-1 votes of Arrow's routers over the prompt tokens, summed over layers and modules."""

    def __init__(self, model: torch.nn.Module, n: int):
        self.n, self.mask, self.votes = n, None, None
        for module in model.modules():
            if type(module).__name__ == "ArrowLoraLinearLayer":
                module.register_forward_hook(self.hook)

    def prepare(self, batch):
        self.mask = batch["attention_mask"]
        self.votes = torch.zeros(batch["input_ids"].shape[0], self.n)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, None

    def hook(self, module, inputs, output):
        x = inputs[0]
        if self.mask is None or x.dim() != 3 or x.shape[1] != self.mask.shape[1]:
            return  # a decoding step: only the prompt pass votes
        sim = (x.float() @ module.prototypes.float().t()).abs()  # as Arrow scores: |<token, prototype>|
        top = sim.argmax(-1)  # [B, S]
        onehot = torch.nn.functional.one_hot(top, self.n).float() * self.mask.unsqueeze(-1).float()
        self.votes += onehot.sum(1).cpu()


def routing_accuracy(results: dict[str, dict[str, Any]], names: list[str]) -> float | None:
    hits, total = 0, 0
    for j, name in enumerate(names):
        for rec in results[name]["records"]:
            w = rec.get("router_weights")
            if not w:
                return None
            hits += int(max(range(len(w)), key=w.__getitem__) == j)
            total += 1
    return 100.0 * hits / max(total, 1)


def logits_check(model_name: str, exported: Path, run: Path, task: str, index: int, tasks: list[Task]) -> float:
    """Largest |PEFT - petmix| logit with one adapter at weight 1, on a few test prompts."""
    from peft import PeftModel

    from petmix.data.templates import format_prompt

    mine = load(run)
    tok = mine.backbone.tokenizer
    prompts = [format_prompt(t, ex.input) for t in tasks for ex in t.test[:2]]
    batch = prompt_batch(tok, encode_prompts(tok, prompts, 256), left=True)
    w = torch.zeros(len(prompts), mine.mix.num_blocks)
    w[:, index] = 1.0
    with torch.no_grad():
        ours = mine.backbone.model(**mine.mix.pool.model_inputs(batch, w)).logits
        mine.mix.clear_weights()
        peft_model = PeftModel.from_pretrained(load_backbone(model_name).model, str(exported / task))
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    return float((ours - theirs).abs()[keep].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a petmix training YAML (benchmarks/configs/...)")
    parser.add_argument("--data")
    parser.add_argument("--model")
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--max-test", type=int, help="test examples per task (>= 100 for the reported tables)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--import-examples", type=int, default=32, help="train examples per task for the router")
    parser.add_argument("--top-k", default="1,2,3", help="Arrow's top_k values")
    parser.add_argument("--set", action="append", help="key=value for both training runs (repeatable)")
    parser.add_argument("--router-set", action="append", default=[],
                        help="key=value for the router run only (default: petmix's defaults: prototype router, feature reflection)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--combine", nargs="+", metavar="RUN",
                        help="no training: the mean ± std table over finished runs of other seeds (their vs_arrow.json), "
                             "written to --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.combine:
        table = combine([Path(r) for r in args.combine])
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table, encoding="utf-8")
        print(table)
        return
    setup_logging(out)
    values = settings(args)
    specs = values.get("tasks") or resolve_stream(values.get("stream") or "default")
    tasks = load_tasks(specs, values.get("data"), max_train=values.get("max_train"), max_test=values.get("max_test"),
                       seed=values.get("seed", 0), test_seed=values.get("test_seed"))
    names = [t.name for t in tasks]
    values = {**values, "tasks": names, "stream": None}
    bf16 = bool(values.get("bf16"))

    # 1. one LoRA per task, same settings; exported as PEFT adapters
    per_task = train_run(values, tasks, out / "per-task", method="lora")
    adapters = out / "adapters"
    export_run(per_task, adapters, overwrite=True)
    # 2. petmix's router over the imported adapters (only the router trains)
    router_values: dict[str, object] = {}
    for item in args.router_set:
        key, _, value = item.partition("=")
        router_values[key.replace("-", "_")] = yaml.safe_load(value)
    routed = train_run(values, tasks, out / "router", method="sapt-lora", import_examples=args.import_examples,
                       import_adapters=[f"{n}={adapters / n}" for n in names], **router_values)

    model_name = values.get("model") or "smollm2-135m"
    diff = logits_check(model_name, adapters, routed, names[0], 0, tasks)
    log.info("PEFT vs petmix logits, adapter %s at weight 1: max |diff| %.3g", names[0], diff)

    gen = GenerationConfig(values.get("max_new_tokens", 50), values.get("eval_batch_size", 16),
                           values.get("max_source_len", 512), values.get("chat", False))
    mine = load(routed)
    rows: list[dict[str, Any]] = []

    def record(label: str, results: dict[str, dict[str, Any]], seconds: float, acc: float | None) -> None:
        scores = {n: results[n]["score"] for n in names}
        rows.append({"method": label, "AP": round(sum(scores.values()) / len(scores), 2),
                     "routing_acc": None if acc is None else round(acc, 1), "gen_s": round(seconds, 1),
                     "scores": scores})
        log.info("%s: AP %.2f, routing %s, %.1f s", label, rows[-1]["AP"], acc, seconds)

    results, secs = timed(mine.backbone, tasks, gen, mine.mix.prepare_fn(), bf16, "petmix router")
    record("petmix router (imported blocks)", results, secs, routing_accuracy(results, names))
    oracle: dict[str, dict[str, Any]] = {}
    secs = 0.0
    for j, task in enumerate(tasks):
        row = torch.zeros(1, len(names))
        row[0, j] = 1.0
        res, s = timed(mine.backbone, [task], gen, fixed_weights(mine.mix, row), bf16, f"oracle {task.name}")
        oracle.update(res)
        secs += s
    record("oracle (own adapter)", oracle, secs, 100.0)
    results, secs = timed(mine.backbone, tasks, gen, fixed_weights(mine.mix, uniform=True), bf16, "uniform")
    record("uniform mixture (1/n)", results, secs, None)
    mine.mix.clear_weights()

    from peft import ArrowConfig, create_arrow_model

    arrow_acc = None
    for k in [int(x) for x in args.top_k.split(",")]:
        if k > len(names):
            continue
        base = load_backbone(model_name)
        model = create_arrow_model(base.model, [str(adapters / n) for n in names], ArrowConfig(top_k=k, rng_seed=0))
        model.eval()
        arrow = Backbone(model=model, tokenizer=base.tokenizer, family=base.family, name=base.name, path=base.path)
        results, secs = timed(arrow, tasks, gen, None, bf16, f"arrow top_k={k}")
        if arrow_acc is None:  # top-1 votes do not depend on top_k: measured once, hooks off while timing
            arrow_acc = arrow_routing_accuracy(arrow, tasks, gen, ArrowVotes(model, len(names)), bf16)
        record(f"PEFT Arrow top_k={k}", results, secs, arrow_acc)
        del model, arrow, base

    n_test = {n: len(t.test) for n, t in zip(names, tasks)}
    payload = {"tasks": names, "n_test": n_test, "import_examples": args.import_examples, "router_settings": router_values,
               "logits_max_abs_diff": diff, "rows": rows, "settings": {k: v for k, v in values.items() if k != "tasks"}}
    write_json(out / "vs_arrow.json", payload)
    table = render(payload)
    (out / "table.md").write_text(table, encoding="utf-8")
    print(table)


def arrow_routing_accuracy(arrow: Backbone, tasks: list[Task], gen: GenerationConfig, votes: ArrowVotes,
                           bf16: bool) -> float:
    """Arrow's routing accuracy: one prompt-only forward per batch (no generation), votes read after it."""
    from petmix.data.templates import format_prompt

    tok = arrow.tokenizer
    hits = total = 0
    for j, task in enumerate(tasks):
        ids = encode_prompts(tok, [format_prompt(task, ex.input) for ex in task.test], gen.max_source_len)
        for start in range(0, len(ids), gen.batch_size):
            batch = prompt_batch(tok, ids[start:start + gen.batch_size], left=not arrow.is_seq2seq)
            kwargs, _ = votes.prepare(batch)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if arrow.is_seq2seq:
                    arrow.model.get_encoder()(**kwargs)  # Arrow on the encoder only: seq2seq votes are partial
                else:
                    arrow.model(**kwargs)
            hits += int((votes.votes.argmax(-1) == j).sum())
            total += votes.votes.shape[0]
    votes.mask = None
    return 100.0 * hits / max(total, 1)


def combine(runs: list[Path]) -> str:
    """Mean ± sample std over seeds of one comparison (same tasks and test examples), row by row."""
    from petmix.stats import Summary

    for r in runs:
        if not (r / "vs_arrow.json").is_file():
            raise SystemExit(f"{r}: no vs_arrow.json (not a finished vs_arrow.py run)")
    payloads = [json.loads((r / "vs_arrow.json").read_text(encoding="utf-8")) for r in runs]
    first = payloads[0]

    def test_seed(p: dict[str, Any]) -> int:  # as load_tasks draws it: the seed unless test_seed is set
        given = p["settings"].get("test_seed")
        return p["settings"].get("seed", 0) if given is None else given

    for r, p in zip(runs, payloads):
        if p["tasks"] != first["tasks"] or p["n_test"] != first["n_test"] or test_seed(p) != test_seed(first):
            raise SystemExit(f"{r}: other tasks or test examples than {runs[0]}; cannot combine")
    names = first["tasks"]
    seeds = [p["settings"].get("seed", 0) for p in payloads]
    lines = [f"Tasks: {', '.join(names)}; test examples per task: {', '.join(str(first['n_test'][n]) for n in names)} "
             f"(the same for every seed); seeds {', '.join(map(str, seeds))}; router trained on "
             f"{first['import_examples']} train examples per task; PEFT vs petmix logits (one adapter, weight 1): "
             f"max |diff| {max(p['logits_max_abs_diff'] for p in payloads):.2g}; mean ± sample std (n - 1) over seeds", "",
             "| method | AP | routing acc. | gen. time (s) | " + " | ".join(names) + " |", "|---" * (4 + len(names)) + "|"]
    for i, row in enumerate(first["rows"]):
        rows = [p["rows"][i] for p in payloads]
        if any(r["method"] != row["method"] for r in rows):
            raise SystemExit(f"row {i}: methods differ between runs ({[r['method'] for r in rows]})")
        cells = [Summary.of([r["AP"] for r in rows]).cell(), Summary.of([r["routing_acc"] for r in rows]).cell(1),
                 Summary.of([r["gen_s"] for r in rows]).cell(1)]
        cells += [Summary.of([r["scores"][n] for r in rows]).cell() for n in names]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(payload: dict[str, Any]) -> str:
    names = payload["tasks"]
    lines = [f"Tasks: {', '.join(names)}; test examples per task: "
             f"{', '.join(str(payload['n_test'][n]) for n in names)}; router trained on "
             f"{payload['import_examples']} train examples per task; PEFT vs petmix logits (one adapter, weight 1): "
             f"max |diff| {payload['logits_max_abs_diff']:.2g}", "",
             "| method | AP | routing acc. | gen. time (s) | " + " | ".join(names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for r in payload["rows"]:
        acc = "-" if r["routing_acc"] is None else f"{r['routing_acc']:.1f}"
        lines.append(f"| {r['method']} | {r['AP']:.2f} | {acc} | {r['gen_s']:.1f} | "
                     + " | ".join(f"{r['scores'][n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
