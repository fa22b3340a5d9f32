"""ESM-2: config from a Hub `config.json`, the masked-LM head and the checkpoint key map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from protembed.models.encoder import Encoder, EncoderConfig
from protembed.models.layers import LayerNorm, Linear

MAX_RESIDUES = 1022  # trained on crops of 1024 tokens: <cls> + 1022 residues + <eos>


class ESM2Head(nn.Module):
    """logits = LayerNorm(gelu(x Wd^T + bd)) E^T + bias, with E the (tied) word embedding."""

    def __init__(self, d_model: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(d_model, d_model)
        self.norm = LayerNorm(d_model, eps=eps)
        self.bias = nn.Parameter(torch.empty(vocab_size))

    def forward(self, x_TD: torch.Tensor, embed_VD: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(x_TD)))
        return F.linear(h, embed_VD, self.bias)


def config_from_hub(cfg: dict) -> EncoderConfig:
    """EncoderConfig from the fields of a facebook/esm2_* `config.json`; ValueError if not ESM-2."""
    if cfg.get("position_embedding_type", "rotary") != "rotary":
        raise ValueError("only rotary ESM models (ESM-2) are supported, not ESM-1/1b")
    if cfg.get("emb_layer_norm_before") or cfg.get("is_folding_model"):
        raise ValueError("ESM variants with emb_layer_norm_before or ESMFold are not supported")
    d_model, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if d_model % n_heads:
        raise ValueError(f"hidden_size {d_model} is not divisible by num_attention_heads {n_heads}")
    return EncoderConfig(
        family="esm2",
        n_layers=int(cfg["num_hidden_layers"]),
        d_model=d_model,
        n_heads=n_heads,
        d_ffn=int(cfg["intermediate_size"]),
        vocab_size=int(cfg.get("vocab_size", 33)),
        norm="layernorm",
        activation="gelu",
        bias=True,
        rotary_interleaved=False,
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        pad_id=int(cfg.get("pad_token_id", 1)),
        mask_id=int(cfg.get("mask_token_id", 32)),
        token_dropout=bool(cfg.get("token_dropout", True)),
        max_residues=MAX_RESIDUES,
    )


def build(config: EncoderConfig) -> Encoder:
    return Encoder(config, ESM2Head(config.d_model, config.vocab_size, config.norm_eps))


def key_map(n_layers: int) -> dict[str, list[str]]:
    """Our parameter name -> Hub key(s) (several are concatenated along dim 0, e.g. fused QKV)."""
    m: dict[str, list[str]] = {"embed.weight": ["esm.embeddings.word_embeddings.weight"]}
    for i in range(n_layers):
        src, dst = f"esm.encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            m[dst + f"attn_norm.{p}"] = [src + f"attention.LayerNorm.{p}"]
            m[dst + f"qkv.{p}"] = [src + f"attention.self.{n}.{p}" for n in ("query", "key", "value")]
            m[dst + f"out.{p}"] = [src + f"attention.output.dense.{p}"]
            m[dst + f"ffn_norm.{p}"] = [src + f"LayerNorm.{p}"]
            m[dst + f"up.{p}"] = [src + f"intermediate.dense.{p}"]
            m[dst + f"down.{p}"] = [src + f"output.dense.{p}"]
    for p in ("weight", "bias"):
        m[f"final_norm.{p}"] = [f"esm.encoder.emb_layer_norm_after.{p}"]
        m[f"head.dense.{p}"] = [f"lm_head.dense.{p}"]
        m[f"head.norm.{p}"] = [f"lm_head.layer_norm.{p}"]
    m["head.bias"] = ["lm_head.bias"]
    return m


def normalize_key(key: str) -> str:
    """Hub key in the canonical transformers-4 spelling (prefix `esm.`, LayerNorm weight/bias)."""
    if not key.startswith(("esm.", "lm_head.")):
        key = "esm." + key  # EsmModel checkpoints carry no prefix
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def is_rotary_key(key: str) -> bool:
    return key.endswith("rotary_embeddings.inv_freq")


def is_ignored_key(key: str) -> bool:
    """Keys present in some Hub files that the encoder does not use."""
    return (
        key.startswith("esm.contact_head.")
        or key == "lm_head.decoder.weight"  # tied to the word embedding
        or key == "esm.embeddings.position_ids"
    )
