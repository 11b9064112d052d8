"""petmix against PEFT, side by side in one process, on the same batches (issue 13).

(a) a training step (forward, backward, AdamW), fp32 and bf16 autocast: PEFT LoRA r 4 on q/v with one
    adapter against petmix sapt-lora with 15 blocks in the pool (the last one training, as at task 15),
    on a fixed batch (8 x 256 tokens, loss on the last 16) and on real training batches (the first batch
    of each task of a stream, made as petmix's trainer makes them);
(b) greedy generation of the same prompts: petmix routed over 15 blocks, PEFT with one adapter, and PEFT
    with a batch mixing the 15 adapters through ``adapter_names``; the answers are checked where the
    weights are the same (petmix routed to one block = PEFT with that adapter, per input);
(c) the petmix step with 1, 15, 50 and 100 blocks in the pool.

"petmix (plain)" is petmix with its fast paths off (logits at every position, every block concatenated
at each call): what the levers gained. Variants run interleaved, one step each per repetition; the tables
give medians and ratios. Usage:

    python benchmarks/vs_peft.py [--parts a,b,c] [--reps 3] [--config benchmarks/configs/superni5_cpu.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from petmix.backbone import Backbone, load_backbone
from petmix.blocks.lora import LoRAConfig, PooledLoRALinear
from petmix.data.collate import encode_answers, encode_prompts, prompt_batch, training_batch
from petmix.data.loaders import load_tasks
from petmix.data.templates import format_prompt
from petmix.methods import get_method
from petmix.mixture import Mixture
from petmix.train import _stage_order

R, ALPHA = 4, 32.0


def set_fast(on: bool) -> None:
    Mixture.label_only_head = on
    PooledLoRALinear.fused = on


# ---- models ------------------------------------------------------------------------------------
def petmix_pool(model: str, blocks: int, seed: int = 0) -> tuple[Mixture, torch.optim.Optimizer]:
    """sapt-lora at task ``blocks``: the newest block, its key and the router train."""
    torch.manual_seed(seed)
    mix = Mixture(load_backbone(model), LoRAConfig(r=R, alpha=ALPHA), "attention")
    method = get_method("sapt-lora")
    for t in range(blocks):
        trainable = method.begin_task(mix, t)
    randomise_blocks(mix, seed)
    mix.train()
    return mix, torch.optim.AdamW(trainable, lr=1e-4)


def randomise_blocks(mix: Mixture, seed: int) -> None:
    """Give every block's B values (it starts at zero), so that each block changes the answers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mix.pool.layers.values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def peft_model(model: str, adapters: int = 1, mix: Mixture | None = None):
    """PEFT LoRA r 4 on q/v; with ``mix``, adapter i holds petmix block i's weights."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    pm = get_peft_model(load_backbone(model).model, cfg, adapter_name="t0")
    for i in range(1, adapters):
        pm.add_adapter(f"t{i}", cfg)
    if mix is not None:
        with torch.no_grad():
            for name, layer in mix.pool.layers.items():
                target = pm.base_model.model.get_submodule(name)
                for i in range(adapters):
                    target.lora_A[f"t{i}"].weight.copy_(layer.lora_A[i])
                    target.lora_B[f"t{i}"].weight.copy_(layer.lora_B[i])
    pm.set_adapter("t0")
    return pm


# ---- batches -----------------------------------------------------------------------------------
def fixed_batch(vocab: int, shape: str = "8x256", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, tuple(int(x) for x in shape.split("x")), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -16:] = ids[:, -16:]
    source = torch.ones_like(ids)
    source[:, -16:] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "source_mask": source}


def stream(config: str, data: str | None) -> tuple[dict[str, Any], list]:
    cfg = yaml.safe_load(Path(config).read_text())
    data = data or str((Path(config).parent / cfg["data"]).resolve())
    if not Path(data).is_dir():  # configs name ../shared/data relative to the repo root
        data = str(Path(cfg["data"]).resolve())
    if not Path(data).is_dir():
        raise SystemExit(f"{config}: data dir {cfg['data']} not found; pass --data")
    tasks = load_tasks(cfg["tasks"], data, max_train=cfg["max_train"], max_test=cfg["max_test"], seed=0)
    return cfg, tasks


def real_batches(backbone: Backbone, cfg: dict[str, Any], tasks: list) -> list[dict[str, torch.Tensor]]:
    """The first training batch of each task, as the trainer makes it (same order, encoding, padding)."""
    tok, out = backbone.tokenizer, []
    for stage, task in enumerate(tasks):
        train, _ = task.heldout_split(cfg.get("heldout_fraction", 0.1), 0, cfg.get("heldout_max", 32))
        idx = _stage_order(len(train), 0, stage, 0)[: cfg["batch_size"]]
        prompts = encode_prompts(tok, [backbone.render(format_prompt(task, train[i].input)) for i in idx],
                                 cfg["max_source_len"])
        answers = encode_answers(tok, [train[i].outputs[0] for i in idx], cfg["max_target_len"])
        out.append(training_batch(tok, prompts, answers, False))
    return out


# ---- timing ------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """One warm-up call each, then ``reps`` rounds calling every variant once per round. The order rotates
    each round: the first call after another model's step can pay extra (memory the other freed is faulted in again), and that
    cost must not always fall on the same variant."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[k]
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
            print(f"  {k}: {times[k][-1]:.2f} s", flush=True)  # progress on a slow machine
    return times


def train_step(forward: Callable[[dict], torch.Tensor], opt: torch.optim.Optimizer, batches: list[dict],
               bf16: bool, fast: bool | None = None) -> Callable[[], None]:
    def step() -> None:
        if fast is not None:
            set_fast(fast)
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = forward(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        set_fast(True)

    return step


def peft_forward(pm) -> Callable[[dict], torch.Tensor]:
    return lambda b: pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss


def mix_forward(mix: Mixture) -> Callable[[dict], torch.Tensor]:
    return lambda b: mix(b).loss


def table(title: str, times: dict[str, list[float]], base: str) -> list[str]:
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"{title}", "", f"| variant | median (s) | ratio to {base} | runs (s) |", "|---|---|---|---|"]
    for k, m in med.items():
        runs = ", ".join(f"{t:.2f}" for t in times[k])
        lines.append(f"| {k} | {m:.3f} | {m / med[base]:.2f}x | {runs} |")
    return lines + [""]


# ---- parts -------------------------------------------------------------------------------------
def part_a(args, report: list[str], results: dict) -> None:
    mix, opt = petmix_pool(args.model, 15)
    pm = peft_model(args.model)
    popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    vocab = mix.model.config.vocab_size
    sets = {f"fixed {args.fixed}, loss on last 16": [fixed_batch(vocab, args.fixed)]} if "fixed" in args.sets else {}
    if "real" in args.sets:
        cfg, tasks = stream(args.config, args.data)
        batches = real_batches(mix.backbone, cfg, tasks[: args.real_tasks])
        shape = ", ".join(f"{b['input_ids'].shape[0]}x{b['input_ids'].shape[1]}" for b in batches)
        labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
        cells = sum(b["labels"].numel() for b in batches)
        sets[f"real: first batch of each of {len(batches)} tasks ({shape}; {labelled}/{cells} positions labelled)"] = batches
    for name, batches in sets.items():
        for bf16 in [p == "bf16" for p in args.precisions.split(",")]:
            fns = {"PEFT LoRA, 1 adapter": train_step(peft_forward(pm), popt, batches, bf16),
                   "petmix sapt-lora, 15 blocks": train_step(mix_forward(mix), opt, batches, bf16, True)}
            if args.plain:
                fns["petmix sapt-lora, 15 blocks (plain)"] = train_step(mix_forward(mix), opt, batches, bf16, False)
            times = interleaved(fns, args.reps)
            title = f"(a) training step, {name}, {'bf16 autocast' if bf16 else 'fp32'}"
            report += table(title, times, "PEFT LoRA, 1 adapter")
            results[title] = times
            print("\n".join(report[-(len(fns) + 5):]), flush=True)


def part_b(args, report: list[str], results: dict) -> None:
    cfg, tasks = stream(args.config, args.data)
    mix, _ = petmix_pool(args.model, 15)
    mix.eval()
    pm = peft_model(args.model, 15, mix)
    pm.eval()
    tok, backbone = mix.backbone.tokenizer, mix.backbone
    prompts = [format_prompt(t, ex.input) for ex_i in range(args.gen_per_task) for t in tasks
               for ex in [t.test[ex_i]] if ex_i < len(t.test)]
    ids = encode_prompts(tok, [backbone.render(p) for p in prompts], cfg["max_source_len"])
    ids = sorted(ids, key=len, reverse=True)  # as evaluate.generate batches them
    batches = [prompt_batch(tok, ids[i:i + args.gen_batch], left=True) for i in range(0, len(ids), args.gen_batch)]
    new = cfg["max_new_tokens"]
    owner = [[(i + j) % 15 for j in range(len(b["input_ids"]))] for i, b in enumerate(batches)]

    def gen(model, batch, names=None, length=None, **kw):
        extra = {"adapter_names": names} if names is not None else {}
        return model.generate(input_ids=kw.get("input_ids", batch["input_ids"]),
                              attention_mask=kw.get("attention_mask", batch["attention_mask"]),
                              max_new_tokens=new, min_new_tokens=length or 0, do_sample=False, num_beams=1,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)

    def petmix_gen(weights_of=None, length=None):
        outs = []
        for i, b in enumerate(batches):
            w = mix.weights_for(b["input_ids"], b["source_mask"]) if weights_of is None else weights_of(i, b)
            kwargs = mix.pool.model_inputs(b, w)
            try:
                outs.append(gen(mix.model, b, length=length, **kwargs))
            finally:
                mix.clear_weights()
        return outs

    def one_hot(i, b):
        return torch.nn.functional.one_hot(torch.tensor(owner[i]), 15).float()

    def peft_gen(mixed: bool, length=None):
        return [gen(pm, b, names=[f"t{k}" for k in owner[i]] if mixed else None, length=length)
                for i, b in enumerate(batches)]

    def texts(outs):
        return [tok.decode(r[b["input_ids"].shape[1]:], skip_special_tokens=True) for o, b in zip(outs, batches) for r in o]

    with torch.no_grad():
        # Same weights, same answers: petmix routed to block k of each input = PEFT with adapter k, mixed batch.
        same_pm, same_peft = texts(petmix_gen(one_hot)), texts(peft_gen(True))
        agree = sum(a == b for a, b in zip(same_pm, same_peft))
        only0 = lambda i, b: torch.nn.functional.one_hot(torch.zeros(len(b["input_ids"]), dtype=torch.long), 15).float()  # noqa: E731
        agree0 = sum(a == b for a, b in zip(texts(petmix_gen(only0)), texts(peft_gen(False))))
        set_fast(False)
        plain = texts(petmix_gen())
        set_fast(True)
        routed = texts(petmix_gen())
        report += [f"(b) greedy generation: {len(prompts)} test prompts of {len(tasks)} tasks, batches of "
                   f"{args.gen_batch}, {new} new tokens (forced, so every variant decodes the same length)", "",
                   f"- same weights, same answers: petmix routed one-hot to each input's block = PEFT mixed batch "
                   f"(adapter_names): {agree}/{len(prompts)}; petmix one-hot block 0 = PEFT adapter t0: "
                   f"{agree0}/{len(prompts)}; petmix routed fast path = plain path: "
                   f"{sum(a == b for a, b in zip(plain, routed))}/{len(prompts)}",
                   f"- distinct answers among the mixed-batch answers: {len(set(same_peft))} (blocks matter)", ""]
        print("\n".join(report[-5:]), flush=True)
        fns = {"PEFT LoRA, 1 adapter": lambda: peft_gen(False, new),
               "PEFT, batch mixing 15 adapters (adapter_names)": lambda: peft_gen(True, new),
               "petmix routed over 15 blocks": lambda: petmix_gen(None, new)}
        if args.plain:
            fns["petmix routed over 15 blocks (plain)"] = lambda: (set_fast(False), petmix_gen(None, new), set_fast(True))
        times = interleaved(fns, args.reps)
    title = "(b) generation time (all batches)"
    report += table(title, times, "PEFT LoRA, 1 adapter")
    results[title] = times
    results["answers_agree"] = {"onehot_vs_peft_mixed": agree, "block0_vs_peft_t0": agree0, "n": len(prompts)}
    print("\n".join(report[-(len(fns) + 5):]), flush=True)


def part_c(args, report: list[str], results: dict) -> None:
    counts = [int(x) for x in args.blocks.split(",")]
    pools = {n: petmix_pool(args.model, n) for n in counts}
    batch = fixed_batch(next(iter(pools.values()))[0].model.config.vocab_size, args.fixed)
    for bf16 in [p == "bf16" for p in args.precisions.split(",")]:
        fns = {f"{n} blocks": train_step(mix_forward(m), o, [batch], bf16, True) for n, (m, o) in pools.items()}
        times = interleaved(fns, args.reps)
        title = f"(c) petmix sapt-lora step by pool size, fixed {args.fixed}, {'bf16 autocast' if bf16 else 'fp32'}"
        report += table(title, times, f"{counts[0]} blocks")
        results[title] = times
        print("\n".join(report[-(len(fns) + 5):]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default="benchmarks/configs/superni5_cpu.yaml", help="stream for real batches")
    ap.add_argument("--data", default=None, help="data dir (default: the config's)")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sets", default="fixed,real", help="(a): the fixed batch, the real batches, or both")
    ap.add_argument("--fixed", default="8x256", help="the fixed batch, rows x tokens (loss on the last 16)")
    ap.add_argument("--real-tasks", type=int, default=5, help="(a): real batches from the first N tasks")
    ap.add_argument("--precisions", default="fp32,bf16", help="(a) and (c)")
    ap.add_argument("--plain", action="store_true", help="also time petmix with its fast paths off")
    ap.add_argument("--blocks", default="1,15,50,100")
    ap.add_argument("--gen-per-task", type=int, default=4)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/vs_peft.json")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    header = (f"model {args.model}; torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}; load average at start {os.getloadavg()[0]:.1f}; "
              f"median of {args.reps} interleaved repetitions after one warm-up each")
    print(header, flush=True)
    report: list[str] = [header, ""]
    results: dict[str, Any] = {"args": vars(args)}
    start = time.time()
    for part in args.parts.split(","):
        {"a": part_a, "b": part_b, "c": part_c}[part](args, report, results)
    report.append(f"wall {time.time() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f}")
    print(report[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else {}
    old.update({f"parts {args.parts}": {"results": results, "report": report}})
    out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
