"""The Hugging Face transformers reference for `protembed bench --compare hf` (ESM-2 only).

The reference runs ESM-2 the way users do: `EsmModel` (no pooler) with SDPA attention, the
`EsmTokenizer`, length-sorted batches under the same token budget padded to the longest row, and
a masked mean over residues (BOS, EOS and padding excluded). It holds a copy of protembed's
weights, so the two mean embeddings can be compared as a parity check. transformers is imported
only here, and only when a comparison is asked for.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protembed.alphabet import ESM2_TOKENS
from protembed.bench import BenchError, Runner
from protembed.errors import BackendError
from protembed.models import esm2
from protembed.models.encoder import Encoder


def require_transformers(family: str) -> None:
    """Raise BackendError unless the reference can run for a model of this family."""
    if family != "esm2":
        raise BackendError(
            f"--compare hf: {family.upper()} has no Hugging Face transformers implementation; "
            "compare is available for ESM-2 models only"
        )
    if importlib.util.find_spec("transformers") is None:
        raise BackendError("--compare hf needs Hugging Face transformers: pip install transformers")


def padded_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Length-sorted batches (longest first) whose padded size rows x longest stays within `budget`.

    Token counts include BOS and EOS; a sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * (lengths[batches[-1][0]] + 2) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def hf_state_dict(encoder: Encoder) -> dict[str, torch.Tensor]:
    """protembed ESM-2 weights under `EsmModel` key names (fused QKV split back into Q, K, V)."""
    state = encoder.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, srcs in esm2.key_map(encoder.config.n_layers).items():
        keys = [s.removeprefix("esm.") for s in srcs if s.startswith("esm.")]
        if not keys:
            continue  # LM head: EsmModel has none
        parts = state[ours].chunk(len(keys), dim=0) if len(keys) > 1 else (state[ours],)
        out.update(zip(keys, parts))
    return out


def build_model(encoder: Encoder) -> Any:
    """An `EsmModel` (SDPA, no pooler) with protembed's config, weights, dtype and device."""
    from transformers import EsmConfig, EsmModel

    c = encoder.config
    cfg = EsmConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        intermediate_size=c.d_ffn,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=1026,
        layer_norm_eps=c.norm_eps,
        position_embedding_type="rotary",
        emb_layer_norm_before=False,
        token_dropout=c.token_dropout,
        mask_token_id=c.mask_id,
        pad_token_id=c.pad_id,
    )
    weight = encoder.embed.weight
    with torch.device(weight.device):
        model = EsmModel._from_config(cfg, attn_implementation="sdpa", add_pooling_layer=False)
    model = model.to(dtype=weight.dtype).eval().requires_grad_(False)
    missing, unexpected = model.load_state_dict(hf_state_dict(encoder), strict=False)
    stray = [k for k in missing if not k.startswith("contact_head.") and not k.endswith("inv_freq")]
    assert not stray and not unexpected, (stray, unexpected)
    # Rotary frequencies as protembed uses them (fp32, fp16-rounded in real checkpoints).
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            module.inv_freq = encoder.rotary.inv_freq.to(weight.device)
    return model


def build_tokenizer() -> Any:
    """`EsmTokenizer` over ESM-2's 33-token vocabulary (a Hub `vocab.txt` written to a temp dir)."""
    from transformers import EsmTokenizer

    with tempfile.TemporaryDirectory(prefix="protembed_vocab_") as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(ESM2_TOKENS) + "\n")
        return EsmTokenizer(str(vocab))


def hf_runner(encoder: Encoder) -> Runner:
    """The transformers reference as a bench `Runner`, with the dtype and device its weights really have."""
    require_transformers(encoder.config.family)
    model, tokenizer = build_model(encoder), build_tokenizer()
    placements = {(p.dtype, p.device) for p in model.parameters()}
    if len(placements) > 1:
        raise BenchError(
            f"compare refused: the reference model mixes dtypes/devices {sorted(map(str, placements))}"
        )
    dtype, device = placements.pop()

    @torch.inference_mode()
    def embed(seqs: list[str], budget: int) -> np.ndarray:
        out = np.zeros((len(seqs), encoder.config.d_model), dtype=np.float32)
        for rows in padded_batches([len(s) for s in seqs], budget):
            enc = tokenizer([seqs[i] for i in rows], padding=True, return_tensors="pt").to(device)
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            n_tokens = enc["attention_mask"].sum(1)
            mask = enc["attention_mask"].clone()
            mask[:, 0] = 0  # BOS
            mask[torch.arange(len(rows)), n_tokens - 1] = 0  # EOS
            m = mask.unsqueeze(-1).float()
            out[rows] = ((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy()
        return out

    def batches(lengths: list[int], budget: int) -> tuple[int, int]:
        groups = padded_batches(lengths, budget)
        return len(groups), sum(len(g) * (lengths[g[0]] + 2) for g in groups)

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return Runner("hf", embed, batches, size, dtype, device)
