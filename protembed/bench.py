"""Throughput benchmark of the embedding path: workloads, FLOP count and timed runs (device facts: `peaks`).

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

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protembed.alphabet import MASK_TEXT, Alphabet
from protembed.api import Model
from protembed.batching import token_batches
from protembed.errors import ProtembedError
from protembed.fasta import iter_records, scan_fasta
from protembed.models.encoder import EncoderConfig
from protembed.peaks import Peak, cpu_peak_rss_mb, synchronize, time_repeats

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
WARMUP_BATCHES = 2
# Agreement bound for --compare: max |Δ| of the mean embeddings relative to their largest |value|
# (at least 1). Loose on purpose: it flags gross disagreement (other weights or tokens, a bug), not
# rounding. Seen on CPU with random weights: float32 ~2e-6, float16 ~1e-3, bfloat16 ~1e-2.
PARITY_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.1}


class BenchError(ProtembedError):
    """A benchmark that cannot run as asked (bad option values, unlike comparison)."""


@dataclass(frozen=True)
class Workload:
    """Sequences to embed: synthetic at one length (`length` set) or read from a FASTA file.

    `lengths` counts residue tokens, not characters: the text `<mask>` is one residue.
    """

    name: str
    sequences: list[str]
    lengths: list[int]
    length: int | None = None
    truncated: int = 0  # sequences cut to the model's maximum length

    @property
    def n_residues(self) -> int:
        return sum(self.lengths)


def synthetic_workload(length: int, tokens_per_batch: int, n_batches: int, seed: int = 0) -> Workload:
    """`n_batches` full batches of random sequences (20 standard residues) of `length` residues."""
    per_batch = max(1, tokens_per_batch // (length + 2))
    rng = np.random.default_rng(seed + length)
    letters = np.frombuffer(AMINO_ACIDS.encode(), dtype=np.uint8)
    rows = letters[rng.integers(0, len(AMINO_ACIDS), size=(per_batch * n_batches, length))]
    seqs = [r.tobytes().decode() for r in rows]
    return Workload(f"L={length}", seqs, [length] * len(seqs), length=length)


def fasta_workload(path: Path, alphabet: Alphabet, max_residues: int) -> Workload:
    """Sequences of a FASTA file (validated), each cut to its first `max_residues` tokens (cuts counted)."""
    index = scan_fasta(path, alphabet)
    seqs: list[str] = []
    lengths: list[int] = []
    cut = 0
    try:
        for row, seq in iter_records(index):  # validated by the scan, which counted the tokens
            seq = seq.removesuffix("*")
            if index.n_residues[row] > max_residues:
                cut += 1
                ids = alphabet.residue_ids(seq)[:max_residues]
                masks = int(np.count_nonzero(ids == alphabet.mask))
                seq = seq[: max_residues + masks * (len(MASK_TEXT) - 1)]  # `<mask>` is 6 characters
            seqs.append(seq)
            lengths.append(min(int(index.n_residues[row]), max_residues))
    finally:
        index.cleanup()
    return Workload(Path(path).name, seqs, lengths, truncated=cut)


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
    runners: list[Runner], workload: Workload, budget: int, repeats: int, flops: int, peak: Peak
) -> list[tuple[RunStats, np.ndarray]]:
    """Warm every runner up, then time `repeats` rounds in which each makes one pass over the
    workload, in an order reversed every round (A B, B A, ...), so that load from elsewhere on a
    shared machine falls on all of them alike. Returns each runner's stats and embeddings."""
    seqs, lengths = workload.sequences, workload.lengths
    first = token_batches(np.asarray(lengths) + 2, budget)[:WARMUP_BATCHES]
    for runner in runners:
        runner.embed([seqs[i] for b in first for i in b], budget)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    memory = dict.fromkeys(times, 0.0)
    out: dict[str, np.ndarray] = {}
    for round_ in range(repeats):
        for runner in runners if round_ % 2 == 0 else runners[::-1]:
            device = runner.device
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)

            def one_pass(r: Runner = runner) -> None:
                out[r.name] = r.embed(seqs, budget)

            times[runner.name] += time_repeats(one_pass, device, 1)
            if device.type == "cuda":
                used = (torch.cuda.max_memory_allocated(device) - base + runner.weight_bytes) / 2**20
            else:
                used = cpu_peak_rss_mb()
            memory[runner.name] = max(memory[runner.name], used)
    return [
        (_stats(r, workload, budget, times[r.name], memory[r.name], flops, peak), out[r.name])
        for r in runners
    ]


def _stats(
    runner: Runner, workload: Workload, budget: int, times: list[float], memory: float, flops: int, peak: Peak
) -> RunStats:
    """A runner's rates from its pass times (the median pass)."""
    seqs, lengths = workload.sequences, workload.lengths
    n_batches, fed = runner.batches(lengths, budget)
    med = statistics.median(times)
    per_batch = [round(1e3 * t / n_batches, 3) for t in times]
    tflops = flops / med / 1e12
    return RunStats(
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
    parity_tolerance: float | None = None  # the largest max_abs_diff counted as agreement

    @property
    def disagrees(self) -> bool:
        """Whether the two runners' embeddings differ by more than rounding can explain."""
        if self.max_abs_diff is None or self.parity_tolerance is None:
            return False
        return not self.max_abs_diff <= self.parity_tolerance  # NaN disagrees


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
    tokens = [n + 2 for n in workload.lengths]
    flops = forward_flops(tokens, config)
    runners = [ours] if reference is None else [ours, reference]
    [(stats, emb), *compared] = measure(runners, workload, budget, repeats, flops.total, peak)
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
    if compared:
        [(ref_stats, ref_emb)] = compared
        result.reference = ref_stats
        result.speedup = round(stats.residues_per_s / ref_stats.residues_per_s, 3)
        result.max_abs_diff = float(np.abs(emb - ref_emb).max())
        scale = max(1.0, float(np.abs(ref_emb).max()))
        result.parity_tolerance = float(f"{PARITY_TOLERANCE[ours.dtype] * scale:.3g}")
    return result
