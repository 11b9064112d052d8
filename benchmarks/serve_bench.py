"""Throughput and latency of `petmix serve` against the same run's `petmix.load(RUN).generate` in a loop.

For each concurrency level (1, 4, 16) the same prompts (the run's test inputs, formatted as in its
evaluation) are answered two ways, interleaved round by round in one process:

- **loop**: ``model.generate([prompt])`` for one prompt after another (what a script does without a server);
- **serve**: ``concurrency`` client threads post ``/v1/completions`` to the server (in this process, on a
  free loopback port; keep-alive connections, stdlib client), which micro-batches what arrives together.

Reported: requests per second and p50/p99 latency per request (median over rounds), and whether every
served answer equals the loop's.

    python benchmarks/serve_bench.py RUN [--requests 32] [--rounds 3] [--concurrency 1,4,16] [--out FILE.md]
    python benchmarks/serve_bench.py --tiny DIR ...   # first train a tiny run (tests/tiny.py's model) into DIR
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn

from petmix.api import load
from petmix.data.task import Task
from petmix.data.templates import format_prompt
from petmix.runs import read_json
from petmix.serve import create_app


def run_prompts(run: Path, n: int) -> list[str]:
    """The run's test inputs as the model saw them in evaluation, task by task in turn."""
    results = read_json(run / "results.json")
    per_task = []
    for name in results["tasks"]:
        info = results["per_task"][name]
        shell = Task(name, info.get("definition", ""), info["metric"], [], [], info.get("template", "plain"))
        path = run / "predictions" / f"{name}.jsonl"
        inputs = [json.loads(x)["input"] for x in path.read_text(encoding="utf-8").splitlines() if x]
        per_task.append([format_prompt(shell, x) for x in inputs])
    mixed = [p for group in zip(*per_task) for p in group] or [p for g in per_task for p in g]
    return [mixed[i % len(mixed)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def loop_round(model, prompts: list[str]) -> tuple[float, list[float], list[str]]:
    lat, answers = [], []
    start = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        answers.append(model.generate([p])[0].text)
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - start, lat, answers


def serve_round(port: int, model_id: str, prompts: list[str], concurrency: int) -> tuple[float, list[float], list[str]]:
    local = threading.local()

    def ask(p: str) -> tuple[float, str]:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps({"model": model_id, "prompt": p})
        t = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(payload)
        return time.perf_counter() - t, payload["choices"][0]["text"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(ask, prompts))
    return time.perf_counter() - start, [o[0] for o in out], [o[1] for o in out]


def tiny_run(out: Path) -> Path:
    """A SAPT-LoRA run of three small tasks on the tiny random Llama of tests/tiny.py (seconds to train)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tiny_llama

    from petmix.data.task import Example
    from petmix.train import TrainConfig, Trainer

    if (out / "run" / "adapters.safetensors").is_file():
        return out / "run"
    model = build_tiny_llama(out / "model")
    tasks = []
    for t, w in enumerate(["yes", "no", "cat"]):
        ex = [Example(f"say {w} number {i} " + "x" * (i % 3), [w]) for i in range(20)]
        tasks.append(Task(f"task{t}", f"Answer {w}.", "exact_match", ex[:12], ex[12:], "plain"))
    cfg = TrainConfig(method="sapt-lora", model=str(model), epochs=1, batch_size=4, lr=5e-3, max_new_tokens=6,
                      replay_source="real")
    Trainer(cfg, tasks, out / "run").run()
    return out / "run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run (with --tiny: a folder to make the tiny run in)")
    ap.add_argument("--tiny", action="store_true", help="train a tiny run into RUN first (tests/tiny.py's model)")
    ap.add_argument("--requests", type=int, default=32, help="prompts per round and concurrency level")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = ap.parse_args()

    if args.tiny:
        args.run = tiny_run(args.run)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = run_prompts(args.run, args.requests)
    baseline = load(args.run)
    served = load(args.run)
    app = create_app(served, "bench", args.max_batch, args.max_wait_ms)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    serve_round(port, "bench", prompts[:2], 1)  # warm both paths once
    loop_round(baseline, prompts[:2])

    load_before = os.getloadavg()[0]
    rows, same = [], True
    for c in levels:
        stats: dict[str, list[tuple[float, float, float]]] = {"loop": [], "serve": []}
        for _ in range(args.rounds):  # interleaved: the machine's load drifts over both alike
            for kind in ("loop", "serve"):
                if kind == "loop":
                    wall, lat, answers = loop_round(baseline, prompts)
                    reference = answers
                else:
                    wall, lat, answers = serve_round(port, "bench", prompts, c)
                    same &= answers == reference
                stats[kind].append((len(prompts) / wall, percentile(lat, 50), percentile(lat, 99)))
        for kind in ("loop", "serve"):
            rps, p50, p99 = (statistics.median(x[k] for x in stats[kind]) for k in range(3))
            rows.append((c, kind, rps, p50 * 1000, p99 * 1000))
        print(f"concurrency {c}: loop {rows[-2][2]:.2f} req/s, serve {rows[-1][2]:.2f} req/s", flush=True)
    server.should_exit = True
    thread.join(timeout=30)

    model = baseline.backbone.describe()
    lines = [f"run `{args.run}` ({baseline.method.name}, {model['name']}, {model['parameters']:,} parameters), "
             f"{len(prompts)} requests per round, {args.rounds} rounds (median), max_tokens "
             f"{baseline.config['max_new_tokens']}, max_batch {args.max_batch}, max_wait {args.max_wait_ms} ms; "
             f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {load_before:.1f} at the "
             f"start and {os.getloadavg()[0]:.1f} at the end",
             "", "| concurrency | path | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {kind} | {rps:.2f} | {p50:.0f} | {p99:.0f} |" for c, kind, rps, p50, p99 in rows]
    lines += ["", f"served answers identical to the loop's: {'yes' if same else 'NO'}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
