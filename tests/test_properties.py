"""A sequence's states do not depend on its batch: alone, packed, reordered or padded.

Reduced precision stays within the documented tolerance of float32 (README, "Precision"):
mean embeddings keep cosine >= 0.999 (bfloat16) / 0.99995 (float16) to float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protembed.alphabet import ALPHABETS
from protembed.batching import pack
from protembed.models.checkpoints import load_checkpoint
from protembed.models.encoder import Encoder
from protembed.pooling import mean_pool
from tests.helpers import FIXTURE_NAMES, fixture_dir

AA = "ACDEFGHIKLMNPQRSTVWY"
seqs = st.lists(st.text(alphabet=AA, min_size=1, max_size=120), min_size=1, max_size=6)


def family(name: str) -> str:
    return "esm2" if name.startswith("esm2") else "amplify"


def states_of(model: Encoder, tokens: list[np.ndarray]) -> list[torch.Tensor]:
    batch = pack(tokens)
    n = model.config.n_layers
    with torch.inference_mode():
        out = model(batch.tokens, batch.packing, [n]).states[n]
    cu = batch.packing.cu_seqlens.tolist()
    return [out[cu[i] : cu[i + 1]] for i in range(len(tokens))]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@settings(max_examples=15, deadline=None)
@given(batch=seqs, data=st.data())
def test_alone_packed_and_any_order_agree(
    fixture_model: dict[str, Encoder], name: str, batch: list[str], data: st.DataObject
) -> None:
    model = fixture_model[name]
    alphabet = ALPHABETS[family(name)]
    tokens = [alphabet.encode(s) for s in batch]
    alone = [states_of(model, [t])[0] for t in tokens]
    order = data.draw(st.permutations(range(len(tokens))))
    packed = states_of(model, [tokens[i] for i in order])
    for pos, i in enumerate(order):
        assert (packed[pos] - alone[i]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_padding_a_sequence_with_a_masked_tail_does_not_leak(
    fixture_model: dict[str, Encoder], name: str
) -> None:
    """The padded-attention path (different lengths in one batch) equals the unpadded path."""
    model = fixture_model[name]
    alphabet = ALPHABETS[family(name)]
    short, long = alphabet.encode("MKTAYIAKQR"), alphabet.encode("MKTAYIAKQR" * 9)
    alone = states_of(model, [short])[0]
    mixed = states_of(model, [long, short, long])[1]
    assert (mixed - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize(("dtype", "min_cos"), [(torch.bfloat16, 0.999), (torch.float16, 0.99995)])
def test_reduced_precision_tolerance(name: str, dtype: torch.dtype, min_cos: float) -> None:
    alphabet = ALPHABETS[family(name)]
    rng = np.random.default_rng(0)
    tokens = [alphabet.encode("".join(rng.choice(list(AA), n))) for n in (30, 120, 300)]
    batch = pack(tokens)
    means = {}
    for dt in (torch.float32, dtype):
        model = load_checkpoint(fixture_dir(name) / "checkpoint", dtype=dt)
        n = model.config.n_layers
        with torch.inference_mode():
            means[dt] = mean_pool(model(batch.tokens, batch.packing, [n]).states[n].float(), batch.packing)
    cos = torch.nn.functional.cosine_similarity(means[dtype], means[torch.float32])
    assert cos.min().item() >= min_cos
