"""Attention on packed batches, and reusable scratch buffers for the large intermediates.

Shape letters as in `protembed.models.layers`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from protembed.models.packing import Packing, PadGroup

if TYPE_CHECKING:
    from protembed.models.layers import Rotary


class Workspace:
    """Reusable scratch buffers for the large per-layer intermediates (eager CPU only).

    A fresh tensor of tens of MB costs a page fault per 4 KiB page on every allocation (the C
    allocator hands such blocks back to the OS when freed); reusing a few buffers keeps them
    mapped. `get` returns None, and callers allocate as usual, on CUDA (PyTorch's caching
    allocator already reuses memory) and when disabled (under torch.compile, which plans its
    own buffers).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.enabled = True

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised tensor of `shape`, dtype and device of `like`, valid until the next get(name)."""
        if not self.enabled or like.device.type != "cpu":
            return None
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        stale = buf is not None and buf.is_inference() != torch.is_inference_mode_enabled()
        if buf is None or stale or buf.numel() < numel or buf.dtype != like.dtype:
            buf = torch.empty(numel, dtype=like.dtype)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def packed_attention(
    qkv_T3NK: torch.Tensor, packing: Packing, rotary: Rotary, scale: float, ws: Workspace
) -> torch.Tensor:
    """Rotary + attention of every sequence over its own tokens only; returns [T, N*K].

    On CUDA in half precision this runs PyTorch's variable-length flash attention directly on
    the packed tokens. Elsewhere each group of consecutive, similar-length sequences (see
    `attention_groups`) is scattered into a padded [B, L, 3, N, K] layout (a free view when its
    lengths are equal) and run through fused SDPA with a key mask.
    """
    n_tok, _, n_heads, head_dim = qkv_T3NK.shape
    if qkv_T3NK.is_cuda and qkv_T3NK.dtype in (torch.float16, torch.bfloat16) and _has_varlen():
        from torch.nn.attention.varlen import varlen_attn

        qk = rotary(qkv_T3NK[:, :2], packing.positions)
        cu, n = packing.cu_seqlens, packing.max_len
        out = varlen_attn(qk[:, 0], qk[:, 1], qkv_T3NK[:, 2], cu, cu, n, n, scale=scale)
        assert isinstance(out, torch.Tensor)
        return out.flatten(1)
    out_TD = ws.get("attention", (n_tok, n_heads * head_dim), qkv_T3NK)
    if out_TD is None:
        out_TD = qkv_T3NK.new_empty(n_tok, n_heads * head_dim)
    for group in packing.groups:
        _group_attention(qkv_T3NK[group.tokens], group, rotary, scale, ws, out_TD[group.tokens])
    return out_TD


def _group_attention(
    qkv_t3NK: torch.Tensor, group: PadGroup, rotary: Rotary, scale: float, ws: Workspace, out_tD: torch.Tensor
) -> None:
    """Padded SDPA over one group of consecutive sequences, written into `out_tD`."""
    _, _, n_heads, head_dim = qkv_t3NK.shape
    n_seqs, max_len = group.n_seqs, group.max_len
    if group.key_mask_B11L is None:
        padded = qkv_t3NK.view(n_seqs, max_len, 3, n_heads, head_dim)
    else:
        pad_shape = (n_seqs * max_len, 3, n_heads, head_dim)
        flat = ws.get("padded", pad_shape, qkv_t3NK)
        if flat is None:
            flat = qkv_t3NK.new_empty(pad_shape)
        flat.index_copy_(0, group.pad_index, qkv_t3NK)
        flat[group.pad_slots] = 0.0  # masked keys, but must be finite
        padded = flat.view(n_seqs, max_len, 3, n_heads, head_dim)
    cos_LK, sin_LK = rotary.tables(max_len, qkv_t3NK.device)
    shape = (1, max_len, 1, 1, head_dim)
    qk_out = ws.get("rotated", (n_seqs, max_len, 2, n_heads, head_dim), qkv_t3NK)
    qk_BL2NK = rotary.rotate(padded[:, :, :2], cos_LK.view(shape), sin_LK.view(shape), out=qk_out)
    q, k, v = (t.transpose(1, 2) for t in (qk_BL2NK[:, :, 0], qk_BL2NK[:, :, 1], padded[:, :, 2]))
    out_BNLK = F.scaled_dot_product_attention(q, k, v, attn_mask=group.key_mask_B11L, scale=scale)
    out_BLD = out_BNLK.transpose(1, 2).reshape(n_seqs * max_len, n_heads * head_dim)
    if group.key_mask_B11L is None:
        out_tD.copy_(out_BLD)
    else:
        torch.index_select(out_BLD, 0, group.pad_index, out=out_tD)


_VARLEN: bool | None = None


def _has_varlen() -> bool:
    """Whether this PyTorch has variable-length flash attention (torch.nn.attention.varlen)."""
    global _VARLEN  # noqa: PLW0603 - memoised capability probe, set once
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401

            _VARLEN = True
        except ImportError:
            _VARLEN = False
    return _VARLEN
