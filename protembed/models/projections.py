"""The encoder's matrix products: through oneDNN on x86 CPUs, else `torch.addmm`.

PyTorch sends a float32 matrix product on the CPU to MKL. On AMD processors MKL's sgemm takes
its AVX2 code path even where the CPU has AVX-512; oneDNN chooses its kernel from the instruction
set alone. On our 2-core AMD EPYC (Zen 5) a float32 [4096 x 480] @ [480 x 1920] product runs at
about 390 GFLOP/s through oneDNN and 175 through MKL. oneDNN also fuses the bias, the exact GELU
and the residual add into the product, saving passes over memory. Both compute in float32 with
float32 accumulation; only the summation order differs.

The oneDNN path (PyTorch's `torch.ops.mkldnn._linear_pointwise`, the kernel its own compiler
emits for CPU linears) runs when all of these hold, otherwise `torch.addmm` does:
    - the tensors are on an x86-64 CPU and PyTorch was built with oneDNN;
    - the dtype is float32 or bfloat16;
    - no gradient is wanted (the op has no backward);
    - the code is not being traced by `torch.compile` (which picks its own kernels).
The environment variable `PROTEMBED_ONEDNN=0` (or `ONEDNN = False` here) turns the path off,
e.g. to compare the two.
"""

from __future__ import annotations

import os
import platform
from functools import cache

import torch
from torch import nn

from protembed.models.attention import Workspace

ONEDNN = os.environ.get("PROTEMBED_ONEDNN", "1") != "0"
# oneDNN keeps 1024 compiled kernels by default; every batch has a new row count, so old ones are
# never reused and only hold memory (esm2-35m: about 70 MB). Set before oneDNN's first use.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
_DTYPES = (torch.float32, torch.bfloat16)


@cache
def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused linear on an x86-64 CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor, layer: nn.Linear) -> bool:
    if torch.compiler.is_compiling():
        return False
    if not (ONEDNN and x.device.type == "cpu" and x.dtype in _DTYPES and layer.weight.dtype == x.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
        return False
    return onednn_available()


def project(x: torch.Tensor, layer: nn.Linear, ws: Workspace | None = None, name: str = "") -> torch.Tensor:
    """`layer(x)` for 2-D `x`; on the addmm path written into the workspace buffer `name` if given."""
    if _use_onednn(x, layer):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    out = ws.get(name, (x.shape[0], layer.out_features), x) if ws is not None else None
    if out is None:
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


def project_gelu(
    x: torch.Tensor, layer: nn.Linear, ws: Workspace | None = None, name: str = ""
) -> torch.Tensor:
    """Exact (erf) GELU of `layer(x)` (see `project`)."""
    if _use_onednn(x, layer):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "none")
    return torch.ops.aten.gelu_(project(x, layer, ws, name))


def project_add(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """`layer(x) + residual`, a new tensor (`residual` is left as it is)."""
    if _use_onednn(x, layer) and residual.dtype == x.dtype and residual.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
    return project(x, layer).add_(residual)
