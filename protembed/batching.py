"""Length-sorted token-budget batches and packing of token arrays into one flat tensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protembed.models.encoder import EncoderConfig
from protembed.models.packing import Packing


def token_batches(n_tokens: np.ndarray, budget: int) -> list[np.ndarray]:
    """Group sequences (given their token counts) into batches of at most `budget` tokens.

    Sequences are taken longest first, so the largest batch (and any out-of-memory) comes at the
    start and similar lengths share a batch. A sequence longer than the budget gets a batch of
    its own. Returns arrays of indices into `n_tokens`.
    """
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    order = np.argsort(-n_tokens, kind="stable")
    batches: list[np.ndarray] = []
    start, used = 0, 0
    for pos, i in enumerate(order):
        t = int(n_tokens[i])
        if pos > start and used + t > budget:
            batches.append(order[start:pos])
            start, used = pos, 0
        used += t
    if start < len(order):
        batches.append(order[start:])
    return batches


def split_tail(batches: list[np.ndarray], n_tokens: np.ndarray, last: int, pieces: int) -> list[np.ndarray]:
    """Cut each of the `last` batches into about `pieces` batches of equal token counts.

    Used on the final batches of an input so that, with several devices, the run ends with small
    units and no device waits long for another to finish a full batch. Deterministic, so a run's
    batches do not depend on how many devices compute them.
    """
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    head, tail = batches[: max(len(batches) - last, 0)], batches[max(len(batches) - last, 0) :]
    out = list(head)
    for idx in tail:
        small = -(-int(n_tokens[idx].sum()) // pieces)
        out.extend(idx[sub] for sub in token_batches(n_tokens[idx], small))
    return out


@dataclass
class PackedBatch:
    """Tokens of several sequences concatenated ([T] int64) plus where each one sits."""

    tokens: torch.Tensor
    packing: Packing

    @property
    def lengths(self) -> torch.Tensor:
        cu = self.packing.cu_seqlens
        return cu[1:] - cu[:-1]


def pack(token_arrays: list[np.ndarray], device: torch.device | str = "cpu") -> PackedBatch:
    """Concatenate framed token arrays (each BOS + residues + EOS) into one packed batch."""
    tokens = torch.from_numpy(np.concatenate(token_arrays)).to(device)
    return PackedBatch(tokens, Packing.from_lengths([len(a) for a in token_arrays], device=device))


CPU_TOKEN_BUDGET = 4096
# The most tokens a batch may hold: even the smallest model's activations for this many tokens
# (about 15 KB each) exceed any single device's memory, and token offsets stay far below 2**31.
MAX_TOKEN_BUDGET = 1 << 24


def default_token_budget(config: EncoderConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Tokens per batch when the user gives none.

    CPU: 4096 (large enough for efficient matrix products, small enough for caches and RAM).
    CUDA: 40% of the free device memory divided by an estimate of the activation bytes one token
    needs in a layer (about 4*D + 2*F values for the residual, QKV, attention output and FFN,
    doubled for temporaries), capped at 131072 tokens.
    """
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    per_token = 2 * (4 * config.d_model + 2 * config.d_ffn) * itemsize
    return int(max(1024, min(131072, 0.4 * free // per_token)))
