"""Overlapping windows for proteins longer than the model's maximum (`--long window`).

A protein of R > W residues (W = the model's maximum, 1022 for ESM-2 and 2046 for AMPLIFY) is cut
into windows of W residues starting every W // 2 residues, the last one aligned to the protein's
end. Each window is embedded on its own (framed by BOS/EOS as the model expects); a residue's state
is the average of its states in every window that covers it, so every residue of the full protein
gets a vector, and pooling then runs over the full protein.
"""

from __future__ import annotations

import numpy as np


def window_starts(n_residues: int, window: int) -> list[int]:
    """First residue of each window; one window (start 0) when the protein fits."""
    if n_residues <= window:
        return [0]
    stride = max(window // 2, 1)
    starts = list(range(0, n_residues - window, stride))
    starts.append(n_residues - window)
    return starts


def split(tokens: np.ndarray, window: int) -> tuple[list[np.ndarray], list[int]]:
    """Framed token arrays of the windows of one framed protein, and their start residues."""
    bos, eos, body = tokens[:1], tokens[-1:], tokens[1:-1]
    starts = window_starts(body.size, window)
    return [np.concatenate([bos, body[s : s + window], eos]) for s in starts], starts


def combine(pieces: list[np.ndarray], starts: list[int], n_residues: int) -> np.ndarray:
    """Average per-residue states [W_i, K, D] of the windows into one [R, K, D] array."""
    total = np.zeros((n_residues, *pieces[0].shape[1:]), dtype=np.float64)
    count = np.zeros(n_residues, dtype=np.int64)
    for piece, s in zip(pieces, starts):
        total[s : s + piece.shape[0]] += piece
        count[s : s + piece.shape[0]] += 1
    assert count.min() >= 1, "windows must cover every residue"
    return (total / count.reshape(-1, *([1] * (total.ndim - 1)))).astype(np.float32)
