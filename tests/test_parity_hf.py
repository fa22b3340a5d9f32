"""Fresh random transformers `EsmForMaskedLM` models at several shapes load in protembed and agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protembed.alphabet import ESM2
from protembed.models.checkpoints import load_checkpoint
from tests.helpers import run_packed

transformers = pytest.importorskip("transformers")

SHAPES = [  # (layers, hidden, heads, ffn): head dims 16, 64 and an odd head count (3 heads of 20)
    (2, 64, 4, 128),
    (2, 128, 2, 256),
    (3, 60, 3, 120),
]
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYXBUZO" * 3, "M", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]


def random_esm(tmp: Path, layers: int, hidden: int, heads: int, ffn: int, seed: int) -> tuple[Path, object]:
    cfg = transformers.EsmConfig(
        vocab_size=33,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        layer_norm_eps=1e-5,
        emb_layer_norm_before=False,
        token_dropout=True,
        mask_token_id=32,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.EsmForMaskedLM(cfg).eval()
    with torch.no_grad():  # the default init is nearly linear; larger weights make mistakes visible
        for name, p in model.named_parameters():
            if "inv_freq" in name:
                continue
            std = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn_like(p) * std + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    out = tmp / f"esm_{layers}_{hidden}_{heads}"
    model.save_pretrained(out)
    return out, model


@pytest.mark.parametrize(("layers", "hidden", "heads", "ffn"), SHAPES)
def test_random_hf_esm_every_layer(tmp_path: Path, layers: int, hidden: int, heads: int, ffn: int) -> None:
    path, hf = random_esm(tmp_path, layers, hidden, heads, ffn, seed=hidden + heads)
    ours = load_checkpoint(path)
    tokens = [ESM2.encode(s) for s in SEQS]
    [out], cu = run_packed(ours, tokens, list(range(layers + 1)), logits=True)
    for b, ids in enumerate(tokens):
        with torch.inference_mode():
            ref = hf(torch.from_numpy(ids)[None], output_hidden_states=True)
        for i, hs in enumerate(ref.hidden_states):
            got = out.states[i][cu[b] : cu[b + 1]]
            diff = (got - hs[0]).abs().max().item()
            assert diff < 1e-4, f"shape {(layers, hidden, heads)} seq {b} layer {i}: {diff:.2e}"
        np.testing.assert_allclose(
            out.logits[cu[b] : cu[b + 1]].numpy(), ref.logits[0].numpy(), atol=1e-4, rtol=1e-5
        )


def test_saved_keys_use_new_spellings(tmp_path: Path) -> None:
    """transformers 5 writes LayerNorm gamma/beta and a literal '*' rotary key; both must load."""
    from safetensors import safe_open

    path, _ = random_esm(tmp_path, 1, 32, 2, 64, seed=0)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(("gamma", "beta")) or "LayerNorm.weight" in k for k in keys)
    load_checkpoint(path)
