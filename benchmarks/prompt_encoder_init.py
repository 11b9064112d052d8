"""Where a reparameterised prompt starts (docs/tuned.md, "P-tuning on the ATTEMPT benchmark"): the row
norm of a fresh prompt encoder's output against the model's token embeddings, and its cosine with the raw
prompt it came from (20 vocabulary rows, as `PromptPool` initialises a raw prompt).

    .venv/bin/python benchmarks/prompt_encoder_init.py [--model smollm2-135m] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from petmix.backbone import load_backbone
from petmix.blocks.prompt import PromptEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=512, help="the encoder's hidden width (encoder_hidden)")
    args = parser.parse_args()
    emb = load_backbone(args.model).model.get_input_embeddings().weight.detach().float()
    torch.manual_seed(args.seed)
    raw = emb[torch.randint(0, 5000, (20,))].clone()
    print(f"token embeddings: row norm {emb.norm(dim=1).mean():.2f}, std per dimension {emb.std():.4f}")
    for kind in ("lstm", "mlp"):  # P-tuning, prefix tuning
        with torch.no_grad():
            out = PromptEncoder(kind, emb.shape[1], args.hidden)(raw.unsqueeze(0)).reshape(-1, emb.shape[1])
        cos = torch.cosine_similarity(out, raw, dim=-1).mean()
        print(f"{kind} encoder output: row norm {out.norm(dim=1).mean():.2f}, cosine with its raw prompt {cos:.3f}")


if __name__ == "__main__":
    main()
