"""Forward + pooling of one packed batch: token arrays in, per-sequence numpy arrays out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protembed.batching import pack
from protembed.models.encoder import Encoder
from protembed.pooling import pool, residue_index


@dataclass
class BatchResult:
    """Pooled [B, K, D] arrays by pooling name and, when asked, per-residue [R_i, K, D] arrays."""

    pooled: dict[str, np.ndarray]
    residues: list[np.ndarray] | None


@torch.inference_mode()
def run_batch(
    encoder: Encoder,
    tokens: list[np.ndarray],
    layers: list[int],
    poolings: list[str],
    per_residue: bool,
) -> BatchResult:
    """Embed framed token arrays packed in one batch (float32 results on the CPU)."""
    device = encoder.embed.weight.device
    batch = pack(tokens, device=device)
    out = encoder(batch.tokens, batch.packing, layers)
    pooled = {
        p: torch.stack([pool(p, out.states[layer], batch.packing) for layer in layers], dim=1).cpu().numpy()
        for p in poolings
    }
    residues = None
    if per_residue:
        stacked = torch.stack([out.states[layer] for layer in layers], dim=1)  # [T, K, D]
        flat = stacked[residue_index(batch.packing)].float().cpu().numpy()
        bounds = np.cumsum([0] + [t.size - 2 for t in tokens])
        residues = [flat[bounds[j] : bounds[j + 1]] for j in range(len(tokens))]
    return BatchResult(pooled, residues)
