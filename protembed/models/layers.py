"""Shared building blocks for ESM-2 and AMPLIFY, executed on packed variable-length batches.

Shape letters used in tensor names:
    T  tokens of all sequences in a packed batch, concatenated
    B  sequences in the batch          L  longest sequence (tokens)
    D  model width (d_model)           F  FFN width
    N  attention heads                 K  head dim (D / N)

A packed batch never holds padding: projections and FFN see only real tokens, and attention
sees each sequence's own tokens only (`Packing` tells where sequences start and end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
            _pad_group(lengths, a, b, int(cu[a]), int(cu[b]), device) for a, b in attention_groups(lengths)
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


def _pad_group(lengths: list[int], a: int, b: int, t0: int, t1: int, device: torch.device | str) -> PadGroup:
    lens = torch.tensor(lengths[a:b], dtype=torch.int64)
    max_len = int(lens.max())
    starts = torch.cumsum(lens, 0) - lens
    seq_of_token = torch.repeat_interleave(torch.arange(b - a), lens)
    pad_index = seq_of_token * max_len + torch.arange(t1 - t0) - starts[seq_of_token]
    valid = torch.arange(max_len)[None, :] < lens[:, None]
    key_mask = valid[:, None, None, :].to(device) if int(lens.min()) != max_len else None
    pad_slots = torch.nonzero(~valid.flatten()).squeeze(1)
    return PadGroup(slice(t0, t1), b - a, max_len, pad_index.to(device), pad_slots.to(device), key_mask)


class Linear(nn.Linear):
    """`nn.Linear` without initialisation: weights are always loaded or set explicitly, and
    skipping the random init keeps building a model (on the meta device too) instant."""

    def reset_parameters(self) -> None:
        return None


class Embedding(nn.Embedding):
    """`nn.Embedding` without initialisation (see `Linear`)."""

    def reset_parameters(self) -> None:
        return None


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` without initialisation (see `Linear`)."""

    def reset_parameters(self) -> None:
        return None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias (AMPLIFY)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """`LayerNorm` (with bias) or `RMSNorm` (no bias)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}")


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Default rotary frequencies 1 / base^(2i/K), float32 [K/2]."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))


class Rotary(nn.Module):
    """Rotary position embedding over the full head dim.

    `interleaved=False` rotates halves (ESM-2: pairs (i, i+K/2)); `interleaved=True` rotates
    adjacent pairs (2i, 2i+1) (AMPLIFY). The angles are computed in float32 from `inv_freq`
    and the rotation is applied in float32, then cast back, as both references do.
    `inv_freq` is kept as a plain float32 attribute (not a buffer), so casting the model to
    bfloat16 never rounds the frequencies.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = False) -> None:
        super().__init__()
        self.inv_freq = rotary_inv_freq(head_dim, base)
        self.interleaved = interleaved
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_inv_freq(self, inv_freq: torch.Tensor) -> None:
        """Use frequencies stored in a checkpoint (ESM-2 stores fp16-rounded values)."""
        self.inv_freq = inv_freq.detach().to(device="cpu", dtype=torch.float32).clone()
        self._cache = {}

    def tables(self, n_pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, float32 [n_pos, K] on `device`, laid out to match `interleaved`.

        The sign of sin is folded in so that rotating is `x * cos + swap(x) * sin`, where
        `swap` exchanges the two members of every rotated pair.
        """
        cached = self._cache.get(device)
        if cached is None or cached[0].shape[0] < n_pos:
            n = max(n_pos, 1024)
            angles = torch.outer(torch.arange(n, dtype=torch.float32, device="cpu"), self.inv_freq)
            cos, sin = angles.cos(), angles.sin()
            if self.interleaved:  # pairs (2i, 2i+1): [c0, c0, c1, c1, ...], [-s0, s0, -s1, s1, ...]
                cos2 = torch.stack([cos, cos], dim=-1).flatten(-2)
                sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)
            else:  # pairs (i, i + K/2): [c, c], [-s, s]
                cos2 = torch.cat([cos, cos], dim=-1)
                sin2 = torch.cat([-sin, sin], dim=-1)
            cached = (cos2.to(device), sin2.to(device))
            self._cache[device] = cached
        return cached[0][:n_pos], cached[1][:n_pos]

    def rotate(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rotate the last dim of `x` given `tables()` broadcastable to it; computed in float32.

        Works on the two members of every pair as strided views (first halves / second halves,
        or even / odd dims), four passes with no temporaries; `out` may be a reused buffer.
        """
        first, second = self._pairs(x.float())
        c, s = self._pairs(cos)[0], self._pairs(sin)[1]  # cos is the same for both; sin = +sin
        if out is None:  # out-of-place (also what torch.compile traces)
            new_first, new_second = first * c - second * s, second * c + first * s
            if self.interleaved:
                return torch.stack([new_first, new_second], dim=-1).flatten(-2).to(x.dtype)
            return torch.cat([new_first, new_second], dim=-1).to(x.dtype)
        work = out if x.dtype == torch.float32 else torch.empty(x.shape, dtype=torch.float32, device=x.device)
        out_first, out_second = self._pairs(work)
        torch.mul(first, c, out=out_first)
        out_first.addcmul_(second, s, value=-1.0)
        torch.mul(second, c, out=out_second)
        out_second.addcmul_(first, s)
        return work if work is out else out.copy_(work)

    def _pairs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two members of every rotated pair, as views of `t`."""
        if self.interleaved:
            return t[..., 0::2], t[..., 1::2]
        half = t.shape[-1] // 2
        return t[..., :half], t[..., half:]

    def forward(self, x_TNK: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """Rotate packed [T, ..., K] states by their positions."""
        n_pos = int(positions_T.max()) + 1 if positions_T.numel() else 1
        cos_PK, sin_PK = self.tables(n_pos, x_TNK.device)
        shape = (positions_T.numel(),) + (1,) * (x_TNK.dim() - 2) + (x_TNK.shape[-1],)
        return self.rotate(x_TNK, cos_PK[positions_T].view(shape), sin_PK[positions_T].view(shape))


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


def linear_into(x: torch.Tensor, layer: nn.Linear, out: torch.Tensor | None) -> torch.Tensor:
    """`layer(x)`, written into `out` when given (bias folded into the matrix product)."""
    if out is None:
        return layer(x)
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


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


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)).

    Args:
        d_model, n_heads, d_ffn: sizes (d_ffn is the hidden width of the FFN; for SwiGLU the
            fused up projection has 2 * d_ffn rows, gate first).
        norm: "layernorm" or "rmsnorm"; activation: "gelu" (exact erf) or "swiglu".
        bias: biases on every projection (ESM-2) or none (AMPLIFY).
        rotary: the model's shared `Rotary` module (its layout decides rotate-half/interleaved).
        workspace: the model's shared scratch buffers.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ffn: int,
        *,
        norm: str,
        norm_eps: float,
        activation: str,
        bias: bool,
        rotary: Rotary,
        workspace: Workspace,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.activation = activation
        self.attn_norm = make_norm(norm, d_model, norm_eps)
        self.qkv = Linear(d_model, 3 * d_model, bias=bias)  # rows: [q; k; v]
        self.out = Linear(d_model, d_model, bias=bias)
        self.ffn_norm = make_norm(norm, d_model, norm_eps)
        up_rows = 2 * d_ffn if activation == "swiglu" else d_ffn
        self.up = Linear(d_model, up_rows, bias=bias)
        self.down = Linear(d_ffn, d_model, bias=bias)
        self.rotary = [rotary]  # lists keep shared helpers out of this block's state dict
        self.workspace = [workspace]

    def forward(self, x_TD: torch.Tensor, packing: Packing) -> torch.Tensor:
        ws = self.workspace[0]
        n_tok = x_TD.shape[0]
        qkv = linear_into(self.attn_norm(x_TD), self.qkv, ws.get("qkv", (n_tok, self.qkv.out_features), x_TD))
        qkv_T3NK = qkv.unflatten(-1, (3, self.n_heads, self.head_dim))
        a_TD = packed_attention(qkv_T3NK, packing, self.rotary[0], self.head_dim**-0.5, ws)
        x_TD = self.out(a_TD).add_(x_TD)  # a new tensor: the old x_TD may be kept as a requested layer
        h = linear_into(self.ffn_norm(x_TD), self.up, ws.get("ffn", (n_tok, self.up.out_features), x_TD))
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate, inplace=True).mul_(up)
        else:
            h = torch.ops.aten.gelu_(h)  # exact erf GELU, in place
        return self.down(h).add_(x_TD)
