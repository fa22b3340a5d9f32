#!/usr/bin/env python
"""Write a random-weight checkpoint of a registry model's shape in the Hub file layout.

Speed does not depend on weight values, so this is what the README's performance figures run on
when the real weights cannot be downloaded:

    python scripts/random_checkpoint.py esm2-35m /tmp/esm2-35m
    protembed embed proteins.fasta --model /tmp/esm2-35m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from protembed.models import amplify, esm2
from protembed.models.checkpoints import random_model, registry_config, registry_hub_config
from protembed.models.layers import rotary_inv_freq
from protembed.registry import MODELS


def hub_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the Hub key names (fused tensors split back as the Hub stores them)."""
    config = registry_config(name)
    ours = random_model(config, seed=seed).state_dict()
    module = esm2 if config.family == "esm2" else amplify
    mapping = module.key_map(config.n_layers)
    state = {}
    for dst, srcs in mapping.items():
        parts = ours[dst].chunk(len(srcs), dim=0)
        for src, part in zip(srcs, parts):
            state[src] = part.contiguous()
    if config.family == "esm2":
        inv = rotary_inv_freq(config.head_dim).half().float()  # published files hold fp16-rounded values
        for i in range(config.n_layers):
            state[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv.clone()
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "config.json").write_text(json.dumps(registry_hub_config(a.model), indent=2))
    save_file(hub_state(a.model, a.seed), str(a.out / "model.safetensors"))
    print(a.out)


if __name__ == "__main__":
    main()
