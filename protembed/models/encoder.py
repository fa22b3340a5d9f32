"""One encoder for both families: embedding, a stack of `Block`s, a final norm and an LM head.

Layer numbering (the index passed in `layers`, see `resolve_layers`):
    ESM-2    0 = embedding output (after token dropout), i = output of block i, N = output of
             block N after the final LayerNorm (the raw output of block N is not exposed), as
             Hugging Face's and fair-esm's `hidden_states` do.
    AMPLIFY  0 = embedding output, i = output of block i, N = raw output of the last block (what
             the authors' embedder returns), N + 1 = after the final RMSNorm (the decoder input).
Negative indices count back from N, so -1 is the default layer of both families.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from protembed.errors import is_whole
from protembed.models.attention import Workspace
from protembed.models.layers import Block, Embedding, Rotary, make_norm
from protembed.models.packing import Packing


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that decides the shape and arithmetic of an encoder."""

    family: str  # "esm2" | "amplify"
    n_layers: int
    d_model: int
    n_heads: int
    d_ffn: int  # FFN hidden width (SwiGLU: width of each half)
    vocab_size: int
    norm: str  # "layernorm" | "rmsnorm"
    activation: str  # "gelu" | "swiglu"
    bias: bool
    rotary_interleaved: bool
    norm_eps: float
    pad_id: int
    mask_id: int
    token_dropout: bool
    max_residues: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def top_layer(self) -> int:
        """Largest valid layer index (AMPLIFY exposes its final-normed states as N + 1)."""
        return self.n_layers + (1 if self.family == "amplify" else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_layers(spec: Sequence[int | str] | int | str, config: EncoderConfig) -> list[int]:
    """Non-negative, de-duplicated layer indices for a user's list (ints, "final" or "all"), or for
    one such item alone; a string may be the command line's comma list ("0,6,-1")."""
    n, top = config.n_layers, config.top_layer
    out: list[int] = []
    # one item alone ("all", -1) or a list of them
    if isinstance(spec, (str, numbers.Integral)):
        given: list[int | str] = [spec]  # type: ignore[list-item]
    elif isinstance(spec, Iterable):
        given = list(spec)
    else:
        raise TypeError(f"layers: pass a layer, a comma list or a list of them, not {type(spec).__name__}")
    items = [part for item in given for part in (item.split(",") if isinstance(item, str) else [item])]
    if not items:
        raise ValueError("no layers given")
    for item in items:
        if not (isinstance(item, str) or is_whole(item)):
            raise ValueError(f"layer {item!r} is not a number, 'all' or 'final'")
        if isinstance(item, str):
            word = item.strip().lower()
            if word == "all":
                out.extend(range(0, top + 1))
                continue
            if word in ("final", "normed"):
                out.append(top)
                continue
            try:
                item = int(word)
            except ValueError:
                raise ValueError(f"layer {item!r} is not a number, 'all' or 'final'") from None
        item = int(item)
        idx = n + 1 + item if item < 0 else item
        if not 0 <= idx <= top:
            raise ValueError(f"layer {item} out of range for a {n}-layer model (valid: {-n - 1}..{top})")
        out.append(idx)
    return sorted(set(out))


@dataclass
class EncoderOutput:
    """States of the requested layers ([T, D] each, packed) and, when asked for, logits [T, V]."""

    states: dict[int, torch.Tensor]
    logits: torch.Tensor | None = None


class Encoder(nn.Module):
    """ESM-2 or AMPLIFY encoder on packed token batches."""

    def __init__(self, config: EncoderConfig, head: nn.Module) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embed = Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        self.rotary = Rotary(c.head_dim, interleaved=c.rotary_interleaved)
        self.workspace = Workspace()
        self.blocks = nn.ModuleList(
            Block(
                c.d_model,
                c.n_heads,
                c.d_ffn,
                norm=c.norm,
                norm_eps=c.norm_eps,
                activation=c.activation,
                bias=c.bias,
                rotary=self.rotary,
                workspace=self.workspace,
            )
            for _ in range(c.n_layers)
        )
        self.final_norm = make_norm(c.norm, c.d_model, c.norm_eps)
        self.head = head

    def embed_tokens(self, tokens_T: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Embedding output (ESM-2: with the inference-time token-dropout rescale)."""
        x_TD = self.embed(tokens_T)
        if not self.config.token_dropout:
            return x_TD
        is_mask_T = tokens_T == self.config.mask_id
        # Compiled, the general path below runs always (it gives the same values without masks):
        # branching on the data would break the graph.
        if not torch.compiler.is_compiling() and not bool(is_mask_T.any()):
            return x_TD * 0.88
        # Per sequence: scale = 0.88 / (1 - n_mask / n_tokens), computed over its own tokens only.
        cu = packing.cu_seqlens.long()
        lens_B = cu[1:] - cu[:-1]
        token_T = torch.arange(tokens_T.shape[0], device=cu.device)
        seq_of_token = torch.searchsorted(cu[1:], token_T, right=True)
        # Masks per sequence from a running count (exact integers; an index_add here made
        # torch.compile's CPU code generation fail on batches of one sequence).
        count_T = torch.cat([is_mask_T.new_zeros(1, dtype=torch.int64), is_mask_T.long().cumsum(0)])
        n_mask_B = count_T[cu[1:]] - count_T[cu[:-1]]
        ratio_B = n_mask_B.float() / lens_B.float()
        x_TD = x_TD.masked_fill(is_mask_T[:, None], 0.0)
        return (x_TD * 0.88 / (1 - ratio_B)[seq_of_token, None]).to(x_TD.dtype)

    def forward(
        self,
        tokens_T: torch.Tensor,
        packing: Packing,
        layers: Sequence[int] = (),
        return_logits: bool = False,
    ) -> EncoderOutput:
        """Run the stack up to the deepest layer needed; `layers` are resolved indices."""
        c = self.config
        wanted = set(layers)
        needs_top = return_logits or bool(wanted & {c.n_layers, c.top_layer})
        depth = c.n_layers if needs_top else max(wanted, default=0)
        states: dict[int, torch.Tensor] = {}
        x = self.embed_tokens(tokens_T, packing)
        if 0 in wanted:
            states[0] = x
        for i in range(1, depth + 1):
            x = self.blocks[i - 1](x, packing)
            if i < c.n_layers and i in wanted:
                states[i] = x
        if depth < c.n_layers:
            return EncoderOutput(states)
        normed = self.final_norm(x)
        if c.family == "esm2":
            if c.n_layers in wanted:
                states[c.n_layers] = normed
        else:
            if c.n_layers in wanted:
                states[c.n_layers] = x
            if c.top_layer in wanted:
                states[c.top_layer] = normed
        logits = self.head(normed, self.embed.weight) if return_logits else None
        return EncoderOutput(states, logits)
