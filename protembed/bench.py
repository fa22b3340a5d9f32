"""Throughput benchmark of the embedding path: workloads, timing, FLOP count, device peak, memory.

What is timed is what users get: `Model.embed` (tokenise, pack, forward, mean-pool, copy to host)
over a whole workload, once per repeat, with the device synchronised before and after. A warm-up
pass over the first two batches runs untimed first.

FLOP count (forward pass, multiply-add = 2 FLOPs), per layer and per sequence of T tokens
(T = residues + 2 for BOS/EOS), with D = d_model and F = FFN width:

    dense      2 * T * (4*D*D + 2*D*F)   GELU FFN (ESM-2): Q, K, V, O projections + up + down
               2 * T * (4*D*D + 3*D*F)   SwiGLU FFN (AMPLIFY): the up projection has 2F rows
    attention  4 * T*T * D               Q K^T and P V over all heads

summed over layers and sequences, real tokens only (what packed batches compute; padding is never
counted, so runners that pad are not credited for it). Embedding lookup, norms, softmax,
activations, rotary, biases, pooling and the LM head (not run) are left out: all O(T*D).
Achieved TFLOP/s = that count / median wall time of one pass.
"""

from __future__ import annotations

import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch

from protembed.alphabet import Alphabet
from protembed.api import Model
from protembed.batching import token_batches
from protembed.errors import ProtembedError
from protembed.fasta import iter_records, scan_fasta
from protembed.models.encoder import EncoderConfig
from protembed.models.projections import onednn_available

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
WARMUP_BATCHES = 2

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


class BenchError(ProtembedError):
    """A benchmark that cannot run as asked (bad option values, unlike comparison)."""


@dataclass(frozen=True)
class Workload:
    """Sequences to embed: synthetic at one length (`length` set) or read from a FASTA file."""

    name: str
    sequences: list[str]
    length: int | None = None
    truncated: int = 0  # sequences cut to the model's maximum length

    @property
    def n_residues(self) -> int:
        return sum(len(s) for s in self.sequences)


def synthetic_workload(length: int, tokens_per_batch: int, n_batches: int, seed: int = 0) -> Workload:
    """`n_batches` full batches of random sequences (20 standard residues) of `length` residues."""
    per_batch = max(1, tokens_per_batch // (length + 2))
    rng = np.random.default_rng(seed + length)
    letters = np.frombuffer(AMINO_ACIDS.encode(), dtype=np.uint8)
    rows = letters[rng.integers(0, len(AMINO_ACIDS), size=(per_batch * n_batches, length))]
    return Workload(f"L={length}", [r.tobytes().decode() for r in rows], length=length)


def fasta_workload(path: Path, alphabet: Alphabet, max_residues: int) -> Workload:
    """Sequences of a FASTA file (validated), upper-cased and cut to `max_residues` (cuts counted)."""
    index = scan_fasta(path, alphabet)
    try:
        seqs = [seq.upper().removesuffix("*") for _, seq in iter_records(index)]
    finally:
        index.cleanup()
    cut = sum(len(s) > max_residues for s in seqs)
    return Workload(Path(path).name, [s[:max_residues] for s in seqs], truncated=cut)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of a workload, split into dense matmuls and attention."""

    dense: int
    attention: int

    @property
    def total(self) -> int:
        return self.dense + self.attention


def forward_flops(token_counts: Iterable[int], config: EncoderConfig) -> FlopCount:
    """FLOPs of one forward pass over sequences of the given token counts (formula above)."""
    d, f = config.d_model, config.d_ffn
    ffn = 3 if config.activation == "swiglu" else 2
    t = np.asarray(list(token_counts), dtype=np.int64)
    dense = config.n_layers * 2 * int(t.sum()) * (4 * d * d + ffn * d * f)
    attention = config.n_layers * 4 * int((t * t).sum()) * d
    return FlopCount(dense, attention)


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
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
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


Placement = tuple[torch.dtype, torch.device]


def check_like_with_like(ours: Placement, ref: Placement) -> None:
    """Refuse a comparison whose reference runs in another dtype or on another device.

    Args:
        ours, ref: (dtype, device) of protembed and of the reference.
    """
    for what, mine, theirs in (("dtype", ours[0], ref[0]), ("device", ours[1], ref[1])):
        if mine != theirs:
            raise BenchError(
                f"compare refused: the reference runs in {theirs}, protembed in {mine} "
                f"(unlike {what}s; compare only like with like)"
            )


@dataclass
class Runner:
    """An embedding method under test.

    embed(sequences, tokens_per_batch) returns residue-mean embeddings [n, D] in input order;
    batches(lengths, tokens_per_batch) returns (number of batches, tokens fed incl. padding).
    """

    name: str
    embed: Callable[[list[str], int], np.ndarray]
    batches: Callable[[list[int], int], tuple[int, int]]
    weight_bytes: int
    dtype: torch.dtype
    device: torch.device


def protembed_runner(model: Model) -> Runner:
    """`Model.embed` with mean pooling of the last layer, as the embed command runs it."""

    def embed(seqs: list[str], budget: int) -> np.ndarray:
        return model.embed(seqs, tokens_per_batch=budget).pooled["mean"][:, 0]

    def batches(lengths: list[int], budget: int) -> tuple[int, int]:
        tokens = np.asarray(lengths) + 2
        return len(token_batches(tokens, budget)), int(tokens.sum())

    enc = model.encoder
    size = sum(p.numel() * p.element_size() for p in enc.parameters())
    return Runner("protembed", embed, batches, size, enc.embed.weight.dtype, model.device)


@dataclass
class RunStats:
    """Timings and rates of one runner on one configuration."""

    runner: str
    times_s: list[float]
    n_batches: int
    padding_fraction: float  # share of padding among the tokens fed to the model
    residues_per_s: float
    seqs_per_s: float
    batch_latency_ms: dict[str, float]  # median, min, max over repeats
    tflops: float
    pct_of_peak: float
    peak_memory_mb: float


def measure(
    runner: Runner, workload: Workload, budget: int, repeats: int, flops: int, peak: Peak
) -> tuple[RunStats, np.ndarray]:
    """Warm up, then time `repeats` passes of `runner` over the workload; returns stats and embeddings."""
    seqs, device = workload.sequences, runner.device
    lengths = [len(s) for s in seqs]
    n_batches, fed = runner.batches(lengths, budget)
    first = token_batches(np.asarray(lengths) + 2, budget)[:WARMUP_BATCHES]
    runner.embed([seqs[i] for b in first for i in b], budget)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out: list[np.ndarray] = []
    times = time_repeats(lambda: out.append(runner.embed(seqs, budget)), device, repeats)
    if device.type == "cuda":
        memory = (torch.cuda.max_memory_allocated(device) - base + runner.weight_bytes) / 2**20
    else:
        memory = cpu_peak_rss_mb()
    med = statistics.median(times)
    per_batch = [round(1e3 * t / n_batches, 3) for t in times]
    tflops = flops / med / 1e12
    stats = RunStats(
        runner=runner.name,
        times_s=[round(t, 6) for t in times],
        n_batches=n_batches,
        padding_fraction=round(1 - (sum(lengths) + 2 * len(seqs)) / fed, 4),
        residues_per_s=round(sum(lengths) / med, 2),
        seqs_per_s=round(len(seqs) / med, 3),
        batch_latency_ms={
            "median": statistics.median(per_batch),
            "min": min(per_batch),
            "max": max(per_batch),
        },
        tflops=round(tflops, 6),
        pct_of_peak=round(100 * tflops / peak.tflops, 3),
        peak_memory_mb=round(memory, 1),
    )
    return stats, out[-1]


@dataclass
class ConfigResult:
    """One (workload, token budget) configuration: protembed and, when compared, the reference."""

    workload: str
    length: int | None
    tokens_per_batch: int
    n_seqs: int
    n_residues: int
    n_tokens: int
    gflop: float  # forward FLOPs of one pass (real tokens), in GFLOP
    attention_gflop: float
    protembed: RunStats
    reference: RunStats | None = None
    speedup: float | None = None  # protembed residues/s over the reference's
    max_abs_diff: float | None = None  # of the mean embeddings, protembed vs reference


def bench_config(
    ours: Runner,
    workload: Workload,
    budget: int,
    repeats: int,
    config: EncoderConfig,
    peak: Peak,
    reference: Runner | None = None,
) -> ConfigResult:
    """Measure protembed (and the reference, when given) on one workload and token budget."""
    if reference is not None:
        check_like_with_like((ours.dtype, ours.device), (reference.dtype, reference.device))
    tokens = [len(s) + 2 for s in workload.sequences]
    flops = forward_flops(tokens, config)
    stats, emb = measure(ours, workload, budget, repeats, flops.total, peak)
    result = ConfigResult(
        workload.name,
        workload.length,
        budget,
        len(tokens),
        workload.n_residues,
        sum(tokens),
        round(flops.total / 1e9, 4),
        round(flops.attention / 1e9, 4),
        stats,
    )
    if reference is not None:
        ref_stats, ref_emb = measure(reference, workload, budget, repeats, flops.total, peak)
        result.reference = ref_stats
        result.speedup = round(stats.residues_per_s / ref_stats.residues_per_s, 3)
        result.max_abs_diff = float(np.abs(emb - ref_emb).max())
    return result
