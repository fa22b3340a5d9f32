"""`embed_fasta`: a FASTA file to one HDF5 file on one device, streaming, resumable.

Stages (each a plain function or thread, connected by bounded queues so that reading and
tokenising, compute, and writing overlap):

    scan_fasta (validate everything, before the model loads)
      -> reader thread: read records, tokenise, collect a window, cut it into length-sorted
         token-budget batches (identical sequences are computed once)
      -> main thread: packed forward + pooling on the device
      -> writer thread: copy results to every row that holds the same sequence, write rows
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protembed.alphabet import ALPHABETS, Alphabet
from protembed.batching import default_token_budget, token_batches
from protembed.compute import BatchResult, run_batch
from protembed.errors import OptionError
from protembed.fasta import FastaIndex, duplicate_groups, iter_records, scan_fasta
from protembed.models import checkpoints
from protembed.models.encoder import Encoder, EncoderConfig, resolve_layers
from protembed.pooling import POOLINGS
from protembed.store import EmbeddingWriter
from protembed.windows import combine, split

WINDOW_TOKENS = 1 << 21  # tokens read ahead and length-sorted together (bounded memory)
FLUSH_SECONDS = 5.0  # rows reach the disk at least this often
LONG_POLICIES = ("truncate", "window")
STORE_DTYPES = ("float32", "float16")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EmbedSummary:
    """What a run did; `as_dict()` is the `--json` output."""

    output: str
    model: str
    device: str
    layers: list[int]
    records: int
    residues: int
    computed: int  # distinct sequences embedded in this run
    resumed: int  # rows already in the output from an earlier run
    duplicates: int  # rows copied from an identical sequence
    truncated: int
    skipped: int
    elapsed_s: float
    residues_per_s: float
    output_bytes: int
    skip_reasons: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelRef:
    """A model located on disk, with its architecture read and nothing loaded."""

    name: str
    source: str
    revision: str
    path: Path
    config: EncoderConfig


def locate_model(model: str, revision: str | None = None, progress: bool = True) -> ModelRef:
    """Registry name, Hub repo id (downloaded if not cached) or local directory -> `ModelRef`."""
    path = Path(model).expanduser()
    if path.is_dir():
        config = checkpoints.read_config(path)
        return ModelRef(model, str(path.resolve()), weights_sha256(path), path, config)
    from protembed.hub import resolve_model

    resolved = resolve_model(model, revision=revision, progress=progress)
    config = checkpoints.read_config(resolved.path)
    return ModelRef(resolved.name or model, resolved.source, resolved.revision, resolved.path, config)


def weights_sha256(path: Path) -> str:
    """SHA-256 over a local checkpoint's weight files (its `model_revision`)."""
    digest = hashlib.sha256()
    for f in checkpoints.weight_files(path):
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def check_options(
    poolings: Sequence[str], long_policy: str, dtype: str, store_dtype: str, on_invalid: str
) -> None:
    """Refuse impossible option values before anything is read."""
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        raise OptionError(f"unknown pooling {', '.join(bad) or '(none)'}; choose from {', '.join(POOLINGS)}")
    for value, allowed, what in (
        (long_policy, LONG_POLICIES, "--long"),
        (dtype, tuple(COMPUTE_DTYPES), "--dtype"),
        (store_dtype, STORE_DTYPES, "--store-dtype"),
        (on_invalid, ("error", "skip"), "--on-invalid"),
    ):
        if value not in allowed:
            raise OptionError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def embed_fasta(
    input_path: str | Path,
    output: str | Path,
    *,
    model: str = "esm2-650m",
    revision: str | None = None,
    layers: Sequence[int | str] = (-1,),
    poolings: Sequence[str] = ("mean",),
    per_residue: bool = False,
    dtype: str = "float32",
    store_dtype: str = "float32",
    tokens_per_batch: int | None = None,
    max_length: int | None = None,
    long_policy: str = "truncate",
    device: str | None = None,
    overwrite: bool = False,
    on_invalid: str = "error",
    compression: str | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    started: Callable[[int, int], None] | None = None,
) -> EmbedSummary:
    """Embed every record of a FASTA file into one HDF5 file (layout: README, "HDF5 layout").

    `progress(rows_done, residues_done, n_rows)` is called as rows are written; `started(rows,
    residues)` once the work is known (rows and residues still to compute).
    """
    t0 = time.perf_counter()
    check_options(poolings, long_policy, dtype, store_dtype, on_invalid)
    ref = locate_model(model, revision)
    cfg = ref.config
    try:
        layer_idx = resolve_layers(list(layers), cfg)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    limit = max_length or cfg.max_residues
    if not 1 <= limit <= cfg.max_residues:
        raise OptionError(f"--max-length {limit} is outside 1..{cfg.max_residues} for {ref.name}")
    alphabet = ALPHABETS[cfg.family]
    index = scan_fasta(input_path, alphabet, on_invalid)
    try:
        return _run(index, output, ref, alphabet, layer_idx, list(poolings), per_residue, dtype, store_dtype,
                    tokens_per_batch, limit, long_policy, device, overwrite, compression, progress, started,
                    t0)  # fmt: skip
    finally:
        index.cleanup()


def _run(
    index: FastaIndex,
    output: str | Path,
    ref: ModelRef,
    alphabet: Alphabet,
    layer_idx: list[int],
    poolings: list[str],
    per_residue: bool,
    dtype: str,
    store_dtype: str,
    tokens_per_batch: int | None,
    limit: int,
    long_policy: str,
    device: str | None,
    overwrite: bool,
    compression: str | None,
    progress: Callable[[int, int, int], None] | None,
    started: Callable[[int, int], None] | None,
    t0: float,
) -> EmbedSummary:
    n_res = index.n_residues
    window = long_policy == "window"
    lengths = n_res if window else np.minimum(n_res, limit)
    truncated = np.zeros(len(index), dtype=bool) if window else n_res > limit
    attrs = {
        "model": ref.name, "model_source": ref.source, "model_revision": ref.revision,
        "layers": np.array(layer_idx, dtype=np.int64), "pooling": ",".join(poolings),
        "compute_dtype": dtype, "max_length": int(limit), "long_policy": long_policy,
        "input_sha256": index.sha256, "backend": "torch",
        "window_stride": int(max(limit // 2, 1)) if window else None,
    }  # fmt: skip
    writer = EmbeddingWriter.open(
        Path(output), attrs=attrs, ids=index.ids, descriptions=index.descriptions, lengths=lengths,
        truncated=truncated, skipped=index.skipped, skip_reasons=index.skip_reasons,
        n_layers=len(layer_idx), d_model=ref.config.d_model, poolings=poolings, per_residue=per_residue,
        store_dtype=store_dtype, compression=compression, overwrite=overwrite, flush_seconds=FLUSH_SECONDS,
    )  # fmt: skip
    resumed = int(np.count_nonzero(~index.skipped)) - writer.pending.size
    with writer:
        # Batches are formed over every row, not only the pending ones, so that a resumed run
        # computes exactly the batches an uninterrupted run would (bitwise-equal results).
        first_row_of = duplicate_groups(index.seq_hash, index.skipped)
        members = _members(np.flatnonzero(~index.skipped), first_row_of)
        pending = np.zeros(len(index), dtype=bool)
        pending[writer.pending] = True
        if started is not None:
            started(writer.pending.size, int(lengths[writer.pending].sum()))
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoder = checkpoints.load_checkpoint(ref.path, dtype=COMPUTE_DTYPES[dtype], device=dev)
        budget = tokens_per_batch or default_token_budget(ref.config, dev, COMPUTE_DTYPES[dtype])
        job = _Job(encoder, layer_idx, poolings, per_residue, limit, window, budget)
        _pipeline(job, index, alphabet, members, pending, writer, lengths, progress)
        writer.close(complete=True)
    elapsed = time.perf_counter() - t0
    computed = sum(1 for g in members.values() if pending[g].any())
    done_res = int(lengths[writer.pending].sum())
    return EmbedSummary(
        output=str(output), model=ref.name, device=str(dev), layers=layer_idx, records=len(index),
        residues=int(lengths[~index.skipped].sum()), computed=computed, resumed=resumed,
        duplicates=writer.pending.size - computed, truncated=int(truncated.sum()),
        skipped=int(index.skipped.sum()), elapsed_s=round(elapsed, 3),
        residues_per_s=round(done_res / elapsed, 1) if elapsed > 0 else 0.0,
        output_bytes=Path(output).stat().st_size, skip_reasons=dict(index.skip_reasons),
    )  # fmt: skip


def _members(pending: np.ndarray, first_row_of: np.ndarray) -> dict[int, np.ndarray]:
    """Representative row -> every pending row holding the same sequence (identical ones once)."""
    reps = first_row_of[pending]
    order = np.argsort(reps, kind="stable")
    reps, rows = reps[order], pending[order]
    starts = np.flatnonzero(np.r_[True, reps[1:] != reps[:-1]]) if reps.size else np.zeros(0, np.int64)
    groups = np.split(rows, starts[1:])
    return {int(reps[s]): g for s, g in zip(starts, groups)}


@dataclass
class _Job:
    encoder: Encoder
    layers: list[int]
    poolings: list[str]
    per_residue: bool
    limit: int
    window: bool
    budget: int


_DONE = object()


def _pipeline(
    job: _Job,
    index: FastaIndex,
    alphabet: Alphabet,
    members: dict[int, np.ndarray],
    pending: np.ndarray,
    writer: EmbeddingWriter,
    lengths: np.ndarray,
    progress: Callable[[int, int, int], None] | None,
) -> None:
    """Reader thread -> compute on this thread -> writer thread; the first error stops all."""
    batches: queue.Queue = queue.Queue(maxsize=8)
    results: queue.Queue = queue.Queue(maxsize=8)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            for item in _batches(job, index, alphabet, members, pending):
                while not stop.is_set():
                    try:
                        batches.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the main thread, which re-raises it
            errors.append(exc)
        batches.put(_DONE)

    def write() -> None:
        rows_done = res_done = 0
        total = int(pending.sum())
        try:
            while (item := results.get()) is not _DONE:
                reps, result = item
                rows, pooled, residues = _expand(reps, result, members, pending)
                writer.write(rows, pooled, residues)
                rows_done += rows.size
                res_done += int(lengths[rows].sum())
                if progress is not None:
                    progress(rows_done, res_done, total)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            while results.get() is not _DONE:  # drain so the producer never blocks
                pass

    reader = threading.Thread(target=read, name="protembed-reader", daemon=True)
    writer_thread = threading.Thread(target=write, name="protembed-writer", daemon=True)
    reader.start()
    writer_thread.start()
    try:
        while not errors and (item := batches.get()) is not _DONE:
            reps, tokens, pieces = item
            result = _compute(job, tokens, pieces)
            results.put((reps, result))
    finally:
        stop.set()
        results.put(_DONE)
        writer_thread.join()
        reader.join(timeout=5)
    if errors:
        raise errors[0]


def _batches(
    job: _Job, index: FastaIndex, alphabet: Alphabet, members: dict[int, np.ndarray], pending: np.ndarray
) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[list[int]] | None]]:
    """(representative rows, token arrays, window starts or None) of the batches still to compute."""
    rows: list[int] = []
    tokens: list[np.ndarray] = []
    held = 0
    for row, seq in iter_records(index):
        if row not in members:
            continue
        ids = alphabet.encode(seq, record=index.ids[row])
        if ids.size - 2 > job.limit:
            if job.window:
                if pending[members[row]].any():
                    pieces, starts = split(ids, job.limit)
                    yield np.array([row]), pieces, [starts]
                continue
            ids = np.concatenate([ids[: job.limit + 1], ids[-1:]])
        rows.append(row)
        tokens.append(ids)
        held += ids.size
        if held >= WINDOW_TOKENS:
            yield from _sorted_batches(rows, tokens, job.budget, members, pending)
            rows, tokens, held = [], [], 0
    yield from _sorted_batches(rows, tokens, job.budget, members, pending)


def _sorted_batches(
    rows: list[int],
    tokens: list[np.ndarray],
    budget: int,
    members: dict[int, np.ndarray],
    pending: np.ndarray,
) -> Iterator[tuple[np.ndarray, list[np.ndarray], None]]:
    if not rows:
        return
    row_arr = np.array(rows, dtype=np.int64)
    for idx in token_batches(np.array([t.size for t in tokens]), budget):
        reps = row_arr[idx]
        if any(pending[members[int(r)]].any() for r in reps):
            yield reps, [tokens[i] for i in idx], None


def _compute(job: _Job, tokens: list[np.ndarray], pieces: list[list[int]] | None) -> BatchResult:
    """One batch, or the windows of one long protein combined into full-length states."""
    if pieces is None:
        return run_batch(job.encoder, tokens, job.layers, job.poolings, job.per_residue)
    starts = pieces[0]
    per_window: list[np.ndarray] = [np.empty(0)] * len(tokens)
    cls_parts = []
    for idx in token_batches(np.array([t.size for t in tokens]), job.budget):
        part = run_batch(job.encoder, [tokens[i] for i in idx], job.layers, ["cls"], True)
        assert part.residues is not None
        for j, i in enumerate(idx):
            per_window[i] = part.residues[j]
        cls_parts.append(part.pooled["cls"])
    n_res = starts[-1] + tokens[-1].size - 2
    full = combine(per_window, starts, n_res)  # [R, K, D]
    pooled = {}
    for p in job.poolings:
        pooled[p] = (full.mean(axis=0) if p == "mean" else np.concatenate(cls_parts).mean(axis=0))[None]
    return BatchResult({k: v.astype(np.float32) for k, v in pooled.items()},
                       [full] if job.per_residue else None)  # fmt: skip


def _expand(
    reps: np.ndarray, result: BatchResult, members: dict[int, np.ndarray], pending: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray], list[np.ndarray] | None]:
    """Rows to write for computed representatives: every pending row with the same sequence."""
    groups = [g[pending[g]] for g in (members[int(r)] for r in reps)]
    counts = np.array([g.size for g in groups])
    rows = np.concatenate(groups)
    pooled = {k: np.repeat(v, counts, axis=0) for k, v in result.pooled.items()}
    residues = None
    if result.residues is not None:
        residues = [arr for arr, c in zip(result.residues, counts) for _ in range(c)]
    return rows, pooled, residues
