"""Pooling of packed per-token states into per-sequence vectors.

Residues are the tokens between BOS and EOS: `mean` never includes BOS, EOS or padding; `cls`
is the BOS state (ESM-2's <cls>, AMPLIFY's <bos>).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from protembed.models.packing import Packing

POOLINGS = ("mean", "cls")


def pooling_names(spec: Sequence[str] | str) -> list[str]:
    """The names in a pooling spec (one name, the command line's comma list, or a list of either),
    stripped, in order, each once; checking them against `POOLINGS` is the caller's."""
    if not isinstance(spec, (str, Iterable)):
        raise TypeError(f"pooling: pass a name, a comma list or a list of them, not {type(spec).__name__}")
    given = [spec] if isinstance(spec, str) else list(spec)
    return list(dict.fromkeys(part.strip() for item in given for part in str(item).split(",")))


def residue_index(packing: Packing) -> torch.Tensor:
    """Flat indices of the residue tokens (BOS and EOS of every sequence left out), int64 [R]."""
    cu = packing.cu_seqlens.long()
    total = int(cu[-1])
    keep = torch.ones(total, dtype=torch.bool, device=cu.device)
    keep[cu[:-1]] = False  # BOS
    keep[cu[1:] - 1] = False  # EOS
    return torch.nonzero(keep).squeeze(1)


def mean_pool(states_TD: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Mean over each sequence's residues, in float32: [B, D]."""
    cu = packing.cu_seqlens.long()
    n_res_B = (cu[1:] - cu[:-1] - 2).clamp_min(1)
    # Prefix sums give every segment sum with one pass; float64 keeps long sums exact enough.
    csum = torch.zeros(
        states_TD.shape[0] + 1, states_TD.shape[1], dtype=torch.float64, device=states_TD.device
    )
    torch.cumsum(states_TD.double(), dim=0, out=csum[1:])
    sums = csum[cu[1:] - 1] - csum[cu[:-1] + 1]
    return (sums / n_res_B[:, None]).float()


def cls_pool(states_TD: torch.Tensor, packing: Packing) -> torch.Tensor:
    """State of the first token (<cls>/<bos>) of each sequence: [B, D]."""
    return states_TD[packing.cu_seqlens.long()[:-1]].float()


def pool(kind: str, states_TD: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Pool packed states by `kind` ("mean" or "cls")."""
    if kind == "mean":
        return mean_pool(states_TD, packing)
    if kind == "cls":
        return cls_pool(states_TD, packing)
    raise ValueError(f"unknown pooling {kind!r} (choose from {', '.join(POOLINGS)})")
