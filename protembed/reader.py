"""Reading embeddings files (HDF5 layout version 1) written by `protembed embed`.

>>> from protembed.reader import open_embeddings
>>> with open_embeddings("out.h5") as emb:
...     X = emb.pooled("mean")            # (N, D), or (N, K, D) with several layers
...     r = emb.residues("sp|P69905")     # (L, D) per-residue states of one record, read lazily
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from protembed.errors import (
    ProtembedError,
    StoreError,
    first_line,
    is_whole,
)

FORMAT, FORMAT_VERSION = "protembed-embeddings", 1
RECORD_DATASETS = ("ids", "descriptions", "lengths", "truncated", "skipped", "skip_reasons", "written")
PER_RESIDUE_DATASETS = ("residues", "offsets")
# Every other root attribute must match to resume. `model` is how the user named the model; the
# model itself is `model_source` + `model_revision` (a path spelled another way is the same model).
NOT_COMPARED = ("protembed_version", "created", "model")
# What h5py raises for a file that is not HDF5 or is damaged (a bad heap or object header)
H5_ERRORS = (OSError, RuntimeError, KeyError)


class EmbeddingFile:
    """An open embeddings file; rows are FASTA records in input order (ids may repeat)."""

    def __init__(self, h5: h5py.File, path: Path) -> None:
        self._h5, self.path = h5, path
        self.attrs: dict[str, Any] = {key: plain(value) for key, value in h5.attrs.items()}
        self.lengths: np.ndarray = h5["lengths"][...]
        self.skipped: np.ndarray = h5["skipped"][...]
        # rows whose embeddings are on disk (all but skipped ones once the file is complete)
        self.written: np.ndarray = h5["written"][...].astype(bool)
        self.layers: list[int] = [int(x) for x in np.atleast_1d(self.attrs.get("layers", [])).tolist()]
        self.poolings = [k for k in h5 if k not in (*RECORD_DATASETS, *PER_RESIDUE_DATASETS)]

    @property
    def h5(self) -> h5py.File:
        """The underlying h5py file, open read-only."""
        return self._h5

    @property
    def _file(self) -> h5py.File:
        """The h5py file, or a StoreError once it is closed (a read after the `with` block)."""
        if not self._h5:
            raise StoreError(f"{self.path}: the file is closed (read it inside the `with` block)")
        return self._h5

    @cached_property
    def ids(self) -> list[str]:
        """FASTA ids (first word of each header), one per row."""
        return self._file["ids"].asstr()[...].tolist()

    @cached_property
    def descriptions(self) -> list[str]:
        """Full header lines without '>', one per row."""
        return self._file["descriptions"].asstr()[...].tolist()

    @cached_property
    def skip_reasons(self) -> list[str]:
        """Why each skipped row was skipped ('' for the others)."""
        return self._file["skip_reasons"].asstr()[...].tolist()

    @cached_property
    def _first_row(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for row, key in enumerate(self.ids):
            first.setdefault(key, row)
        return first

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def index(self, key: str) -> int:
        """The first row whose FASTA id is `key`."""
        try:
            return self._first_row[key]
        except KeyError:
            raise StoreError(f"{self.path}: no record with id {key!r}") from None

    def pooled(self, kind: str = "mean", layer: int | None = None) -> np.ndarray:
        """All rows of one pooling, as stored (float32 or float16); skipped rows are NaN, and so are
        rows not written yet (a file opened with allow_incomplete).

        Returns (N, D) with one stored layer or when `layer` (a model layer index) is given,
        else (N, K, D).
        """
        return self.pooled_block(kind, 0, len(self), layer)

    def pooled_block(self, kind: str, start: int, stop: int, layer: int | None = None) -> np.ndarray:
        """Rows start..stop-1 of `pooled(kind, layer)`, in one read."""
        if kind not in self.poolings:
            raise StoreError(f"{self.path}: no {kind!r} embeddings (stored: {', '.join(self.poolings)})")
        if not (is_whole(start) and is_whole(stop) and 0 <= start <= stop <= len(self)):
            raise StoreError(f"{self.path}: rows {start}..{stop} are not a range within 0..{len(self)}")
        ds, axis = self._file[kind], self._layer_axis(layer)

        def read(a: int, b: int) -> np.ndarray:
            return ds[a:b] if layer is None or ds.ndim == 2 else ds[a:b, axis]

        data = self._read_rows(read, start, stop)
        data[self._unwritten(start, stop)] = np.nan
        return data

    def residues(self, key: int | str, layer: int | None = None) -> np.ndarray:
        """Per-residue embeddings of one record (by row, negative from the end, or id): (L, D), or
        (L, K, D) without `layer`."""
        if "residues" not in self._file:
            raise StoreError(f"{self.path}: no per-residue embeddings (embed with --per-residue)")
        row = self.index(key) if isinstance(key, str) else operator.index(key)
        if not -len(self) <= row < len(self):
            raise StoreError(f"{self.path}: row {row} out of range (0..{len(self) - 1}, or -1 for the last)")
        row %= len(self)
        if not (self.written[row] or self.skipped[row]):
            raise StoreError(f"{self.path}: row {row} is not written yet (the run is unfinished)")
        return self.residue_block(row, row + 1, layer)[0]

    def residue_block(self, start: int, stop: int, layer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-residue embeddings of rows start..stop-1 in one read, and their offsets into it; rows
        not written yet (a file opened with allow_incomplete) are NaN."""
        if "residues" not in self._file:
            raise StoreError(f"{self.path}: no per-residue embeddings (embed with --per-residue)")
        if not (is_whole(start) and is_whole(stop) and 0 <= start <= stop <= len(self)):
            raise StoreError(f"{self.path}: rows {start}..{stop} are not a range within 0..{len(self)}")
        ds, axis = self._file["residues"], self._layer_axis(layer)
        with intact(self.path, StoreError, f"the offsets of rows {start}..{stop - 1} cannot be read"):
            offsets = self._file["offsets"][start : stop + 1].astype(np.int64)

        def read(a: int, b: int) -> np.ndarray:  # rows a..b-1
            first, last = int(offsets[a - start]), int(offsets[b - start])
            return ds[first:last] if layer is None or ds.ndim == 2 else ds[first:last, axis]

        data, offsets = self._read_rows(read, start, stop), offsets - offsets[0]
        for r in np.flatnonzero(self._unwritten(start, stop)).tolist():
            data[offsets[r] : offsets[r + 1]] = np.nan
        return data, offsets

    def _unwritten(self, start: int, stop: int) -> np.ndarray:
        """Which of rows start..stop-1 hold no data yet (a file opened with allow_incomplete)."""
        return ~self.written[start:stop] & ~self.skipped[start:stop]

    def _read_rows(self, read: Callable[[int, int], np.ndarray], start: int, stop: int) -> np.ndarray:
        """`read(start, stop)`; where the file is damaged, a StoreError naming the rows that cannot
        be read (found by reading halves of the range, on this error path only)."""
        try:
            return read(start, stop)
        except H5_ERRORS as exc:
            bad = _bad_rows(read, start, stop) or list(range(start, stop))
            if len(bad) == 1:
                rows = f"row {bad[0]}"
            elif bad[-1] - bad[0] + 1 == len(bad):
                rows = f"rows {bad[0]}..{bad[-1]}"
            else:
                rows = f"{len(bad)} rows between {bad[0]} and {bad[-1]}"
            detail = first_line(exc).strip("'")
            raise StoreError(f"{self.path}: damaged HDF5 file ({detail}); {rows} cannot be read") from None

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> EmbeddingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stored_layer(self, layer: int) -> int:
        """A stored layer's non-negative index; negative ones count from the end (-1 = last block)."""
        if not is_whole(layer):
            raise StoreError(
                f"{self.path}: layer {layer!r} is not a layer number (stored layers: {self.layers})"
            )
        layer = int(layer)
        if layer < 0:
            depth = self.attrs.get("model_layers")
            if depth is None:
                raise StoreError(
                    f"{self.path}: does not record the model's depth, so layer {layer} is ambiguous; "
                    f"pick one of {self.layers}"
                )
            if layer < -(int(depth) + 1):
                raise StoreError(
                    f"{self.path}: layer {layer} out of range: a model of {depth} blocks counts back "
                    f"from -1 (its last block) to {-(int(depth) + 1)} (stored layers: {self.layers})"
                )
            given, layer = f"{layer} (= {int(depth) + 1 + layer})", int(depth) + 1 + layer
        else:
            given = str(layer)
        if layer not in self.layers:
            raise StoreError(f"{self.path}: layer {given} is not stored (stored layers: {self.layers})")
        return layer

    def _layer_axis(self, layer: int | None) -> int:
        """Position of a model layer on the K axis (0 when only one layer is stored)."""
        return 0 if layer is None else self.layers.index(self.stored_layer(layer))


def _bad_rows(read: Callable[[int, int], np.ndarray], start: int, stop: int) -> list[int]:
    """The rows in start..stop-1 that `read` fails on, found by halving the range."""
    try:
        read(start, stop)
        return []
    except H5_ERRORS:
        if stop - start == 1:
            return [start]
    mid = (start + stop) // 2
    return _bad_rows(read, start, mid) + _bad_rows(read, mid, stop)


@contextmanager
def intact(path: Path, error: type[ProtembedError] = StoreError, hint: str = "") -> Iterator[None]:
    """Reads of an HDF5 file whose damage h5py reports (`H5_ERRORS`) become an `error` naming the
    file (and `hint`, what to do)."""
    try:
        yield
    except H5_ERRORS as exc:
        detail = first_line(exc).strip("'")
        raise error(f"{path}: damaged HDF5 file ({detail}){'; ' + hint if hint else ''}") from None


def open_h5(path: Path) -> h5py.File:
    """`path` opened read-only; StoreError saying why it cannot be (missing, a folder, not HDF5)."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        detail = first_line(exc)
        why = "no such file" if not path.exists() else "is a folder" if path.is_dir() else None
        raise StoreError(f"{path}: {why or f'not a readable HDF5 file ({detail})'}") from None


def row_bytes(ds: h5py.Dataset) -> int:
    """Bytes in one row of `ds`: everything past its first axis."""
    return int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize


def row_blocks(cost: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges [start, stop) holding about `budget` of `cost` (per row) each, at
    least one row: how large files are read or copied a bounded piece at a time."""
    ends = np.cumsum(cost, dtype=np.int64)
    start = 0
    while start < ends.size:
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + budget, side="right")))
        yield start, stop
        start = stop


def open_embeddings(path: str | Path, allow_incomplete: bool = False) -> EmbeddingFile:
    """Open an embeddings file for reading.

    Raises:
        StoreError: not a readable protembed embeddings file, or unfinished (unless
            `allow_incomplete`, in which case rows with `written` false hold no data).
    """
    path = Path(path)
    h5 = open_h5(path)
    try:
        with intact(path):  # damage found while reading the attributes or record datasets
            fmt, version = plain(h5.attrs.get("format")), plain(h5.attrs.get("format_version"))
            if fmt != FORMAT or not all(k in h5 for k in RECORD_DATASETS):
                raise StoreError(f"{path}: not a protembed embeddings file")
            if version != FORMAT_VERSION:
                raise StoreError(
                    f"{path}: layout version {version} is not supported (this protembed reads 1)"
                )
            shards = plain(h5.attrs.get("virtual_shards")) or []  # `merge --virtual` / `embed --no-merge`
            beside = path.resolve().parent  # where HDF5 looks, through a symlink too
            if lost := [name for name in shards if not (beside / name).is_file()]:
                raise StoreError(
                    f"{path}: reads through to shard files that are not beside it: {', '.join(lost)} "
                    f"(copy them next to it, or run `protembed merge` where they are to get one plain file)"
                )
            if not plain(h5.attrs.get("complete")) and not allow_incomplete:
                done = int(np.count_nonzero(h5["written"][...]))
                todo = int(np.count_nonzero(~h5["skipped"][...]))
                raise StoreError(
                    f"{path}: unfinished output ({done} of {todo} records written); rerun the same "
                    "embed command (or `protembed merge` for a merge of shards) to finish it "
                    "(from Python: open_embeddings(..., allow_incomplete=True))"
                )
            return EmbeddingFile(h5, path)
    except BaseException:
        h5.close()
        raise


def plain(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (lists, ints, floats, bools, str)."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.ndim else plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
