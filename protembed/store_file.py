"""The preallocated output file on disk: create it, locate each dataset's bytes, mark it complete.

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

from protembed.export import compressed_copy
from protembed.reader import row_bytes

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
    """Write a new, empty output under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".partial")
    try:
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


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
