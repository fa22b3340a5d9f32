"""Execution backends wrapped around a finished encoder: plain PyTorch (optionally compiled)
or NVIDIA Transformer Engine. The plain PyTorch encoder is the reference every backend matches.

    torch  the eager encoder; `compile=True` runs it through `torch.compile` (CPU and CUDA)
    te     Transformer Engine modules converted from the loaded weights (CUDA, bf16/fp16, fp8)
    auto   te when Transformer Engine is installed, the device is CUDA and the dtype is not
           float32; torch otherwise
An explicitly requested backend that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

from typing import cast

import torch

from protembed.errors import BackendError, OptionError
from protembed.models.encoder import Encoder

BACKENDS = ("auto", "torch", "te")


def resolve_backend(backend: str, device: str, dtype: str, compile: bool) -> str:
    """The backend that will run ("torch" or "te"), checked before any weights are loaded."""
    if backend not in BACKENDS:
        raise OptionError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    is_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        from protembed.models import te

        use_te = is_cuda and dtype != "float32" and not compile and te.is_available()
        backend = "te" if use_te else "torch"
    if backend == "te":
        from protembed.models import te

        if compile:
            raise OptionError("--compile applies to the torch backend; Transformer Engine is fused already")
        te.check_available(fp8=dtype == "fp8", device=torch.device(device))  # before advice on dtype
        if dtype == "float32":
            raise OptionError("--backend te runs in bfloat16, float16 or fp8; add --dtype bfloat16")
    elif dtype == "fp8":
        raise OptionError(
            "--dtype fp8 needs --backend te (Transformer Engine on an Ada, Hopper or newer GPU)"
        )
    return backend


def describe(backend: str, dtype: str, compile: bool) -> str:
    """What ran, for summaries and the HDF5 `backend` attribute: torch, torch+compile, te, te+fp8."""
    if backend == "te":
        return "te+fp8" if dtype == "fp8" else "te"
    return "torch+compile" if compile else "torch"


def prepare(encoder: Encoder, backend: str, dtype: str, compile: bool) -> Encoder:
    """Wrap a loaded encoder for its backend (same forward signature and layer numbering)."""
    if backend == "te":
        from protembed.models.te import build_te_encoder

        return build_te_encoder(encoder, fp8=dtype == "fp8")
    if compile:
        encoder.workspace.enabled = False  # out= variants and reused buffers are for eager mode
        # Fill the rotary tables for every position now: a compiled call that fills them would
        # change what the graph was traced with, and the next call would compile again.
        device = next(encoder.parameters()).device
        encoder.rotary.tables(encoder.config.max_residues + 2, device)
        try:  # the compiled module forwards attributes and calls to the encoder it wraps
            return cast(Encoder, torch.compile(encoder, dynamic=True))
        except RuntimeError as exc:  # e.g. no C++ compiler for inductor on CPU
            raise BackendError(f"--compile: torch.compile is not usable here ({exc})") from None
    return encoder
