"""Frozen features for FLIP heads: their containers and the one-hot baselines.

Language-model features come from `feature_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
ONEHOT_DIM = len(AMINO_ACIDS) + 1  # last column: any other letter

_ONEHOT_INDEX = np.full(256, len(AMINO_ACIDS), dtype=np.int64)
for _i, _c in enumerate(AMINO_ACIDS):
    _ONEHOT_INDEX[ord(_c)] = _ONEHOT_INDEX[ord(_c.lower())] = _i


@dataclass
class Ragged:
    """Variable-length rows stored flat: row i is data[offsets[i]:offsets[i + 1]]."""

    data: np.ndarray  # [T, D]
    offsets: np.ndarray  # [n + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Features:
    """Per-sequence (`pooled` [n, D]) and/or per-residue features, plus which inputs were cut short."""

    pooled: np.ndarray | None
    residues: Ragged | None
    truncated: np.ndarray  # [n] bool

    @property
    def dim(self) -> int:
        if self.pooled is not None:
            return int(self.pooled.shape[1])
        assert self.residues is not None
        return self.residues.dim


def onehot_ids(seq: str) -> np.ndarray:
    """Column index (0-20) of each residue."""
    return _ONEHOT_INDEX[np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8)]


def onehot_residues(seqs: Sequence[str]) -> Features:
    """One-hot per residue (20 amino acids + other), float32 [L, 21] per sequence."""
    ids = np.concatenate([onehot_ids(s) for s in seqs]) if seqs else np.zeros(0, dtype=np.int64)
    data = np.zeros((ids.size, ONEHOT_DIM), dtype=np.float32)
    data[np.arange(ids.size), ids] = 1.0
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    return Features(None, Ragged(data, offsets), np.zeros(len(seqs), dtype=bool))


def onehot_flat(seqs: Sequence[str], length: int) -> Features:
    """FLIP's one-hot baseline: one-hot zero-padded or cut to `length`, flattened: [n, length * 21]."""
    out = np.zeros((len(seqs), length, ONEHOT_DIM), dtype=np.float32)
    for i, s in enumerate(seqs):
        ids = onehot_ids(s[:length])
        out[i, np.arange(ids.size), ids] = 1.0
    truncated = np.array([len(s) > length for s in seqs], dtype=bool)
    return Features(out.reshape(len(seqs), -1), None, truncated)
