"""Can the router's own feature tell tasks apart? Routing before any training, on the real model.

For each stream: the max-pooled frozen input embeddings (the shared attention's input feature) of
32 training and up to 100 test inputs per task, with and without the task definitions in the prompt.
Three variants: definitions in every prompt; in the training prompts that place the keys but not in
the test prompts (the harder check a trained run faces); in no prompt. Reports, per preset, the routing accuracy and mean own-block weight that the router gives the test
inputs right after each task's key is added (keys of the prototype preset start at the mean query of
32 training inputs; the paper's are random), the accuracy of a nearest-centroid rule (cosine, raw
feature), and how pseudo-features drawn from per-task feature statistics (ARM's ``features``
reflection) are routed compared with real test inputs. No training: this isolates the router's
starting point from what the blocks learn.

    .venv/bin/python benchmarks/router_features.py --data ../shared/data/CL_Benchmark > benchmarks/results/router_features.md
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from petmix.backbone import load_backbone
from petmix.data.collate import encode_prompts, prompt_batch
from petmix.data.loaders import load_tasks
from petmix.data.streams import resolve_stream
from petmix.data.templates import format_prompt
from petmix.metrics import routing_accuracy
from petmix.router import make_shared_router

STREAMS = {
    "superni5": ["task363_sst2_polarity_classification", "task181_outcome_extraction",
                 "task073_commonsenseqa_answer_generation", "task591_sciq_answer_generation",
                 "task875_emotion_classification"],
    "long4-shared": resolve_stream("long4-shared"),
    "default (BIG-bench)": resolve_stream("default"),
}


@torch.no_grad()
def features(backbone, router, task, examples, definition: bool, max_len: int, pool: str = "max") -> torch.Tensor:
    shown = task if definition else dataclasses.replace(task, definition="")
    ids = encode_prompts(backbone.tokenizer, [format_prompt(shown, ex.input) for ex in examples], max_len)
    out = []
    for start in range(0, len(ids), 32):
        batch = prompt_batch(backbone.tokenizer, ids[start:start + 32], left=False)
        embeds, mask = backbone.embed(batch["input_ids"]).float(), batch["source_mask"]
        if pool == "max":
            out.append(router.feature(embeds, mask))
        else:  # mean over the prompt's tokens: a variant measured against max pooling
            m = mask.float().unsqueeze(-1)
            out.append((embeds * m).sum(1) / m.sum(1))
    return torch.cat(out)


@torch.no_grad()
def variants(backbone, tasks, args) -> str:
    """Why the prototype preset looks as it does: the alternatives it was measured against."""
    d, nz = backbone.hidden_size, torch.nn.functional.normalize
    cells = []
    for pool in ("max", "mean"):
        torch.manual_seed(0)
        proto, paper = make_shared_router("prototype", d), make_shared_router("paper", d)
        train = [features(backbone, proto, t, t.train[: args.n_train], True, args.max_len, pool) for t in tasks]
        test = [features(backbone, proto, t, t.test, True, args.max_len, pool) for t in tasks]
        x = torch.cat(test)
        owners = torch.cat([torch.full((len(f),), j) for j, f in enumerate(test)])
        centroids = torch.stack([f.mean(0) for f in train])
        n = len(train)
        cos = (nz(centroids, dim=-1) @ nz(centroids, dim=-1).t())[~torch.eye(n, dtype=torch.bool)].mean()
        for f in train:
            proto.add_key(f)
        acc, own = summarise(proto.weights_from_features(x), owners)
        # The paper's random query projection, with keys at the projected prototypes and its dot product.
        keys = torch.stack([paper.project(f).float().mean(0) for f in train])
        w = torch.softmax(paper.project(x).float() @ keys.t() / d ** 0.5, dim=-1)
        p_acc, p_own = summarise(w, owners)
        cells.append(f"{pool}: centroid cosine {cos:.3f}; prototype preset {acc:.1f} ({own:.2f}); "
                     f"paper projection + prototype keys + dot {p_acc:.1f} ({p_own:.2f})")
    return "; ".join(cells)


def summarise(weights: torch.Tensor, owners: torch.Tensor) -> tuple[float, float]:
    accs, owns = [], []
    for j in range(int(owners.max()) + 1):
        got = routing_accuracy(weights[owners == j].tolist(), j)
        accs.append(got["accuracy"])
        owns.append(got["own_weight"])
    return sum(accs) / len(accs), sum(owns) / len(owns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/CL_Benchmark")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--max-test", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=256)
    args = parser.parse_args()
    backbone = load_backbone(args.model)
    d = backbone.hidden_size
    print("| stream | task definition in the prompts | nearest centroid % | paper at init: routing % (own weight) | "
          "prototype at init: routing % (own weight) | prototype, pseudo-features: routing % | "
          "max diff of mean weights, pseudo vs real |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for name, specs in STREAMS.items():
        tasks = load_tasks(specs, args.data, max_train=4 * args.n_train, max_test=args.max_test, seed=0)
        notes.append(f"- {name}, definitions in the prompts: {variants(backbone, tasks, args)}")
        # (definitions in the training prompts that place the keys, in the test prompts)
        for key_def, test_def in ((True, True), (True, False), (False, False)):
            torch.manual_seed(0)
            paper, proto = make_shared_router("paper", d), make_shared_router("prototype", d)
            train = [features(backbone, proto, t, t.train[: args.n_train], key_def, args.max_len) for t in tasks]
            test = [features(backbone, proto, t, t.test, test_def, args.max_len) for t in tasks]
            for f in train:
                paper.add_key(f)
                proto.add_key(f)
            x = torch.cat(test)
            owners = torch.cat([torch.full((len(f),), j) for j, f in enumerate(test)])
            nz = torch.nn.functional.normalize
            centroids = torch.stack([f.mean(0) for f in train])
            nearest = float((nz(x, dim=-1) @ nz(centroids, dim=-1).t()).argmax(1).eq(owners).float().mean()) * 100
            with torch.no_grad():
                p_acc, p_own = summarise(paper.weights_from_features(x), owners)
                q_acc, q_own = summarise(proto.weights_from_features(x), owners)
                g = torch.Generator().manual_seed(0)
                pseudo = torch.cat([f.mean(0) + f.std(0) * torch.randn(64, d, generator=g) for f in train])
                p_owners = torch.cat([torch.full((64,), j) for j in range(len(train))])
                w_pseudo = proto.weights_from_features(pseudo)
                w_real = proto.weights_from_features(x)
                s_acc, _ = summarise(w_pseudo, p_owners)
                diff = max(float((w_pseudo[p_owners == j].mean(0) - w_real[owners == j].mean(0)).abs().max())
                           for j in range(len(train)))
            shown = {(True, True): "in train and test", (True, False): "in train only",
                     (False, False): "in neither"}[key_def, test_def]
            print(f"| {name} | {shown} | {nearest:.1f} | {p_acc:.1f} ({p_own:.2f}) | "
                  f"{q_acc:.1f} ({q_own:.2f}) | {s_acc:.1f} | {diff:.3f} |", flush=True)
    print("\nVariants (routing % (own weight) at initialisation, max or mean pooling):\n")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
