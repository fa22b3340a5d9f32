"""Transformer Engine backend: the weight conversion and its arithmetic on CPU, the TE model where TE runs.

The CPU tests prove the conversion without TE: the converted tensors, used the way TE uses them
(per-head interleaved fused QKV viewed as [T, N, 3, K], TE's rotary layout and formula, SwiGLU as
silu(first half) * second half, attention per sequence), reproduce the eager `Encoder` to 1e-5.
The tests marked `te` build the real TE model; they run automatically where Transformer Engine
imports and a CUDA GPU is present, and are skipped everywhere else.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protembed.batching import pack
from protembed.errors import BackendError
from protembed.models.checkpoints import family_module, load_checkpoint, registry_config
from protembed.models.encoder import Encoder
from protembed.models.layers import Rotary, rotary_inv_freq
from protembed.models.packing import Packing
from protembed.models.te import build_te_encoder, check_available, is_available
from protembed.models.te_convert import (
    ROTARY_KEY,
    canonical_state_dict,
    pack_qkv_interleaved,
    rope_freqs,
    swiglu_fc1,
    te_state_dict,
    unpack_qkv_interleaved,
)
from protembed.pooling import mean_pool
from protembed.registry import MODELS
from tests.helpers import FIXTURE_NAMES, fixture_dir, reference

te_available = is_available()
TE_REASON = (
    "Transformer Engine needs CUDA and its wheel; not installable on the CI/dev machines "
    "(no CUDA, no registry on the GPU machine)"
)
needs_te = pytest.mark.skipif(not te_available, reason=TE_REASON)
BATCH_KEYS = ("s00", "s01", "s02", "s05", "s07")  # lengths 3..125, s07 holds <mask> tokens


def batch_ids(name: str) -> list[np.ndarray]:
    _, ref = reference(name)
    return [ref[f"{k}_input_ids"] for k in BATCH_KEYS]


# ---------------------------------------------------------------------------------------------
# Pure conversions


@pytest.mark.parametrize(("d_model", "n_heads"), [(64, 4), (48, 3), (40, 1), (320, 20)])
def test_pack_unpack_round_trip(d_model: int, n_heads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3 * d_model, d_model, generator=gen)
    b = torch.randn(3 * d_model, generator=gen)
    for t in (w, b):
        packed = pack_qkv_interleaved(t, n_heads)
        assert packed.shape == t.shape
        assert torch.equal(unpack_qkv_interleaved(packed, n_heads), t)
        assert torch.equal(pack_qkv_interleaved(unpack_qkv_interleaved(t, n_heads), n_heads), t)


def test_packed_rows_are_grouped_per_head() -> None:
    n_heads, head_dim, d_in = 3, 4, 5
    d = n_heads * head_dim
    # Row j of head h of projection p (0 = q, 1 = k, 2 = v) holds the value 100 p + 10 h + j.
    code = torch.tensor(
        [[100 * p + 10 * h + j for h in range(n_heads) for j in range(head_dim)] for p in range(3)]
    )
    bias = code.flatten().float()  # [3D], rows [q; k; v]
    weight = bias[:, None].expand(3 * d, d_in).clone()
    for t in (bias, weight):
        packed = pack_qkv_interleaved(t, n_heads)
        for h in range(n_heads):
            for p in range(3):
                for j in range(head_dim):
                    row = (h * 3 + p) * head_dim + j  # TE order [q_h0, k_h0, v_h0, q_h1, ...]
                    assert torch.all(packed[row] == 100 * p + 10 * h + j)


def test_split_of_packed_projection_recovers_q_k_v() -> None:
    n_heads, head_dim, n_tok = 4, 8, 7
    d = n_heads * head_dim
    gen = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(3 * d, d, generator=gen), torch.randn(3 * d, generator=gen), torch.randn(n_tok, d)
    ours_T3NK = F.linear(x, w, b).view(n_tok, 3, n_heads, head_dim)  # how `Block` splits [q; k; v]
    te_TN3K = F.linear(x, pack_qkv_interleaved(w, n_heads), pack_qkv_interleaved(b, n_heads))
    te_TN3K = te_TN3K.view(n_tok, n_heads, 3, head_dim)  # how TE views an interleaved projection
    for p in range(3):
        torch.testing.assert_close(te_TN3K[:, :, p], ours_T3NK[:, p], rtol=0, atol=1e-5)


def test_swiglu_gate_order_matches_block(fixture_model: dict[str, Encoder]) -> None:
    model = fixture_model["amplify_l3_h64"]
    block = family_module("amplify").build(model.config).blocks[0]
    block.load_state_dict(model.blocks[0].state_dict())
    with torch.no_grad():
        block.out.weight.zero_()  # attention adds nothing: block(x) = x + ffn(ffn_norm(x))
    x = torch.randn(9, model.config.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x, Packing.from_lengths([9]))
        fc1 = swiglu_fc1(block.up.weight)
        h = F.linear(F.rms_norm(x, (x.shape[-1],), block.ffn_norm.weight, model.config.norm_eps), fc1)
        first, second = h.chunk(2, dim=-1)
        got = x + F.linear(F.silu(first) * second, block.down.weight)  # TE swiglu: act(first) * second
        swapped = x + F.linear(F.silu(second) * first, block.down.weight)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (swapped - want).abs().max() > 1e-3  # the check can tell the halves apart


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_table_matches_rotary(interleaved: bool) -> None:
    inv = rotary_inv_freq(16) * (1 + 1e-4)  # any frequencies, e.g. a checkpoint's rounded ones
    rotary = Rotary(16, interleaved=interleaved)
    rotary.set_inv_freq(inv)
    cos, sin = rotary.tables(300, torch.device("cpu"))
    table = rope_freqs(inv, 300, interleaved)
    assert table.shape == (300, 1, 1, 16) and table.dtype == torch.float32
    # Rotary folds the rotation's sign into sin; TE's rotate_half carries it instead.
    sign = (
        torch.tensor([-1.0, 1.0]).repeat(8) if interleaved else torch.tensor([-1.0, 1.0]).repeat_interleave(8)
    )
    assert torch.equal(table[:, 0, 0].cos(), cos)
    assert torch.equal(table[:, 0, 0].sin() * sign, sin)


# ---------------------------------------------------------------------------------------------
# State-dict mapping


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_state_dict_round_trip_on_fixtures(name: str) -> None:
    model = load_checkpoint(fixture_dir(name) / "checkpoint")
    c = model.config
    te_state = te_state_dict(model)
    ffn = "layernorm_mlp.fc1_weight" if c.activation == "swiglu" else "layernorm_fc1.weight"
    assert {"blocks.0.layernorm_qkv.weight", "blocks.2.proj.weight", f"blocks.1.{ffn}", ROTARY_KEY} <= set(
        te_state
    )
    assert not any(".qkv." in k or ".up." in k for k in te_state)
    assert torch.equal(
        te_state["blocks.1.layernorm_qkv.weight"], pack_qkv_interleaved(model.blocks[1].qkv.weight, 4)
    )
    # The checkpoint's rotary frequencies travel along (ESM-2's are fp16-rounded, not TE's own).
    assert torch.equal(te_state[ROTARY_KEY], model.rotary.inv_freq)
    own = rotary_inv_freq(c.head_dim)
    assert torch.equal(te_state[ROTARY_KEY], own) == (c.family == "amplify")

    back = canonical_state_dict({**te_state, "blocks.0.proj._extra_state": torch.empty(0)}, c)
    want = model.state_dict()
    assert set(back) == set(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k
    fresh = family_module(c.family).build(c)
    fresh.load_state_dict(back, strict=True)
    fresh.rotary.set_inv_freq(te_state[ROTARY_KEY])
    ids = batch_ids(name)
    batch = pack(ids)
    with torch.no_grad():
        a = model(batch.tokens, batch.packing, [c.top_layer], return_logits=True)
        b = fresh(batch.tokens, batch.packing, [c.top_layer], return_logits=True)
    assert torch.equal(a.states[c.top_layer], b.states[c.top_layer])
    assert a.logits is not None and b.logits is not None and torch.equal(a.logits, b.logits)


def test_canonical_state_dict_names_what_is_missing(fixture_model: dict[str, Encoder]) -> None:
    model = fixture_model["esm2_t3_h64"]
    te_state = te_state_dict(model)
    del te_state["blocks.2.fc2.bias"]
    with pytest.raises(ValueError, match=r"blocks\.2\.fc2\.bias"):
        canonical_state_dict(te_state, model.config)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip_on_registry_shapes(name: str) -> None:
    c = registry_config(name)
    with torch.device("meta"):
        model = family_module(c.family).build(c)
    te_state = te_state_dict(model)
    d, f = c.d_model, c.d_ffn
    assert te_state["blocks.0.layernorm_qkv.weight"].shape == (3 * d, d)
    if c.activation == "swiglu":
        assert te_state["blocks.0.layernorm_mlp.fc1_weight"].shape == (2 * f, d)
        assert te_state["blocks.0.layernorm_mlp.fc2_weight"].shape == (d, f)
        assert "blocks.0.layernorm_mlp.layer_norm_bias" not in te_state  # RMSNorm, no biases
    else:
        assert te_state["blocks.0.layernorm_fc1.weight"].shape == (f, d)
        assert te_state["blocks.0.layernorm_qkv.bias"].shape == (3 * d,)
    assert te_state[ROTARY_KEY].shape == (c.head_dim // 2,)
    back = canonical_state_dict(te_state, c)
    want = model.state_dict()
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in want.items()}


# ---------------------------------------------------------------------------------------------
# TE's arithmetic, emulated in plain torch from the converted weights


def _te_rotate(x_TNK: torch.Tensor, freqs_TK: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """TE's rotary formula: x cos + rotate_half(x) sin, rotate_half as TE defines it per layout."""
    if interleaved:
        rot = torch.stack([-x_TNK[..., 1::2], x_TNK[..., 0::2]], dim=-1).flatten(-2)
    else:
        x1, x2 = x_TNK.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    f = freqs_TK[:, None, :]
    return x_TNK * f.cos() + rot * f.sin()


def emulate_te(
    model: Encoder,
    te_state: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    packing: Packing,
    gelu: str = "none",
) -> dict[int, torch.Tensor]:
    """Every layer's states computed the way the TE blocks compute them, from `te_state` only."""
    c = model.config
    n_tok, n, k = tokens.numel(), c.n_heads, c.head_dim
    w = te_state

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        if c.norm == "rmsnorm":
            return F.rms_norm(x, (c.d_model,), w[f"{prefix}weight"], c.norm_eps)
        return F.layer_norm(x, (c.d_model,), w[f"{prefix}weight"], w[f"{prefix}bias"], c.norm_eps)

    def linear(x: torch.Tensor, weight: str, bias: str) -> torch.Tensor:
        return F.linear(x, w[weight], w.get(bias))

    freqs_LK = rope_freqs(w[ROTARY_KEY], packing.max_len, c.rotary_interleaved)[:, 0, 0]
    freqs_TK = freqs_LK[packing.positions]  # thd: positions restart at every sequence
    x = model.embed_tokens(tokens, packing)  # TE reuses the encoder's embedding + token dropout
    states = {0: x}
    cu = packing.cu_seqlens.tolist()
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        qkv = linear(
            norm(x, p + "layernorm_qkv.layer_norm_"), p + "layernorm_qkv.weight", p + "layernorm_qkv.bias"
        )
        q, kk, v = qkv.view(n_tok, n, 3, k).unbind(2)
        q, kk = (_te_rotate(t, freqs_TK, c.rotary_interleaved) for t in (q, kk))
        a = torch.empty_like(q)
        for s, e in zip(cu[:-1], cu[1:]):  # padding mask over cu_seqlens: each sequence alone
            a[s:e] = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), kk[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale=k**-0.5
            ).transpose(0, 1)
        x = linear(a.reshape(n_tok, -1), p + "proj.weight", p + "proj.bias") + x
        if c.activation == "swiglu":
            h = linear(
                norm(x, p + "layernorm_mlp.layer_norm_"),
                p + "layernorm_mlp.fc1_weight",
                p + "layernorm_mlp.fc1_bias",
            )
            first, second = h.chunk(2, dim=-1)
            x = (
                linear(F.silu(first) * second, p + "layernorm_mlp.fc2_weight", p + "layernorm_mlp.fc2_bias")
                + x
            )
        else:
            h = linear(
                norm(x, p + "layernorm_fc1.layer_norm_"), p + "layernorm_fc1.weight", p + "layernorm_fc1.bias"
            )
            x = linear(F.gelu(h, approximate=gelu), p + "fc2.weight", p + "fc2.bias") + x
        states[i + 1] = x
    normed = norm(x, "final_norm.")
    if c.family == "esm2":
        states[c.n_layers] = normed
    else:
        states[c.n_layers + 1] = normed
    return states


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_emulated_te_math_equals_encoder(name: str, fixture_model: dict[str, Encoder]) -> None:
    model = fixture_model[name]
    c = model.config
    batch = pack(batch_ids(name))
    layers = list(range(c.top_layer + 1))
    with torch.no_grad():
        want = model(batch.tokens, batch.packing, layers).states
        got = emulate_te(model, te_state_dict(model), batch.tokens, batch.packing)
    assert set(got) == set(want)
    for i in layers:
        # 1e-5 relative to the largest value (states reach ~7): fp32 summation order only; a wrong
        # head order, rotary layout or gate half gives differences of order one.
        diff, scale = float((got[i] - want[i]).abs().max()), max(1.0, float(want[i].abs().max()))
        assert diff <= 1e-5 * scale, f"{name} layer {i}: max abs diff {diff:.2e} (scale {scale:.1f})"


def test_tanh_gelu_deviation_is_measurable(fixture_model: dict[str, Encoder]) -> None:
    """Why the ESM-2 FFN stays unfused: TE's tanh GELU moves the states (README gives the size)."""
    model = fixture_model["esm2_t3_h64"]
    batch = pack(batch_ids("esm2_t3_h64"))
    n = model.config.n_layers
    te_state = te_state_dict(model)
    with torch.no_grad():
        exact = emulate_te(model, te_state, batch.tokens, batch.packing)[n]
        tanh = emulate_te(model, te_state, batch.tokens, batch.packing, gelu="tanh")[n]
    diff = float((exact - tanh).abs().max())
    assert 1e-6 < diff < 1e-2, diff  # far above fp32 noise (1e-6), far below bf16 rounding of O(1) states


# ---------------------------------------------------------------------------------------------
# Availability and errors (CPU)


def test_build_without_te_raises_with_install_hint(
    monkeypatch: pytest.MonkeyPatch, fixture_model: dict[str, Encoder]
) -> None:
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # makes the import fail here too
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    hint = r"Transformer Engine is not available .*: pip install 'protembed\[te\]'$"
    assert not is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU check comes first
    with pytest.raises(BackendError, match=hint):
        check_available()
    with pytest.raises(BackendError, match=hint) as info:
        build_te_encoder(fixture_model["esm2_t3_h64"])
    assert "\n" not in str(info.value)


def test_not_available_without_cuda() -> None:
    if not torch.cuda.is_available():
        assert not is_available()


# ---------------------------------------------------------------------------------------------
# The real TE model (runs only where Transformer Engine and CUDA are present)

TE_BF16_SLACK = 2.0  # TE in bf16 may be at most 2x further from fp32 than our own bf16 path ...
TE_BF16_FLOOR = 2e-3  # ... plus this much (relative to the largest reference value)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def _run(model: Encoder, name: str, layers: list[int]):
    batch = pack(batch_ids(name), device="cuda")
    with torch.inference_mode():
        return model(batch.tokens, batch.packing, layers, return_logits=True), batch.packing


@pytest.mark.te
@needs_te
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_te_module_holds_the_converted_weights(name: str) -> None:
    model = load_checkpoint(fixture_dir(name) / "checkpoint", dtype=torch.bfloat16, device="cuda")
    te_model = build_te_encoder(model)
    te_state = te_state_dict(model)
    got = {k: v for k, v in te_model.state_dict().items() if not k.endswith("_extra_state")}
    got = {k: v for k, v in got.items() if isinstance(v, torch.Tensor) and v.numel()}
    assert set(got) == set(te_state)
    for k, v in te_state.items():
        assert torch.equal(got[k].to(v.dtype), v), k


@pytest.mark.te
@needs_te
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_te_bf16_matches_eager(name: str) -> None:
    path = fixture_dir(name) / "checkpoint"
    ref_model = load_checkpoint(path, device="cuda")  # float32 reference
    bf16_model = load_checkpoint(path, dtype=torch.bfloat16, device="cuda")
    te_model = build_te_encoder(bf16_model)
    layers = list(range(ref_model.config.top_layer + 1))
    ref, packing = _run(ref_model, name, layers)
    eager, _ = _run(bf16_model, name, layers)
    te_out, _ = _run(te_model, name, layers)
    assert set(te_out.states) == set(ref.states)
    assert te_out.logits is not None and eager.logits is not None and ref.logits is not None
    pairs = [(f"layer {i}", te_out.states[i], eager.states[i], ref.states[i]) for i in layers]
    pairs.append(("logits", te_out.logits, eager.logits, ref.logits))
    for what, te_t, eager_t, ref_t in pairs:
        te_err, eager_err = _rel(te_t, ref_t), _rel(eager_t, ref_t)
        print(f"{name} {what}: te bf16 {te_err:.2e}, eager bf16 {eager_err:.2e} (relative to fp32)")
        assert te_err <= TE_BF16_SLACK * eager_err + TE_BF16_FLOOR, what
    n = ref_model.config.n_layers
    cos = F.cosine_similarity(mean_pool(te_out.states[n].float(), packing), mean_pool(ref.states[n], packing))
    assert float(cos.min()) > 0.999


@pytest.mark.te
@needs_te
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_te_layer_contract_and_batch_independence(name: str) -> None:
    model = load_checkpoint(fixture_dir(name) / "checkpoint", dtype=torch.bfloat16, device="cuda")
    te_model = build_te_encoder(model)
    ids = batch_ids(name)
    for layers in ([], [0], [1], [model.config.n_layers], list(range(model.config.top_layer + 1))):
        batch = pack(ids, device="cuda")
        with torch.inference_mode():
            got = te_model(batch.tokens, batch.packing, layers)
            want = model(batch.tokens, batch.packing, layers)
        assert set(got.states) == set(want.states) and got.logits is None
    alone = pack(ids[2:3], device="cuda")
    together = pack(ids, device="cuda")
    n = model.config.n_layers
    with torch.inference_mode():
        a = te_model(alone.tokens, alone.packing, [n]).states[n]
        b = te_model(together.tokens, together.packing, [n]).states[n]
    cu = together.packing.cu_seqlens.tolist()
    assert _rel(b[cu[2] : cu[3]], a) < 2e-2


@pytest.mark.te
@needs_te
def test_te_rejects_float32() -> None:
    model = load_checkpoint(fixture_dir("esm2_t3_h64") / "checkpoint", device="cuda")
    with pytest.raises(BackendError, match="bfloat16 or float16"):
        build_te_encoder(model)


def _fp8_capable() -> bool:
    return te_available and torch.cuda.get_device_capability() >= (8, 9)


FP8_MAX_REL = 0.15  # a guess to be confirmed on Hopper: fp8 vs fp32, relative to the largest value
FP8_MIN_COS = 0.99  # mean-pooled embeddings, fp8 vs fp32


@pytest.mark.te
@pytest.mark.skipif(
    not _fp8_capable(),
    reason=TE_REASON if not te_available else "fp8 needs compute capability 8.9+ (Ada, Hopper or newer)",
)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_te_fp8_accuracy_against_bf16(name: str) -> None:
    path = fixture_dir(name) / "checkpoint"
    ref_model = load_checkpoint(path, device="cuda")
    bf16 = build_te_encoder(load_checkpoint(path, dtype=torch.bfloat16, device="cuda"))
    fp8 = build_te_encoder(load_checkpoint(path, dtype=torch.bfloat16, device="cuda"), fp8=True)
    n = ref_model.config.n_layers
    ref, packing = _run(ref_model, name, [n])
    out16, _ = _run(bf16, name, [n])
    out8, _ = _run(fp8, name, [n])
    err16, err8 = _rel(out16.states[n], ref.states[n]), _rel(out8.states[n], ref.states[n])
    pooled = [mean_pool(o.states[n].float(), packing) for o in (out8, ref)]
    cos = float(F.cosine_similarity(*pooled).min())
    print(f"{name}: final layer vs fp32: bf16 {err16:.2e}, fp8 {err8:.2e}; fp8 pooled cosine {cos:.5f}")
    assert out8.states[n].shape == ref.states[n].shape and out8.logits is not None
    assert err8 <= FP8_MAX_REL and cos >= FP8_MIN_COS
