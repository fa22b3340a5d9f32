"""Weights of an `Encoder` in the layout of Transformer Engine modules, and back: pure tensor functions.

Nothing here imports Transformer Engine, so the whole conversion is tested on CPU. The TE model
(`protembed.models.te`) is an `Encoder` whose blocks are TE building blocks (../shared/SPEC.md 3.4):

    blocks.i.layernorm_qkv    te.LayerNormLinear(D, 3D)      attention norm + fused QKV
    blocks.i.core_attention   te.DotProductAttention          no parameters
    blocks.i.proj             te.Linear(D, D)                 attention output projection
    ESM-2    blocks.i.layernorm_fc1  te.LayerNormLinear(D, F)  FFN norm + up; then exact erf GELU in torch
             blocks.i.fc2            te.Linear(F, D)
    AMPLIFY  blocks.i.layernorm_mlp  te.LayerNormMLP(D, F, activation="swiglu", normalization="RMSNorm")
    rotary_pos_emb.inv_freq   the rotary frequencies, carried over from the checkpoint

The embedding, the final norm and the LM head are the encoder's own torch modules and keep their
names. Two tensors change layout on the way (SPEC 3.3):

* fused QKV: our rows are [q; k; v] (each D rows, heads in order); TE, with its per-head
  interleaved layout, views the projection output as [..., N, 3, K], so its rows are grouped per
  head: [q_h0, k_h0, v_h0, q_h1, k_h1, v_h1, ...] (K rows each). The bias is packed the same way.
* SwiGLU fc1: our `up` rows are [gate; up] and TE's "swiglu" computes silu(first half) * second
  half, so the rows are already in TE's order (`swiglu_fc1` is the identity, kept explicit).
"""

from __future__ import annotations

import torch

from protembed.models.encoder import Encoder, EncoderConfig

ROTARY_KEY = "rotary_pos_emb.inv_freq"

# Canonical block parameter -> TE parameter, relative to `blocks.i.` (one table, SPEC 3.3/3.4).
_ATTENTION = {
    "attn_norm.weight": "layernorm_qkv.layer_norm_weight",
    "attn_norm.bias": "layernorm_qkv.layer_norm_bias",
    "qkv.weight": "layernorm_qkv.weight",
    "qkv.bias": "layernorm_qkv.bias",
    "out.weight": "proj.weight",
    "out.bias": "proj.bias",
}
_FFN = {
    "gelu": {  # unfused so that GELU stays exact (TE's "gelu" is the tanh approximation)
        "ffn_norm.weight": "layernorm_fc1.layer_norm_weight",
        "ffn_norm.bias": "layernorm_fc1.layer_norm_bias",
        "up.weight": "layernorm_fc1.weight",
        "up.bias": "layernorm_fc1.bias",
        "down.weight": "fc2.weight",
        "down.bias": "fc2.bias",
    },
    "swiglu": {
        "ffn_norm.weight": "layernorm_mlp.layer_norm_weight",
        "ffn_norm.bias": "layernorm_mlp.layer_norm_bias",
        "up.weight": "layernorm_mlp.fc1_weight",
        "up.bias": "layernorm_mlp.fc1_bias",
        "down.weight": "layernorm_mlp.fc2_weight",
        "down.bias": "layernorm_mlp.fc2_bias",
    },
}


def pack_qkv_interleaved(w_qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows [q; k; v] -> rows grouped per head [q_h0, k_h0, v_h0, q_h1, ...].

    Args:
        w_qkv: fused QKV weight [3D, D] or bias [3D], rows [q; k; v].
        n_heads: attention heads N (head dim K = D / N).
    Returns:
        A new tensor of the same shape whose projection output views as [..., N, 3, K].
    """
    rest = tuple(w_qkv.shape[1:])
    head_dim = w_qkv.shape[0] // (3 * n_heads)
    assert 3 * n_heads * head_dim == w_qkv.shape[0], (tuple(w_qkv.shape), n_heads)
    # [3, N, K, ...] -> [N, 3, K, ...] -> [3D, ...]
    return w_qkv.reshape(3, n_heads, head_dim, *rest).transpose(0, 1).reshape(w_qkv.shape)


def unpack_qkv_interleaved(w_packed: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `pack_qkv_interleaved`: rows grouped per head -> rows [q; k; v]."""
    rest = tuple(w_packed.shape[1:])
    head_dim = w_packed.shape[0] // (3 * n_heads)
    assert 3 * n_heads * head_dim == w_packed.shape[0], (tuple(w_packed.shape), n_heads)
    # [N, 3, K, ...] -> [3, N, K, ...] -> [3D, ...]
    return w_packed.reshape(n_heads, 3, head_dim, *rest).transpose(0, 1).reshape(w_packed.shape)


def swiglu_fc1(w_up: torch.Tensor) -> torch.Tensor:
    """TE `LayerNormMLP(activation="swiglu")` fc1 weight or bias from our SwiGLU `up` [2F, ...].

    Our rows are [gate; up] and `Block` computes silu(gate) * up. TE's swiglu computes
    silu(first half of the fc1 output) * second half, which is the same order, so the tensor goes
    over unchanged. The function exists so that this decision is named, documented and tested.
    """
    assert w_up.shape[0] % 2 == 0, tuple(w_up.shape)
    return w_up


def rope_freqs(inv_freq: torch.Tensor, n_pos: int, interleaved: bool) -> torch.Tensor:
    """Rotary angles in TE's layout: float32 [n_pos, 1, 1, K] (what `RotaryPositionEmbedding` returns).

    Rotate-half (ESM-2) repeats the K/2 angles as [t0..t(K/2-1), t0..t(K/2-1)]; interleaved
    (AMPLIFY) repeats each angle for an adjacent pair: [t0, t0, t1, t1, ...]. Computed from the
    given `inv_freq` (for ESM-2 the checkpoint's fp16-rounded values) instead of TE's own.
    """
    inv = inv_freq.to(torch.float32)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32, device=inv.device), inv)
    table = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return table[:, None, None, :]


def key_map(config: EncoderConfig) -> dict[str, str]:
    """Every canonical parameter name of an encoder with this config -> its TE parameter name."""
    from protembed.models.checkpoints import family_module

    with torch.device("meta"):
        names = list(family_module(config.family).build(config).state_dict())
    block_table = _ATTENTION | _FFN[config.activation]
    out = {}
    for name in names:
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            out[name] = f"blocks.{i}.{block_table[rest]}"
        else:  # embedding, final norm, LM head: the encoder's own modules
            out[name] = name
    return out


def _is_qkv(name: str) -> bool:
    return name.startswith("blocks.") and name.split(".", 2)[2] in ("qkv.weight", "qkv.bias")


def _is_up(name: str) -> bool:
    return name.startswith("blocks.") and name.split(".", 2)[2] in ("up.weight", "up.bias")


def te_state_dict(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The encoder's parameters under TE names and layouts, plus `ROTARY_KEY` (float32 inv_freq).

    Tensors keep their device and dtype; works on meta-device models (shapes only).
    """
    config = encoder.config
    names = key_map(config)
    state = encoder.state_dict()
    assert set(state) == set(names), sorted(set(state) ^ set(names))
    out: dict[str, torch.Tensor] = {}
    for ours, tensor in state.items():
        if _is_qkv(ours):
            tensor = pack_qkv_interleaved(tensor, config.n_heads)
        elif _is_up(ours) and config.activation == "swiglu":
            tensor = swiglu_fc1(tensor)
        out[names[ours]] = tensor
    out[ROTARY_KEY] = encoder.rotary.inv_freq.detach().to(torch.float32).clone()
    return out


def canonical_state_dict(te_state: dict[str, torch.Tensor], config: EncoderConfig) -> dict[str, torch.Tensor]:
    """Inverse of `te_state_dict`: a state dict that `Encoder.load_state_dict(strict=True)` takes.

    TE's `*._extra_state` entries (FP8 metadata) are ignored. The rotary frequencies are not part
    of an encoder's state dict: pass `te_state[ROTARY_KEY]` to `encoder.rotary.set_inv_freq`.
    """
    inverse = {te_name: ours for ours, te_name in key_map(config).items()}
    given = {k for k in te_state if k != ROTARY_KEY and not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(inverse) - given), sorted(given - set(inverse))
    if missing or unexpected:
        raise ValueError(
            f"TE state does not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    out: dict[str, torch.Tensor] = {}
    for te_name in given:
        ours, tensor = inverse[te_name], te_state[te_name]
        if _is_qkv(ours):
            tensor = unpack_qkv_interleaved(tensor, config.n_heads)
        elif _is_up(ours) and config.activation == "swiglu":
            tensor = swiglu_fc1(tensor)  # identity both ways
        out[ours] = tensor
    return out
