"""Optional NVIDIA Transformer Engine backend: a finished `Encoder` with its blocks run by TE modules.

Imported only when the te backend is asked for; Transformer Engine itself is imported inside the
functions, so this module loads anywhere. `build_te_encoder(encoder)` returns a `TEEncoder`, an
`Encoder` with the same `forward(tokens_T, packing, layers, return_logits)` and layer numbering,
sharing the original's embedding (with ESM-2 token dropout), final norm and LM head, and running
each block as TE building blocks on packed `thd` input (../shared/SPEC.md 3.2-3.4):

    norm + fused QKV    te.LayerNormLinear (LayerNorm or RMSNorm), rows interleaved per head
    rotary              TE's fused `apply_rotary_pos_emb` on thd with `cu_seqlens`, rotate-half
                        (ESM-2) or interleaved (AMPLIFY), angles from the checkpoint's inv_freq
    attention           te.DotProductAttention(qkv_format="thd", attn_mask_type="padding"):
                        each sequence attends to its own tokens, bounds from `Packing.cu_seqlens`
                        (TE's default mask is causal, so the type is always set)
    output projection   te.Linear
    FFN                 ESM-2: te.LayerNormLinear -> exact erf GELU in torch -> te.Linear, because
                        TE's "gelu" is the tanh approximation; AMPLIFY: te.LayerNormMLP("swiglu")

Weights are converted once, at build time, by the pure functions of `te_convert`.

FP8 (`fp8=True`, compute capability 8.9+): the TE GEMMs run in FP8 under a DelayedScaling recipe
(E4M3 forward, amax over the last 16 batches, no cross-process amax reduction, attention itself
in the model dtype). The embedding, final norm and LM head are torch modules and never see FP8;
the norms inside LayerNormLinear/LayerNormMLP are computed in high precision before the GEMM
input is quantized. FP8 GEMMs need a token count divisible by 16, so each batch gets a dummy
trailing sequence of pad tokens, dropped from the output. Delayed scaling takes its scales from
earlier batches, so the first batch is run once to record them and then again for its result.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protembed.errors import BackendError
from protembed.models.encoder import Encoder, EncoderConfig, EncoderOutput
from protembed.models.packing import Packing
from protembed.models.te_convert import rope_freqs, te_state_dict

INSTALL_HINT = "pip install 'protembed[te]'"
FP8_MULTIPLE = 16  # FP8 GEMMs need both matrix dimensions divisible by 16


def _import_te() -> ModuleType:
    """`transformer_engine.pytorch`, or BackendError with an install hint."""
    try:
        import transformer_engine.pytorch as te
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA install
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BackendError(f"Transformer Engine is not available ({reason}): {INSTALL_HINT}") from None
    return te


def check_available(fp8: bool = False, device: torch.device | None = None) -> None:
    """Raise BackendError unless the te backend can run here; cheap, for validation before loading.

    Checks, in this order, that `device` (when given) is a CUDA device and a CUDA device is
    visible (installing Transformer Engine would not help otherwise), that Transformer Engine
    imports (else the error carries the install hint) and, for `fp8`, that the device has compute
    capability 8.9+ (Ada, Hopper or newer).
    """
    if device is not None and device.type != "cuda":
        raise BackendError(f"Transformer Engine runs on CUDA GPUs, not {device.type}")
    if not torch.cuda.is_available():
        raise BackendError("Transformer Engine needs a CUDA GPU and none is visible")
    _import_te()
    if fp8 and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise BackendError(f"fp8 needs compute capability 8.9+ (Ada, Hopper or newer), not {name}")


def is_available() -> bool:
    """True when Transformer Engine imports and a CUDA device is present."""
    try:
        check_available()
    except BackendError:
        return False
    return True


def _rope_apply_fn(te: ModuleType, interleaved: bool) -> Any:
    try:
        from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
    except ImportError:  # Transformer Engine 1.x keeps it in attention.py
        from transformer_engine.pytorch.attention import apply_rotary_pos_emb  # type: ignore[no-redef]
    if interleaved and "interleaved" not in inspect.signature(apply_rotary_pos_emb).parameters:
        version = getattr(te, "__version__", "?")
        raise BackendError(
            f"Transformer Engine {version} has no interleaved rotary embedding (needed for AMPLIFY): "
            f"pip install -U 'protembed[te]'"
        )
    return apply_rotary_pos_emb


class TERotary(nn.Module):
    """Rotary embedding applied by TE's fused thd kernel; `inv_freq` is carried from the checkpoint."""

    def __init__(self, inv_freq: torch.Tensor, interleaved: bool, apply_fn: Any) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq.to(torch.float32).clone())
        self.interleaved = interleaved
        self._rope_fn = apply_fn
        self._table = torch.empty(0)

    def forward(self, x_TNK: torch.Tensor, packing: Packing) -> torch.Tensor:
        if self._table.shape[0] < packing.max_len or self._table.device != x_TNK.device:
            n = max(packing.max_len, 1024)
            self._table = rope_freqs(self.inv_freq.float().to(x_TNK.device), n, self.interleaved)
        extra = {"interleaved": True} if self.interleaved else {}
        return self._rope_fn(
            x_TNK, self._table, tensor_format="thd", fused=True, cu_seqlens=packing.cu_seqlens, **extra
        )


class TEBlock(nn.Module):
    """One pre-norm block as TE building blocks; called like `Block`: (x_TD, packing) -> x_TD."""

    def __init__(
        self,
        te: ModuleType,
        c: EncoderConfig,
        layer_number: int,
        rotary: TERotary,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        d, n, k, f = c.d_model, c.n_heads, c.head_dim, c.d_ffn
        norm = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[c.norm]
        opts: dict[str, Any] = {"bias": c.bias, "params_dtype": dtype, "device": device}
        self.n_heads, self.head_dim = n, k
        self.layernorm_qkv = te.LayerNormLinear(d, 3 * d, eps=c.norm_eps, normalization=norm, **opts)
        self.core_attention = te.DotProductAttention(
            n,
            k,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type="padding",
            layer_number=layer_number,
            softmax_scale=k**-0.5,
        )
        self.proj = te.Linear(d, d, **opts)
        self.layernorm_mlp: nn.Module | None = None
        self.layernorm_fc1: nn.Module | None = None
        self.fc2: nn.Module | None = None
        if c.activation == "swiglu":
            self.layernorm_mlp = te.LayerNormMLP(
                d, f, eps=c.norm_eps, normalization=norm, activation="swiglu", **opts
            )
        else:
            self.layernorm_fc1 = te.LayerNormLinear(d, f, eps=c.norm_eps, normalization=norm, **opts)
            self.fc2 = te.Linear(f, d, **opts)
        self.rotary = [rotary]  # a list keeps the shared module out of this block's state dict

    def forward(self, x_TD: torch.Tensor, packing: Packing) -> torch.Tensor:
        n_tok = x_TD.shape[0]
        # Per-head interleaved rows: the projection views as [T, N, 3, K].
        qkv_TN3K = self.layernorm_qkv(x_TD).view(n_tok, self.n_heads, 3, self.head_dim)
        rotary = self.rotary[0]
        q_TNK = rotary(qkv_TN3K[:, :, 0], packing)
        k_TNK = rotary(qkv_TN3K[:, :, 1], packing)
        v_TNK = qkv_TN3K[:, :, 2].contiguous()
        cu, max_len = packing.cu_seqlens, packing.max_len
        a = self.core_attention(
            q_TNK,
            k_TNK,
            v_TNK,
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )
        x_TD = self.proj(a.reshape(n_tok, -1)) + x_TD
        if self.layernorm_mlp is not None:
            return self.layernorm_mlp(x_TD) + x_TD
        assert self.layernorm_fc1 is not None and self.fc2 is not None
        return self.fc2(F.gelu(self.layernorm_fc1(x_TD))) + x_TD  # exact erf GELU


class TEEncoder(Encoder):
    """An `Encoder` whose blocks are `TEBlock`s; shares the source encoder's embedding, norm and head.

    With FP8, call it under `torch.inference_mode()` every time: TE creates its FP8 scaling state
    lazily in the first call and updates it in place after each one.
    """

    def __init__(self, encoder: Encoder, blocks: list[TEBlock], rotary: TERotary, fp8_recipe: Any) -> None:
        with torch.device("meta"):  # the canonical blocks built here are replaced right away
            super().__init__(encoder.config, nn.Identity())
        self.embed, self.final_norm, self.head = encoder.embed, encoder.final_norm, encoder.head
        self.blocks = nn.ModuleList(blocks)
        self.rotary_pos_emb = rotary
        self.fp8_recipe = fp8_recipe
        self._fp8_scales_ready = False

    def forward(
        self,
        tokens_T: torch.Tensor,
        packing: Packing,
        layers: Sequence[int] = (),
        return_logits: bool = False,
    ) -> EncoderOutput:
        """Same contract as `Encoder.forward`."""
        if self.fp8_recipe is None:
            return super().forward(tokens_T, packing, layers, return_logits)
        n_tok = tokens_T.numel()
        tokens_T, packing = _pad_batch(tokens_T, packing, self.config.pad_id)
        if not self._fp8_scales_ready:  # record amax once so the first result uses real scales
            with _fp8_autocast(self.fp8_recipe):
                super().forward(tokens_T, packing, [self.config.n_layers])
            self._fp8_scales_ready = True
        with _fp8_autocast(self.fp8_recipe):
            out = super().forward(tokens_T, packing, layers, return_logits)
        if tokens_T.numel() == n_tok:
            return out
        states = {i: s[:n_tok] for i, s in out.states.items()}
        return EncoderOutput(states, None if out.logits is None else out.logits[:n_tok])


def _pad_batch(tokens_T: torch.Tensor, packing: Packing, pad_id: int) -> tuple[torch.Tensor, Packing]:
    """Append a dummy sequence of pad tokens so the token count is a multiple of FP8_MULTIPLE."""
    pad = -tokens_T.numel() % FP8_MULTIPLE
    if pad == 0:
        return tokens_T, packing
    lengths = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).tolist()
    tokens_T = torch.cat([tokens_T, tokens_T.new_full((pad,), pad_id)])
    return tokens_T, Packing.from_lengths([*lengths, pad], device=tokens_T.device)


def _fp8_autocast(recipe: Any) -> Any:
    te = _import_te()
    autocast = getattr(te, "autocast", None)  # the newer name of fp8_autocast
    if autocast is not None:
        return autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def _fp8_recipe(config: EncoderConfig) -> Any:
    odd = [n for n, v in (("d_model", config.d_model), ("d_ffn", config.d_ffn)) if v % FP8_MULTIPLE]
    if odd:
        raise BackendError(f"fp8 needs {' and '.join(odd)} divisible by {FP8_MULTIPLE} for this model")
    from transformer_engine.common.recipe import DelayedScaling, Format

    # E4M3 forward; scales from the largest amax of the last 16 batches; no amax all-reduce, so
    # processes that run different numbers of batches (one per GPU) never wait on each other.
    return DelayedScaling(
        fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max", reduce_amax=False
    )


def build_te_encoder(encoder: Encoder, fp8: bool = False) -> TEEncoder:
    """The encoder with its blocks converted to Transformer Engine modules, in eval mode.

    Args:
        encoder: a loaded `Encoder` on a CUDA device in bfloat16 or float16. Its embedding, final
            norm and head are shared with the result; its blocks may be dropped afterwards.
        fp8: run the TE GEMMs in FP8 (compute capability 8.9+).
    Raises:
        BackendError: TE not importable (with an install hint), no CUDA, a CPU or float32 model,
            FP8 on a GPU or model shape that cannot run it, or TE modules whose parameters do not
            match the conversion table (an unsupported Transformer Engine version).
    """
    te = _import_te()
    device, dtype = encoder.embed.weight.device, encoder.embed.weight.dtype
    if device.type != "cuda":
        raise BackendError(f"the te backend needs the model on a CUDA device, not {device.type}")
    check_available(fp8, device)
    if dtype not in (torch.bfloat16, torch.float16):
        raise BackendError(
            f"the te backend runs in bfloat16 or float16, not {str(dtype).removeprefix('torch.')}"
        )
    c = encoder.config
    recipe = _fp8_recipe(c) if fp8 else None
    apply_fn = _rope_apply_fn(te, c.rotary_interleaved)
    with torch.cuda.device(device):  # TE allocates and initialises on the current device
        rotary = TERotary(encoder.rotary.inv_freq.to(device), c.rotary_interleaved, apply_fn)
        blocks = [TEBlock(te, c, i + 1, rotary, dtype, device) for i in range(c.n_layers)]
    model = TEEncoder(encoder, blocks, rotary, recipe)
    state = te_state_dict(encoder)
    expected = {
        k
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and v.numel() > 0 and not k.endswith("_extra_state")
    }
    if expected != set(state):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        version = getattr(te, "__version__", "?")
        raise BackendError(
            f"Transformer Engine {version} modules do not have the expected parameters "
            f"(not converted: {missing[:3]}; no TE home: {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)
