"""Does a router feature that also pools the input alone hold up when the definition is left out? (issue 12)

The harder check of docs/results.md: keys placed from training prompts with definitions, test prompts
without. Before any training, on the frozen embeddings (the router's feature): 32 training inputs per task
for each key, up to 100 test inputs per task, nearest key after centring (the prototype preset's rule).
Three queries: A the max-pooled whole prompt (petmix's router today); B A concatenated with the max-pooled
prompt without its definition; C the prompt without its definition only. Usage:

    PYTHONPATH=src .venv/bin/python benchmarks/router_two_part.py [DATA]   (default ../shared/data/CL_Benchmark)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import router_features as R  # noqa: E402

from petmix.backbone import load_backbone  # noqa: E402
from petmix.data.loaders import load_tasks  # noqa: E402

Query = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (whole prompt, prompt without definition)


def ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


QUERIES: dict[str, Query] = {
    "A whole prompt (today)": lambda whole, inp: ln(whole),
    "B whole + input": lambda whole, inp: torch.cat([ln(whole), ln(inp)], -1),
    "C input only": lambda whole, inp: ln(inp),
}


def accuracy(feats: dict[int, dict[str, torch.Tensor]], query: Query, test_definition: bool) -> list[float]:
    keys = torch.stack([query(f["train"], f["train_inp"]).mean(0) for f in feats.values()])
    centre = keys.mean(0)
    keys = F.normalize(keys - centre, dim=-1)
    out = []
    for j, f in feats.items():
        q = query(f["test"] if test_definition else f["test_inp"], f["test_inp"])
        out.append((F.normalize(q - centre, dim=-1) @ keys.t()).argmax(-1).eq(j).float().mean().item() * 100)
    return out


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/CL_Benchmark"
    backbone = load_backbone("smollm2-135m")
    router = R.make_shared_router("prototype", backbone.hidden_size)
    print("| stream | query | routing %, test prompts with definitions | without definitions | without, per task |")
    print("|---|---|---|---|---|")
    for name, names in R.STREAMS.items():
        where = {} if "BIG-bench" in name else {"data_dir": data}
        tasks = load_tasks(names, max_train=64, max_test=100, seed=0, **where)
        feats = {j: {key: R.features(backbone, router, t, ex, definition, 256) for key, ex, definition in
                     [("train", t.train[:32], True), ("train_inp", t.train[:32], False),
                      ("test", t.test, True), ("test_inp", t.test, False)]}
                 for j, t in enumerate(tasks)}
        for label, query in QUERIES.items():
            with_def, without = accuracy(feats, query, True), accuracy(feats, query, False)
            print(f"| {name} | {label} | {sum(with_def) / len(with_def):.1f} | {sum(without) / len(without):.1f} | "
                  f"{' / '.join(f'{x:.0f}' for x in without)} |", flush=True)


if __name__ == "__main__":
    main()
