"""What the benchmark knows about a device: its name, its matmul peak, timing and memory.

A GPU's peak comes from a datasheet table by device name (measured when it is not listed); a CPU's
is measured, since it depends on the processor, the kernels available and the thread count.
"""

from __future__ import annotations

import platform
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch

from protembed.models.projections import onednn_available

# Dense (no sparsity) peak TFLOP/s by device name: (pattern, label, bf16/fp16 tensor, tf32 tensor, fp32).
# First match wins. Sources: NVIDIA datasheets (H100/H100 NVL, H200, A100, L40S, A10, V100) and the
# Ada whitepaper (RTX 4090, fp16/bf16 with fp32 accumulate); cross-checked against
# glennklockwood.com/garden/processors/{h100,A100} and the H100/L40S spec tables of resellers.
# None: no such tensor path (V100 has no bf16/tf32 units), so the peak is measured instead.
GPU_PEAKS: tuple[tuple[str, str, float | None, float | None, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0, 378.0, 51.0),
    (r"\bH100 NVL\b", "H100 NVL", 835.0, 418.0, 60.0),
    (r"\bH100\b", "H100 SXM", 989.0, 495.0, 67.0),
    (r"\bH200 NVL\b", "H200 NVL", 835.0, 418.0, 60.0),
    (r"\bH200\b", "H200", 989.0, 495.0, 67.0),
    (r"\bA100\b", "A100", 312.0, 156.0, 19.5),
    (r"\bL40S\b", "L40S", 362.0, 183.0, 91.6),
    (r"\bA10\b", "A10", 125.0, 62.5, 31.2),
    (r"\bRTX 4090\b", "RTX 4090", 165.0, 82.6, 82.6),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe", None, None, 14.0),
    (r"\bV100\b", "V100 SXM2", None, None, 15.7),
)
V100_FP16 = {"V100 PCIe": 112.0, "V100 SXM2": 125.0}


@dataclass(frozen=True)
class Peak:
    """The device's matmul peak for a dtype and where the figure comes from."""

    tflops: float
    source: str


def table_peak(device_name: str, dtype: torch.dtype, tf32: bool = False) -> Peak | None:
    """Dense datasheet peak of a known GPU for `dtype`; None when not listed or no such unit."""
    for pattern, label, half, tf32_peak, fp32 in GPU_PEAKS:
        if not re.search(pattern, device_name, flags=re.IGNORECASE):
            continue
        value: float | None
        if dtype == torch.float32:
            value, kind = (tf32_peak, "tf32 tensor") if tf32 and tf32_peak else (fp32, "fp32")
        elif dtype == torch.float16 and label in V100_FP16:
            value, kind = V100_FP16[label], "fp16 tensor"
        else:
            value, kind = half, f"{str(dtype).removeprefix('torch.')} tensor"
        return Peak(value, f"datasheet {label}, {kind} dense") if value else None
    return None


def measure_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """Best rate of square matrix products in `dtype` on `device` (size grows until one takes >= 50 ms).

    On CPU every kernel protembed's projections may take is timed, `torch.matmul` (MKL for float32),
    `F.linear` (float16 takes a kernel of its own there) and oneDNN (float32 and bfloat16, see
    `protembed.models.projections`), and the fastest is the peak: on AMD processors MKL's float32
    path is about half as fast as oneDNN's.
    """
    n, limit = 256, (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    # On CPU the size grows by F.linear, the projections' kernel: float16 `matmul` takes a fallback
    # about 8x slower there, which is timed only where it is the same kind of kernel.
    kind = "linear" if device.type == "cpu" else "matmul"
    product = torch.nn.functional.linear if kind == "linear" else torch.matmul
    while True:
        a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
        times = time_repeats(partial(product, a, b), device, 2)
        if times[-1] >= 0.05 or n >= limit:
            break
        n *= 2
    rates = {kind: 2 * n**3 / min(times + time_repeats(partial(product, a, b), device, 3))}
    if device.type == "cpu" and dtype != torch.float16:
        rates["matmul"] = 2 * n**3 / min(time_repeats(partial(torch.matmul, a, b), device, 3))
    n_best = n
    if device.type == "cpu" and onednn_available() and dtype in (torch.float32, torch.bfloat16):
        for m in (n, 2 * n):  # its rate still varies with size here: keep the best
            x, w = (torch.randn(m, m, generator=gen).to(dtype=dtype) for _ in range(2))
            onednn = partial(torch.ops.mkldnn._linear_pointwise, x, w, None, "none", [], "")
            rate = 2 * m**3 / min(time_repeats(onednn, device, 4))
            if rate > rates.get("oneDNN matmul", 0.0):
                rates["oneDNN matmul"], n_best = rate, m
    kind, rate = max(rates.items(), key=lambda item: item[1])
    size = n_best if kind == "oneDNN matmul" else n
    n_threads = torch.get_num_threads()
    threads = f", {n_threads} thread{'' if n_threads == 1 else 's'}" if device.type == "cpu" else ""
    return Peak(rate / 1e12, f"measured {size}x{size} {kind}{threads}")


@cache
def _cpu_peak(dtype: torch.dtype, threads: int) -> Peak:
    return measure_peak(torch.device("cpu"), dtype)


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """CUDA: datasheet table by device name, else measured; CPU: measured (cached per dtype, threads)."""
    if device.type == "cpu":
        return _cpu_peak(dtype, torch.get_num_threads())
    if device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        found = table_peak(torch.cuda.get_device_name(device), dtype, tf32)
        if found:
            return found
    return measure_peak(device, dtype)


def device_name(device: torch.device) -> str:
    """Marketing name of a CUDA device or the CPU model (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return str(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn`, each bracketed by device synchronisation."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def cpu_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (process-wide, never decreases)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
