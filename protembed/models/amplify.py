"""AMPLIFY: config from a Hub `config.json`, the decoder head and the checkpoint key map.

Only the weights and `config.json` are read; the remote code shipped in the Hub repos is never
imported or run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from protembed.models.encoder import Encoder, EncoderConfig
from protembed.models.layers import Linear

MAX_RESIDUES = 2046  # rotary table of 2048 positions: <bos> + 2046 residues + <eos>


class AMPLIFYHead(nn.Module):
    """logits = x W^T + b on the final-normed states (the decoder is not tied)."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.decoder = Linear(d_model, vocab_size)

    def forward(self, x_TD: torch.Tensor, embed_VD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD, self.decoder.weight, self.decoder.bias)


def swiglu_width(intermediate_size: int) -> int:
    """Hidden width of AMPLIFY's SwiGLU: 2/3 of intermediate_size, rounded up to a multiple of 8."""
    return 8 * math.ceil(int(2 * intermediate_size / 3) / 8)


def config_from_hub(cfg: dict) -> EncoderConfig:
    """EncoderConfig from the fields of a chandar-lab/AMPLIFY_* `config.json`."""
    unsupported = []
    if not cfg.get("rms_norm", True):
        unsupported.append("rms_norm=false")
    if str(cfg.get("hidden_act", "SwiGLU")).lower() != "swiglu":
        unsupported.append(f"hidden_act={cfg.get('hidden_act')}")
    if cfg.get("layer_norm_after_embedding", False):
        unsupported.append("layer_norm_after_embedding=true")
    if not cfg.get("layer_norm_before_last_layer", True):
        unsupported.append("layer_norm_before_last_layer=false")
    if bool(cfg.get("att_bias", False)) != bool(cfg.get("ffn_bias", False)):
        unsupported.append("att_bias != ffn_bias")
    if unsupported:
        raise ValueError("unsupported AMPLIFY variant: " + ", ".join(unsupported))
    d_model, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if d_model % n_heads:
        raise ValueError(f"hidden_size {d_model} is not divisible by num_attention_heads {n_heads}")
    return EncoderConfig(
        family="amplify",
        n_layers=int(cfg["num_hidden_layers"]),
        d_model=d_model,
        n_heads=n_heads,
        d_ffn=swiglu_width(int(cfg["intermediate_size"])),
        vocab_size=int(cfg.get("vocab_size", 27)),
        norm="rmsnorm",
        activation="swiglu",
        bias=bool(cfg.get("att_bias", False)),
        rotary_interleaved=True,
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        pad_id=int(cfg.get("pad_token_id", 0)),
        mask_id=int(cfg.get("mask_token_id", 2)),
        token_dropout=False,
        max_residues=min(MAX_RESIDUES, int(cfg.get("max_length", 2048)) - 2),
    )


def build(config: EncoderConfig) -> Encoder:
    return Encoder(config, AMPLIFYHead(config.d_model, config.vocab_size))


def key_map(n_layers: int, bias: bool = False) -> dict[str, list[str]]:
    """Our parameter name -> Hub key(s) (several are concatenated along dim 0)."""
    params = ("weight", "bias") if bias else ("weight",)
    m: dict[str, list[str]] = {"embed.weight": ["encoder.weight"]}
    for i in range(n_layers):
        src, dst = f"transformer_encoder.{i}.", f"blocks.{i}."
        m[dst + "attn_norm.weight"] = [src + "attention_norm.weight"]
        m[dst + "ffn_norm.weight"] = [src + "ffn_norm.weight"]
        for p in params:
            m[dst + f"qkv.{p}"] = [src + f"{n}.{p}" for n in ("q", "k", "v")]
            m[dst + f"out.{p}"] = [src + f"wo.{p}"]
            m[dst + f"up.{p}"] = [src + f"ffn.w12.{p}"]
            m[dst + f"down.{p}"] = [src + f"ffn.w3.{p}"]
    m["final_norm.weight"] = ["layer_norm_2.weight"]
    m["head.decoder.weight"] = ["decoder.weight"]
    m["head.decoder.bias"] = ["decoder.bias"]
    return m


def normalize_key(key: str) -> str:
    return key.removeprefix("model.")


def is_rotary_key(key: str) -> bool:
    return False


def is_ignored_key(key: str) -> bool:
    return False
