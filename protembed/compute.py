"""Forward + pooling of one unit of work: token arrays in, per-sequence numpy arrays out.

A unit is either a packed batch of whole sequences, or the overlapping windows of one protein
longer than the model's maximum (`--long window`), combined into full-length states. A batch that
runs out of GPU memory is split in halves and retried, down to a single sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protembed.batching import pack, token_batches
from protembed.errors import ProtembedError
from protembed.models.encoder import Encoder
from protembed.pooling import pool, residue_index
from protembed.windows import combine

# fp8 computes the Transformer Engine matrix products in FP8 around bfloat16 weights/activations
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "fp8": torch.bfloat16}  # fmt: skip


@dataclass(frozen=True)
class JobSpec:
    """What to compute, as plain picklable values (sent to worker processes)."""

    model_path: str
    dtype: str
    layers: list[int]
    poolings: list[str]
    per_residue: bool
    budget: int
    backend: str = "torch"  # resolved: "torch" or "te"
    compile: bool = False


@dataclass
class BatchResult:
    """Pooled [B, K, D] arrays by pooling name and, when asked, per-residue [R_i, K, D] arrays."""

    pooled: dict[str, np.ndarray]
    residues: list[np.ndarray] | None


class SequenceTooLargeError(ProtembedError):
    """A single sequence that does not fit in device memory even alone.

    `position` is its index in the unit being computed until an executor replaces it with the
    FASTA row (`row`).
    """

    def __init__(self, position: int, n_tokens: int, device: str, row: int | None = None) -> None:
        self.position, self.n_tokens, self.device, self.row = position, n_tokens, device, row
        super().__init__(f"a sequence of {n_tokens - 2} residues does not fit in the memory of {device}")


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


def run_splitting(
    encoder: Encoder, tokens: list[np.ndarray], layers: list[int], poolings: list[str], per_residue: bool
) -> BatchResult:
    """`run_batch`, halving the batch on CUDA out-of-memory until single sequences remain."""
    try:
        return run_batch(encoder, tokens, layers, poolings, per_residue)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(tokens) == 1:
            raise SequenceTooLargeError(0, int(tokens[0].size), str(encoder.embed.weight.device)) from None
    half = len(tokens) // 2
    parts = []
    for offset, chunk in ((0, tokens[:half]), (half, tokens[half:])):
        try:
            parts.append(run_splitting(encoder, chunk, layers, poolings, per_residue))
        except SequenceTooLargeError as exc:
            raise SequenceTooLargeError(
                offset + exc.position, exc.n_tokens, str(encoder.embed.weight.device)
            ) from None
    pooled = {k: np.concatenate([p.pooled[k] for p in parts]) for k in poolings}
    residues = None
    if per_residue:
        residues = [r for p in parts for r in (p.residues or [])]
    return BatchResult(pooled, residues)


def compute_unit(
    encoder: Encoder, spec: JobSpec, tokens: list[np.ndarray], starts: list[int] | None
) -> BatchResult:
    """A packed batch (`starts` None), or the windows of one protein combined (`starts` given)."""
    if starts is None:
        return run_splitting(encoder, tokens, spec.layers, spec.poolings, spec.per_residue)
    per_window: list[np.ndarray] = [np.empty(0)] * len(tokens)
    cls_parts = []
    for idx in token_batches(np.array([t.size for t in tokens]), spec.budget):
        part = run_splitting(encoder, [tokens[i] for i in idx], spec.layers, ["cls"], True)
        assert part.residues is not None
        for j, i in enumerate(idx):
            per_window[i] = part.residues[j]
        cls_parts.append(part.pooled["cls"])
    full = combine(per_window, starts, starts[-1] + tokens[-1].size - 2)  # [R, K, D]
    pooled = {}
    for p in spec.poolings:
        vec = full.mean(axis=0) if p == "mean" else np.concatenate(cls_parts).mean(axis=0)
        pooled[p] = vec[None].astype(np.float32)
    return BatchResult(pooled, [full] if spec.per_residue else None)
