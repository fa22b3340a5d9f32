"""Rewriting embeddings files: the per-protein export, and the compressed copy of a finished output.

Per-protein layout: one HDF5 dataset per record, named by its FASTA id.

This is the bio_embeddings / ProtTrans convention: the value is the pooled vector (D,) or the
per-residue matrix (L, D) of one record. HDF5 names cannot hold '/', so ids are escaped: '%'
becomes '%25' and then '/' becomes '%2F' (an id that is exactly '.' becomes '%2E'). A name
already taken gets the first free suffix '#2', '#3', ... in input order, so duplicate ids are
all kept. Every dataset carries the unescaped id in its `original_id` attribute. Skipped
records have no embedding and are left out.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from protembed import signals
from protembed.cache import check_file_output, check_replaceable, same_file, write_partial
from protembed.errors import StoreError
from protembed.reader import RECORD_DATASETS, EmbeddingFile, open_embeddings, row_blocks, row_bytes

LAYOUTS = ("per-protein",)
# Root attributes of the source that describe its own layout, not the model or the input: an export
# leaves them out and writes `what`, `layer` and `n_sequences` (datasets written) instead.
_LAYOUT_ATTRS = frozenset(
    {"layers", "pooling", "per_residue", "complete", "n_sequences", "virtual_shards"}
    | {"shard_start", "shard_stop", "shard_rank", "shard_world_size"}
)
# HDF5 1.8's indexed groups: in the older symbol-table groups, adding a dataset slows to a crawl
# past ~900,000 of them (measured: 100,000 in 8 s up to 900,000, then no 1,000,000th in 3 minutes).
_LIBVER = ("v108", "v108")
CHUNK_BYTES = 1 << 18  # target chunk size of compressed embedding datasets
_BLOCK_BYTES = 64 << 20  # read this much of the source at a time
_REPORT_ROWS = 10_000  # pooled records written between progress calls


@dataclass
class ExportSummary:
    """What an export wrote."""

    path: Path
    n_written: int
    n_skipped: int


def escape_id(record_id: str) -> str:
    """An id as an HDF5 dataset name: '%' -> '%25', '/' -> '%2F', '.' alone -> '%2E'."""
    name = record_id.replace("%", "%25").replace("/", "%2F")
    return "%2E" if name == "." else name


def dataset_names(ids: list[str]) -> list[str]:
    """Escaped, unique dataset names for ids in input order (repeats get '#2', '#3', ...)."""
    used: set[str] = set()
    tried: dict[str, int] = {}  # the last suffix tried per id: many repeats of one id stay linear
    names = []
    for record_id in ids:
        base = name = escape_id(record_id)
        k = tried.get(base, 1)
        while name in used:
            k += 1
            name = f"{base}#{k}"
        tried[base] = k
        used.add(name)
        names.append(name)
    return names


def export_per_protein(
    source: Path,
    output: Path,
    what: str = "mean",
    layer: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write one dataset per record of a complete embeddings file.

    Args:
        what: a stored pooling ("mean", "cls") or "residues".
        layer: the model layer to export; needed when the file holds several. Negative layers
            count from the end (-1 = the last block) in files that record the model's depth.
        progress: called as `progress(records done, records to write)` now and then.

    Raises:
        StoreError: the source cannot be read as asked (incomplete, no such pooling or layer).
        OutputExistsError: the output exists and not `overwrite`.
    """
    source, output = Path(source), Path(output)
    if same_file(source, output):
        raise StoreError(f"{output}: the output is the source file; choose another -o")
    check_replaceable(output)  # first: a link is refused as one (check_file_output writes through it)
    check_file_output(output, overwrite)
    with open_embeddings(source) as emb:
        for shard in emb.attrs.get("virtual_shards") or []:  # a virtual file reads its data there
            if same_file(output, source.resolve().parent / shard):
                raise StoreError(
                    f"{output}: the output is a shard that {source} reads from; choose another -o"
                )
        if len(emb.layers) > 1 and layer is None:
            raise StoreError(f"{source}: holds layers {emb.layers}; pick one with --layer")
        if layer is not None:
            layer = emb.stored_layer(layer)
        _check_space(emb, what, output)

        def fill(tmp: Path) -> int:
            with h5py.File(tmp, "w", libver=_LIBVER) as out:
                for key in emb.h5.attrs:
                    if key not in _LAYOUT_ATTRS:
                        out.attrs.create(key, emb.h5.attrs[key], dtype=emb.h5.attrs.get_id(key).dtype)
                out.attrs.update(format="protembed-per-protein", layout="per-protein", what=what)
                if layer is not None or emb.layers:
                    out.attrs["layer"] = layer if layer is not None else emb.layers[0]
                n = _write_records(emb, out, what, layer, progress or (lambda done, total: None))
                out.attrs["n_sequences"] = n
            return n

        n = write_partial(output, fill)
        return ExportSummary(output, n, int(np.count_nonzero(emb.skipped)))


def _check_space(emb: EmbeddingFile, what: str, output: Path) -> None:
    """StoreError if the output's disk has too little room for it. HDF5 cannot recover from a full
    disk midway through thousands of small datasets (its caches fail as objects close, and the
    process can crash), so the room is checked first: the values plus ~1 KiB per record."""
    name = "residues" if what == "residues" else what
    if name not in emb.h5:  # _write_records names the missing pooling or per-residue data
        return
    ds, keep = emb.h5[name], ~emb.skipped
    rows = int(emb.lengths[keep].sum()) if what == "residues" else int(keep.sum())
    values = rows * ds.shape[-1] * ds.dtype.itemsize  # one layer's
    needed = values + int(keep.sum()) * (1024 + 2 * max((len(i) for i in emb.ids), default=0)) + (1 << 16)
    free = shutil.disk_usage(output.resolve().parent).free
    if needed > free:
        raise StoreError(f"{output}: cannot write output: needs about {needed / 1e6:,.1f} MB, "
                         f"{free / 1e6:,.1f} MB free on its disk")  # fmt: skip


def _write_records(
    emb: EmbeddingFile, out: h5py.File, what: str, layer: int | None, progress: Callable[[int, int], None]
) -> int:
    """Copy every non-skipped record into its own dataset, reading the source in large blocks."""
    names, ids = dataset_names(emb.ids), emb.ids
    keep = ~emb.skipped
    total = int(keep.sum())
    progress(0, total)
    if not all(ids[row] for row in np.flatnonzero(keep).tolist()):  # embed gives every such row an id
        raise StoreError(f"{emb.path}: damaged HDF5 file (a record that was embedded has no id)")
    n = len(emb)
    if what != "residues":
        if what not in emb.poolings:
            raise StoreError(f"{emb.path}: no {what!r} embeddings (stored: {', '.join(emb.poolings)})")
        ds = emb.h5[what]
        step = max(1, _BLOCK_BYTES // row_bytes(ds))  # rows per read
        done = 0
        for start in range(0, n, step):
            pooled = emb.pooled_block(what, start, min(n, start + step), layer)  # (rows, D) for one layer
            for row in np.flatnonzero(keep[start : start + step]).tolist():
                out.create_dataset(names[start + row], data=pooled[row]).attrs["original_id"] = ids[
                    start + row
                ]
                done += 1
                if done % _REPORT_ROWS == 0:
                    progress(done, total)
        progress(total, total)
        return total
    if not emb.attrs.get("per_residue"):
        raise StoreError(f"{emb.path}: no per-residue embeddings (embed with --per-residue)")
    ds = emb.h5["residues"]
    budget = max(1, _BLOCK_BYTES // row_bytes(ds))  # residues per read
    written = 0
    for start, stop in row_blocks(emb.lengths, budget):  # about _BLOCK_BYTES of residues, in one slice
        block, offsets = emb.residue_block(start, stop, layer)
        for row in range(start, stop):
            if keep[row]:
                part = block[offsets[row - start] : offsets[row - start + 1]]
                out.create_dataset(names[row], data=part).attrs["original_id"] = ids[row]
        written += int(keep[start:stop].sum())
        progress(written, total)
    return total


def compressed_copy(source: Path, output: Path, compression: str) -> None:
    """Copy a fully written output into chunked, compressed embedding datasets, marked complete.

    Chunks are `rows` rows of one layer (about CHUNK_BYTES), so one record or one layer is
    cheap to read; the other datasets are copied as they are.
    """
    with h5py.File(source, "r") as src, h5py.File(output, "w") as dst:
        for key in src.attrs:
            dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
        dst.attrs["complete"] = True
        for name, ds in src.items():
            if name in (*RECORD_DATASETS, "offsets") or ds.size == 0:
                src.copy(ds, dst, name=name)
                continue
            rows = min(ds.shape[0], max(1, CHUNK_BYTES // (ds.dtype.itemsize * ds.shape[-1])))
            chunks = (rows, *([1] if ds.ndim == 3 else []), ds.shape[-1])
            out = dst.create_dataset(
                name, ds.shape, ds.dtype, chunks=chunks, compression=compression, shuffle=True
            )
            step = max(1, _BLOCK_BYTES // row_bytes(ds) // rows) * rows
            for a in range(0, ds.shape[0], step):  # whole chunks at a time
                signals.check()
                out[a : a + step] = ds[a : a + step]
