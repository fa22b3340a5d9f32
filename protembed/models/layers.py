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

import torch
import torch.nn.functional as F
from torch import nn

from protembed.models.attention import Workspace, packed_attention
from protembed.models.packing import Packing
from protembed.models.projections import project, project_add, project_gelu

# On CPU the FFN runs over row chunks of about 8 MiB of hidden activations (at least 1024 rows, so
# the matrix products stay efficient). Each chunk's fresh output is then small enough to be served
# from the heap (no page faults, as for a 42 MB esm2-150m FFN output: 293 against 369 GFLOP/s), and
# the process holds less memory (esm2-35m on realistic256: peak RSS 800 MB against 910 MB unchunked).
FFN_CHUNK_BYTES = 8 << 20
FFN_MIN_ROWS = 1024


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
        qkv = project(self.attn_norm(x_TD), self.qkv, ws, "qkv")
        qkv_T3NK = qkv.unflatten(-1, (3, self.n_heads, self.head_dim))
        a_TD = packed_attention(qkv_T3NK, packing, self.rotary[0], self.head_dim**-0.5, ws)
        x_TD = project_add(a_TD, self.out, x_TD)  # new tensor: the old x_TD may be a requested layer
        n_tok = x_TD.shape[0]
        rows = max(FFN_MIN_ROWS, FFN_CHUNK_BYTES // (self.up.out_features * x_TD.element_size()))
        n_chunks = math.ceil(n_tok / rows)
        if n_chunks <= 1 or x_TD.device.type != "cpu" or torch.compiler.is_compiling():
            return self._ffn(x_TD, ws)
        out_TD = torch.empty_like(x_TD)
        step = math.ceil(n_tok / n_chunks)
        for start in range(0, n_tok, step):
            out_TD[start : start + step] = self._ffn(x_TD[start : start + step], ws)
        return out_TD

    def _ffn(self, x_TD: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """x + FFN(norm(x)), a new tensor."""
        if self.activation == "swiglu":
            gate, up = project(self.ffn_norm(x_TD), self.up, ws, "ffn").chunk(2, dim=-1)
            h = F.silu(gate, inplace=True).mul_(up)
        else:
            h = project_gelu(self.ffn_norm(x_TD), self.up, ws, "ffn")  # exact erf GELU
        return project_add(h, self.down, x_TD)
