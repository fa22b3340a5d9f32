"""The Hugging Face transformers reference for `protembed bench --compare hf` (ESM-2 only).

The reference runs ESM-2 the way users do: `EsmModel` (no pooler) with SDPA attention,
length-sorted batches under the same token budget padded to the longest row, and a masked mean
over residues (BOS, EOS and padding excluded). It holds a copy of protembed's weights, so the two
mean embeddings can be compared as a parity check.

Both runners get the same token ids: the reference's are encoded inside each timed pass with
protembed's ESM-2 alphabet, whose ids are the Hub vocabulary's. `EsmTokenizer` itself would
encode some inputs differently (a run of letters outside the vocabulary such as `JJ` becomes one
`<unk>`, and `<MASK>` in capitals is split into letters), and the parity check would then compare
different inputs. transformers is imported only here, and only when a comparison is asked for.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from protembed.alphabet import ESM2
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


def padded_ids(rows: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows right-padded to the longest: (input_ids, attention_mask), both int64 [B, T]."""
    width = max(r.size for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : r.size] = torch.from_numpy(r)
        attention[j, : r.size] = 1
    return ids, attention


def hf_runner(encoder: Encoder) -> Runner:
    """The transformers reference as a bench `Runner`, with the dtype and device its weights really have."""
    require_transformers(encoder.config.family)
    model = build_model(encoder)
    placements = {(p.dtype, p.device) for p in model.parameters()}
    if len(placements) > 1:
        raise BenchError(
            f"compare refused: the reference model mixes dtypes/devices {sorted(map(str, placements))}"
        )
    dtype, device = placements.pop()

    @torch.inference_mode()
    def embed(seqs: list[str], budget: int) -> np.ndarray:
        out = np.zeros((len(seqs), encoder.config.d_model), dtype=np.float32)
        tokens = [ESM2.encode(s) for s in seqs]
        for rows in padded_batches([t.size - 2 for t in tokens], budget):
            ids, attention = padded_ids([tokens[i] for i in rows], ESM2.pad)
            ids, attention = ids.to(device), attention.to(device)
            hidden = model(input_ids=ids, attention_mask=attention).last_hidden_state
            residues = attention.clone()
            residues[:, 0] = 0  # BOS
            residues[torch.arange(len(rows)), attention.sum(1) - 1] = 0  # EOS
            m = residues.unsqueeze(-1).float()
            out[rows] = ((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy()
        return out

    def batches(lengths: list[int], budget: int) -> tuple[int, int]:
        groups = padded_batches(lengths, budget)
        return len(groups), sum(len(g) * (lengths[g[0]] + 2) for g in groups)

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return Runner("hf", embed, batches, size, dtype, device)
