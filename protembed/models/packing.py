"""Packed variable-length batches: where each sequence sits, and how attention groups them.

Shape letters as in `protembed.models.layers` (T packed tokens, B sequences, L longest sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_SLACK = 1.02  # a padded attention group computes at most 2% more than its sequences


@dataclass
class PadGroup:
    """Consecutive sequences of a packed batch whose attention runs as one padded SDPA call.

    Attributes:
        tokens: slice of the packed tokens the group covers.
        n_seqs, max_len: the padded layout [n_seqs, max_len].
        pad_index: int64 [t] flat index of each of the group's tokens in that layout.
        pad_slots: int64 flat indices of the layout's padding slots.
        key_mask_B11L: bool [n_seqs, 1, 1, max_len], True for real keys; None without padding.
    """

    tokens: slice
    n_seqs: int
    max_len: int
    pad_index: torch.Tensor
    pad_slots: torch.Tensor
    key_mask_B11L: torch.Tensor | None


@dataclass
class Packing:
    """Where each sequence sits in a packed batch, plus index tensors derived once per batch.

    Attributes:
        cu_seqlens: int32 [B+1] cumulative token counts starting at 0.
        max_len: longest sequence, in tokens.
        positions: int64 [T] position of each token inside its own sequence.
        groups: runs of consecutive sequences of similar length; attention pads each run only to
            its own longest sequence (see `attention_groups`), so a batch mixing lengths wastes
            little attention work on padding.
    """

    cu_seqlens: torch.Tensor
    max_len: int
    positions: torch.Tensor
    groups: list[PadGroup]

    @property
    def n_seqs(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str = "cpu") -> Packing:
        """Packing of sequences with the given token counts, in that order."""
        lens = torch.tensor(lengths, dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu[1:])
        seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lens)
        positions = torch.arange(int(cu[-1])) - cu[:-1][seq_of_token]
        groups = [
            _pad_group(lens[a:b], seq_of_token, positions, slice(int(cu[a]), int(cu[b])), device)
            for a, b in attention_groups(lengths)
        ]
        return cls(
            cu_seqlens=cu.to(torch.int32).to(device),
            max_len=int(lens.max()),
            positions=positions.to(device),
            groups=groups,
        )


def attention_groups(lengths: list[int], slack: float = ATTENTION_SLACK) -> list[tuple[int, int]]:
    """Split sequences into runs [a, b) whose padded attention (n * max_len^2) stays within
    `slack` times their real attention (sum of len^2). Deterministic for a given batch."""
    runs: list[tuple[int, int]] = []
    start, longest, squares = 0, 0, 0
    for i, n in enumerate(lengths):
        top = max(longest, n)
        if i > start and (i + 1 - start) * top * top > slack * (squares + n * n):
            runs.append((start, i))
            start, top, squares = i, n, 0
        longest, squares = top, squares + n * n
    runs.append((start, len(lengths)))
    return runs


def _pad_group(
    lens: torch.Tensor,
    seq_of_token: torch.Tensor,
    positions: torch.Tensor,
    tokens: slice,
    device: torch.device | str,
) -> PadGroup:
    """The padded layout of the group of sequences with lengths `lens` that covers `tokens`
    (`seq_of_token` and `positions` are the whole batch's)."""
    max_len = int(lens.max())
    local_seq = seq_of_token[tokens] - seq_of_token[tokens.start]
    pad_index = local_seq * max_len + positions[tokens]
    valid = torch.arange(max_len)[None, :] < lens[:, None]
    key_mask = valid[:, None, None, :].to(device) if int(lens.min()) != max_len else None
    pad_slots = torch.nonzero(~valid.flatten()).squeeze(1)
    return PadGroup(tokens, len(lens), max_len, pad_index.to(device), pad_slots.to(device), key_mask)
