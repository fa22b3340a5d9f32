"""The preallocated output file on disk: whether an existing one can be resumed, create it, locate
each dataset's bytes, mark it complete.

`store.EmbeddingWriter` writes rows straight to the byte ranges found here; HDF5 metadata is
final once `create_output` returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5p

from protembed.cache import write_partial
from protembed.errors import OutputCompleteError, OutputExistsError, ResumeMismatchError
from protembed.export import compressed_copy
from protembed.reader import (
    FORMAT,
    FORMAT_VERSION,
    H5_ERRORS,
    NOT_COMPARED,
    RECORD_DATASETS,
    intact,
    plain,
    row_bytes,
)

_STR = h5py.string_dtype("utf-8")
TEXT_ROWS = 1 << 16  # rows of a text dataset (ids, descriptions, skip reasons) read or written at a time


@dataclass
class Slab:
    """Where a preallocated dataset lives in the file: byte offset, bytes per row, dtype."""

    offset: int
    row_bytes: int
    dtype: np.dtype


def create_output(
    path: Path,
    attrs: dict[str, Any],
    records: dict[str, np.ndarray | Sequence[str]],
    big: dict[str, tuple[int, ...]],
    dtype: np.dtype,
) -> None:
    """Write a new, empty output under a temporary name (`cache.write_partial`), then rename it
    into place."""
    write_partial(path, lambda tmp: _fill_output(tmp, attrs, records, big, dtype))
    fsync_path(path.parent)


def _fill_output(
    tmp: Path,
    attrs: dict[str, Any],
    records: dict[str, np.ndarray | Sequence[str]],
    big: dict[str, tuple[int, ...]],
    dtype: np.dtype,
) -> None:
    """The new output's content: attributes, record datasets, preallocated embeddings (NaN in the
    pooled rows of skipped records), synced to disk."""
    with h5py.File(tmp, "w") as h5:
        for key, value in attrs.items():
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                h5.attrs.create(key, np.array(value, dtype=object), dtype=_STR)
            else:
                h5.attrs[key] = value
        for name, data in records.items():
            if isinstance(data, np.ndarray) and data.dtype != object:
                h5.create_dataset(name, data=data)
                continue
            # text: a slice at a time, as a list of every id of a large input costs gigabytes
            text = h5.create_dataset(name, (len(data),), dtype=_STR)
            for start in range(0, len(data), TEXT_ROWS):
                text[start : start + TEXT_ROWS] = np.array(
                    list(data[start : start + TEXT_ROWS]), dtype=object
                )
        for name, shape in big.items():
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)  # all space now: metadata never changes later
            dcpl.set_fill_time(h5d.FILL_TIME_NEVER)  # and never written with zeros (sparse file)
            h5.create_dataset(name, shape, dtype=dtype, dcpl=dcpl)
        slabs = [slab_of(h5[name]) for name in big if name != "residues"]
    # Skipped rows hold NaN in the pooled datasets (never-written space reads as zeros).
    fd = os.open(tmp, os.O_RDWR)
    try:
        for slab in slabs:
            row_nan = np.full(slab.row_bytes // slab.dtype.itemsize, np.nan, slab.dtype)
            nan = memoryview(row_nan).cast("B")  # type: ignore[arg-type]
            for row in np.flatnonzero(np.asarray(records["skipped"])).tolist():
                pwrite(fd, nan, slab.offset + row * slab.row_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def slab_of(ds: h5py.Dataset) -> Slab:
    """Where preallocated dataset `ds` lives in its file."""
    offset = ds.id.get_offset()
    assert offset is not None or ds.size == 0, f"{ds.name} is not a preallocated contiguous dataset"
    return Slab(offset or 0, row_bytes(ds), np.dtype(ds.dtype).newbyteorder("<"))


def finish_output(path: Path, compression: str | None) -> None:
    """Mark a fully written output complete, first rewriting it compressed if asked."""
    if compression is None:
        with h5py.File(path, "r+", locking=False) as h5:  # our lock is held; readers may be open
            h5.attrs.modify("complete", True)
        fsync_path(path)
        return
    tmp = path.with_name(path.name + ".partial")
    try:
        compressed_copy(path, tmp, compression)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def pwrite(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at byte `offset` of `fd`."""
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync_path(path: Path) -> None:
    """fsync a file or folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_complete(path: Path) -> bool | None:
    """Whether `path`, a protembed embeddings file, is complete; None if it is absent, not one, or damaged."""
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete")) if h5.attrs.get("format") == FORMAT else None
    except H5_ERRORS:
        return None


def unfinished_output(path: Path) -> bool:
    """Whether `path` is a protembed embeddings file that is not complete yet."""
    return output_complete(path) is False


def check_resumable(
    path: Path,
    attrs: dict[str, Any],
    big: dict[str, tuple[int, ...]],
    lengths: np.ndarray,
    skipped: np.ndarray,
    complete_ok: bool = False,
) -> None:
    """Check that an existing output is an unfinished one made with these settings.

    `attrs` are the new root attributes and `big` the shapes of the embedding datasets.

    Raises:
        OutputCompleteError: already complete; with `complete_ok`, only once its settings are
            found to be these (a shard finished by an earlier run of the same job).
        OutputExistsError: not a protembed file of this layout version.
        ResumeMismatchError: made with other settings; names each one, file vs now.
    """
    hint = "pass --overwrite to replace it"
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise OutputExistsError(f"{path}: exists and is not a readable HDF5 file; {hint}") from None
    with h5, intact(path, OutputExistsError, hint):
        old = {k: plain(v) for k, v in h5.attrs.items()}
        if old.get("format") != FORMAT or not all(k in h5 for k in RECORD_DATASETS):
            raise OutputExistsError(f"{path}: exists and is not a protembed embeddings file; {hint}")
        if old.get("format_version") != FORMAT_VERSION:
            raise OutputExistsError(f"{path}: written in layout version {old.get('format_version')}; {hint}")
        complete = bool(old.get("complete"))
        if complete and not complete_ok:
            raise OutputCompleteError(f"{path}: a complete output already exists; {hint}")
        new = {k: plain(v) for k, v in attrs.items()}
        diffs = [
            f"{key} {_show(old.get(key))} (file) vs {_show(new.get(key))} (now)"
            for key in sorted((set(old) | set(new)) - {*NOT_COMPARED, "complete"})
            if _compared(key, old.get(key)) != _compared(key, new.get(key))
        ]
        have = {k: h5[k].shape for k in h5 if k not in RECORD_DATASETS and k != "offsets"}
        for key in sorted(k for k in set(have) | set(big) if have.get(k) != big.get(k)):
            diffs.append(f"dataset {key} {_show(have.get(key))} (file) vs {_show(big.get(key))} (now)")
        if not np.array_equal(h5["skipped"][...], skipped):
            diffs.append("skipped records differ")
        elif not np.array_equal(h5["lengths"][...], lengths):
            diffs.append("record lengths differ")
    if diffs:
        state = "a complete" if complete else "an unfinished"
        raise ResumeMismatchError(
            f"{path}: {state} output with other settings exists: {'; '.join(diffs)}; "
            f"rerun with the same settings to resume, or {hint}"
        )
    if complete:
        raise OutputCompleteError(f"{path}: complete, made with these settings")


def _compared(key: str, value: Any) -> Any:
    """An attribute value in the form compared on resume: poolings in any order are the same
    datasets (`--pool cls,mean` resumes a `mean,cls` file)."""
    if key == "pooling" and isinstance(value, str):
        return sorted(value.split(","))
    return value


def _show(value: Any) -> str:
    text = "(unset)" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
