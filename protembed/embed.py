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

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from protembed import torchrun
from protembed.alphabet import ALPHABETS
from protembed.backends import describe, prepare, resolve_backend
from protembed.batching import default_token_budget
from protembed.compute import COMPUTE_DTYPES, JobSpec
from protembed.embed_setup import (
    Plan,
    check_model_options,
    check_options,
    check_output_folder,
    locate_model,
)
from protembed.errors import OptionError, OutputCompleteError
from protembed.fasta import FastaIndex, duplicate_groups, index_part, scan_fasta
from protembed.fasta_io import check_exists, is_stream
from protembed.merge import shard_ranges
from protembed.models import checkpoints
from protembed.models.encoder import EncoderConfig
from protembed.parallel import WorkerPool, device_label, parse_devices, uses_workers
from protembed.pipeline import (
    Executor,
    LocalExecutor,
    Members,
    Progress,
    Work,
    plan_members,
    read_windows,
    run_pipeline,
)
from protembed.pooling import pooling_names
from protembed.reader import H5_ERRORS
from protembed.registry import lookup
from protembed.store import EmbeddingWriter

FLUSH_SECONDS = 5.0  # rows reach the disk at least this often


@dataclass
class EmbedSummary:
    """What a run did; `as_dict()` is the `--json` output."""

    output: str
    model: str
    device: str
    backend: str
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
    ranks: int = 1  # torchrun: the counts above are the whole job's, summed over its ranks

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed_fasta(
    input_path: str | Path,
    output: str | Path,
    *,
    model: str | Path = "esm2-650m",
    revision: str | None = None,
    layers: Sequence[int | str] | int | str = (-1,),
    poolings: Sequence[str] | str = ("mean",),
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
    merge: bool = True,
    backend: str = "auto",
    compile: bool = False,
    progress: Progress | None = None,
    started: Callable[[int, int], None] | None = None,
    quiet: bool = False,
    cache_dir: Path | None = None,
) -> EmbedSummary:
    """Embed every record of a FASTA file into one HDF5 file (layout: README, "HDF5 output").

    Under `torchrun` (WORLD_SIZE > 1) each rank embeds its share into a shard file and rank 0
    joins the shards when all are done (`merge=False`: a virtual-dataset file over them).
    `progress(rows_done, residues_done, n_rows)` is called as rows are written; `started(rows,
    residues)` once the work is known (rows and residues still to compute). `quiet` hides the
    download progress of a model that is not cached yet, and rank 0's merge progress lines.
    `cache_dir` is the protembed cache that remembers a local checkpoint's weights digest
    (default: `cache.default_cache_dir()`).
    """
    t0 = time.perf_counter()
    model = str(model)  # a checkpoint folder may be a Path
    poolings = pooling_names(poolings)
    check_options(poolings, long_policy, dtype, store_dtype, on_invalid, tokens_per_batch, compression)
    devices = parse_devices(device)  # a bad --device or --backend fails before the input is read
    resolved = resolve_backend(backend, devices[0], dtype, compile)
    check_output_folder(Path(output))  # before a download or weight hashing, not after
    dist = torchrun.distributed_env()
    # a pipe of the launching shell (`<(zcat x.gz)`) does not reach the ranks at all
    if dist is not None and (is_stream(input_path) or str(input_path).startswith(("/dev/fd/", "/proc/"))):
        raise OptionError(
            f"{'standard input' if str(input_path) == '-' else f'{input_path} (a pipe)'} cannot be shared "
            "by the ranks of a torchrun job; give a file"
        )
    check_exists(input_path)  # a missing input is named before any complaint about the output
    if dist is None:
        torchrun.check_single_process_output(Path(output), overwrite)
    # Validate the options and the whole input as soon as the model's shape is known, so that a
    # bad record fails in seconds, not after a download or weight hashing: now for a registry
    # model or a local checkpoint (whose weights are hashed later), else once a Hub model's
    # config.json has arrived and before its weights are fetched.
    local = checkpoints.local_checkpoint(model, revision)
    info = None if local is not None else lookup(model)
    early = checkpoints.registry_config(info.name) if info is not None else None
    if local is not None:
        early = checkpoints.read_config(local)
    scanned: list[FastaIndex] = []

    def validate(cfg: EncoderConfig) -> None:
        check_model_options(cfg, model, layers, max_length)
        # a torchrun rank reads the headers of its own rows only, once it knows them
        scanned.append(scan_fasta(input_path, ALPHABETS[cfg.family], on_invalid, headers=dist is None))

    if early is not None:
        validate(early)
    try:
        ref = locate_model(
            model, revision, progress=not quiet, on_config=None if scanned else validate, cache_dir=cache_dir
        )
        layer_idx, limit = check_model_options(ref.config, ref.name, layers, max_length)
        if not scanned:  # a Hub model that was already cached
            validate(ref.config)
    except BaseException:
        for index in scanned:
            index.cleanup()
        raise
    alphabet = ALPHABETS[ref.config.family]
    plan = Plan(ref, alphabet, layer_idx, list(poolings), per_residue, dtype, store_dtype, tokens_per_batch,
                 limit, long_policy, device, overwrite, compression, resolved, compile)  # fmt: skip
    if dist is not None:  # passed on, not kept here: the rank drops it once it has its own part
        return _embed_shard(scanned.pop(), Path(output), plan, dist, merge, progress, started, t0, quiet)
    index = scanned.pop()
    try:
        return _embed_rows(index, Path(output), plan, {}, progress, started, t0)
    finally:
        index.cleanup()


def _embed_shard(
    index: FastaIndex,
    output: Path,
    plan: Plan,
    dist: tuple[int, int, int],
    merge: bool,
    progress: Progress | None,
    started: Callable[[int, int], None] | None,
    t0: float,
    quiet: bool,
) -> EmbedSummary:
    """This rank's rows into its shard file; rank 0 joins the shards once every rank is done.

    `index` covers the whole input without headers; the rank keeps only its own part of it.
    """
    rank, world, local_rank = dist
    torchrun.check_output(output, world, merge, plan.overwrite)
    if plan.device is None:
        plan.device = torchrun.rank_device(local_rank)
    if rank == 0:
        torchrun.note_stale_shards(output, world)
    n_tokens = plan.token_counts(index.n_residues, index.skipped)
    window_of = read_windows(n_tokens)
    start, stop = shard_ranges(n_tokens, window_of, world)[rank]
    windows = (window_of[start:stop].copy(), int(window_of[-1]))
    job_reasons = index.skip_reasons
    del n_tokens, window_of
    index = index_part(index, start, stop)
    shard_attrs = {"shard_start": start, "shard_stop": stop, "shard_rank": rank, "shard_world_size": world}

    def embed_shard(shard: Path) -> EmbedSummary:
        summary = _embed_rows(
            index, shard, plan, shard_attrs, progress, started, t0, windows=windows, complete_ok=True
        )
        return _job_summary(summary, job_reasons, world)

    summary = torchrun.run_rank(output, rank, world, merge, plan.overwrite, embed_shard, quiet)
    summary.output, summary.output_bytes = str(output), output.stat().st_size if rank == 0 else 0
    summary.elapsed_s = round(time.perf_counter() - t0, 3)  # the merge included
    return summary


def _job_summary(shard: EmbedSummary, skip_reasons: dict[int, str], world: int) -> EmbedSummary:
    """The whole job's counts from one rank's (a collective: every rank calls it once);
    `skip_reasons` are the whole input's, by input row."""
    fields = ("records", "residues", "computed", "resumed", "duplicates", "truncated", "skipped")
    done = shard.residues_per_s * shard.elapsed_s  # residues this rank computed
    sums, slowest = torchrun.sum_over_ranks([*(getattr(shard, f) for f in fields), done], shard.elapsed_s)
    totals: dict[str, Any] = {f: int(v) for f, v in zip(fields, sums, strict=False)}
    device = f"{world} ranks (rank 0: {shard.device})"
    return replace(shard, **totals, device=device, ranks=world, skip_reasons=dict(skip_reasons),
                   residues_per_s=round(sums[-1] / max(slowest, 1e-9), 1))  # fmt: skip


def _windows(index: FastaIndex, plan: Plan) -> tuple[np.ndarray, int]:
    """Read-ahead window of each row, and the input's last window (see `pipeline.read_windows`)."""
    window_of = read_windows(plan.token_counts(index.n_residues, index.skipped))
    return window_of, int(window_of[-1])


def recorded_budget(output: Path) -> int | None:
    """The `tokens_per_batch` of an existing output (to resume with the same batches), else None."""
    try:
        with h5py.File(output, "r") as h5:
            value = h5.attrs.get("tokens_per_batch")
    except H5_ERRORS:  # no such file, not HDF5, damaged: the writer says which
        return None
    return int(value) if value is not None else None


def _embed_rows(
    index: FastaIndex,
    output: Path,
    plan: Plan,
    extra_attrs: dict[str, Any],
    progress: Progress | None,
    started: Callable[[int, int], None] | None,
    t0: float,
    windows: tuple[np.ndarray, int] | None = None,
    complete_ok: bool = False,
) -> EmbedSummary:
    """Embed the rows of `index` into `output` (the whole input, or a torchrun rank's part).

    `windows`: a part's read-ahead windows and the input's last one, as the whole input has them
    (`_windows`), so that it computes the batches a single process would. `complete_ok`: an output
    already complete with these settings is done (nothing computed); for shards, which a job's
    earlier run may have finished while others did not.
    """
    devices = parse_devices(plan.device)
    window = plan.long_policy == "window"
    lengths = plan.stored_lengths(index.n_residues)
    truncated = np.zeros(len(index), dtype=bool) if window else index.n_residues > plan.limit
    skipped = index.skipped
    torch_dtype = COMPUTE_DTYPES[plan.dtype]
    first = torch.device(devices[0])
    # The token budget decides the batches, and so the last bits of every vector: a resumed run
    # keeps the one recorded in the file (an explicit, different --tokens-per-batch is a mismatch).
    budget = plan.tokens_per_batch or (None if plan.overwrite else recorded_budget(output))
    budget = budget or default_token_budget(plan.ref.config, first, torch_dtype)
    attrs = {
        "model": plan.ref.name, "model_source": plan.ref.source, "model_revision": plan.ref.revision,
        "layers": np.array(plan.layers, dtype=np.int64), "model_layers": int(plan.ref.config.n_layers),
        "pooling": ",".join(plan.poolings),
        "compute_dtype": plan.dtype, "max_length": int(plan.limit), "long_policy": plan.long_policy,
        "input_sha256": index.sha256, "backend": describe(plan.backend, plan.dtype, plan.compile),
        "window_stride": int(max(plan.limit // 2, 1)) if window else None, "tokens_per_batch": int(budget),
        **extra_attrs,
    }  # fmt: skip
    try:
        writer: EmbeddingWriter | None = EmbeddingWriter.open(
            output, attrs=attrs, ids=index.ids, descriptions=index.descriptions, lengths=lengths,
            truncated=truncated, skipped=skipped, skip_reasons=index.skip_reasons,
            n_layers=len(plan.layers), d_model=plan.ref.config.d_model, poolings=plan.poolings,
            per_residue=plan.per_residue, store_dtype=plan.store_dtype, compression=plan.compression,
            overwrite=plan.overwrite, flush_seconds=FLUSH_SECONDS, complete_ok=complete_ok,
        )  # fmt: skip
    except OutputCompleteError:
        if not complete_ok:
            raise
        writer = None  # finished by an earlier run of this job
    scope = np.flatnonzero(~skipped)
    pending = np.zeros(len(index), dtype=bool)
    if writer is not None:
        pending[writer.pending] = True
    resumed = scope.size - int(pending.sum())
    # identical sequences are computed once per output (per shard under torchrun)
    members = plan_members(scope, duplicate_groups(index.seq_hash, skipped))
    if writer is not None:
        windows = windows or _windows(index, plan)
        _compute(index, plan, writer, members, pending, lengths, budget, devices, windows, progress, started)
    elif started is not None:
        started(0, 0)
    elapsed = time.perf_counter() - t0
    computed = sum(1 for g in members.values() if pending[g].any())
    done_res = int(lengths[pending].sum())
    return EmbedSummary(
        output=str(output), model=plan.ref.name, device=device_label(devices, plan.device),
        backend=describe(plan.backend, plan.dtype, plan.compile), layers=plan.layers,
        records=len(index), residues=int(lengths[scope].sum()), computed=computed, resumed=resumed,
        duplicates=int(pending.sum()) - computed, truncated=int(truncated.sum()),
        skipped=int(skipped.sum()), elapsed_s=round(elapsed, 3),
        residues_per_s=round(done_res / elapsed, 1) if elapsed > 0 else 0.0,
        output_bytes=output.stat().st_size, skip_reasons=dict(index.skip_reasons),
    )  # fmt: skip


def _compute(
    index: FastaIndex,
    plan: Plan,
    writer: EmbeddingWriter,
    members: Members,
    pending: np.ndarray,
    lengths: np.ndarray,
    budget: int,
    devices: list[str],
    windows: tuple[np.ndarray, int],
    progress: Progress | None,
    started: Callable[[int, int], None] | None,
) -> None:
    """Compute the pending rows on the devices, write them and mark the output complete."""
    window = plan.long_policy == "window"
    torch_dtype = COMPUTE_DTYPES[plan.dtype]
    first = torch.device(devices[0])
    with writer:
        work = Work(index, plan.alphabet, members, pending, lengths, plan.limit, window, *windows)
        if started is not None:
            started(int(pending.sum()), int(lengths[pending].sum()))
        spec = JobSpec(str(plan.ref.path), plan.dtype, plan.layers, plan.poolings, plan.per_residue, budget,
                       plan.backend, plan.compile)  # fmt: skip
        executor: Executor
        # `cpu:N` always means N worker processes (the multi-device machinery, even for N = 1)
        if not uses_workers(devices, plan.device):
            encoder = checkpoints.load_checkpoint(plan.ref.path, dtype=torch_dtype, device=first)
            executor = LocalExecutor(prepare(encoder, plan.backend, plan.dtype, plan.compile), spec)
        else:
            executor = WorkerPool(devices, spec)
        if pending.any():
            run_pipeline(work, spec, executor, writer, progress)
        writer.close(complete=True)
