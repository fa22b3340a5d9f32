"""HDF5 output, layout version 1: one file, rows in input order, resumable after any crash.

The output is created with every dataset preallocated (contiguous, uncompressed, sparse on disk)
and its metadata final, under a temporary name that is then renamed into place. While embedding,
rows are written straight to their byte ranges with `os.pwrite` (HDF5 reports each dataset's
file offset), so HDF5 metadata never changes during a run and a kill at any moment leaves a
readable file. Rows are buffered and written in sorted runs by one background thread: data,
fsync, then the rows' `written` marks, so a row marked written always has its data on disk (a
mark lost to a power cut only means the row is computed again). Closing with every row written sets
`complete=True`; with compression the finished file is first rewritten into chunked, compressed
datasets (under a temporary name, then renamed), so rows are compressed once, not rewritten.

A sidecar `OUTPUT.lock` (flock, released by the OS when a process dies) keeps two runs apart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from protembed import __version__
from protembed.cache import check_replaceable
from protembed.errors import OutputExistsError, StoreError
from protembed.output_lock import OutputLock
from protembed.reader import FORMAT, FORMAT_VERSION, intact
from protembed.store_file import Slab, check_resumable, create_output, finish_output, pwrite, slab_of

STORE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
COMPRESSIONS = (None, "gzip", "lzf")
_PAGE = 4096  # `written` marks are rewritten in blocks of this many rows


class EmbeddingWriter:
    """Writes finished rows of one output; create it with `EmbeddingWriter.open`.

    `pending` holds the rows still to compute when the writer was opened (not written, not
    skipped), ascending.
    """

    def __init__(self, path: Path, lock: OutputLock, slabs: dict[str, Slab], offsets: np.ndarray,
                 written: np.ndarray, skipped: np.ndarray, compression: str | None,
                 flush_seconds: float, flush_bytes: int) -> None:  # fmt: skip
        self.path, self._lock, self._slabs, self._offsets = path, lock, slabs, offsets
        self._written, self._skipped, self._compression = written, skipped, compression
        self._flush_seconds, self._flush_bytes = flush_seconds, flush_bytes
        self.pending: np.ndarray = np.flatnonzero(~written & ~skipped).astype(np.int64)
        self._fd = os.open(path, os.O_RDWR)
        self._poolings = [name for name in slabs if name not in ("residues", "written")]
        # (rows, pooled, residues) per write: one append each, so an interrupt between two
        # statements of `write` (Ctrl-C on the main thread) never leaves rows without their data
        self._pending: list[tuple[np.ndarray, dict[str, np.ndarray], list[np.ndarray]]] = []
        self._buffered, self._last_flush = 0, time.monotonic()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="protembed-writer")
        self._inflight: Future[None] | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        attrs: dict[str, Any],
        ids: Sequence[str],
        descriptions: Sequence[str],
        lengths: np.ndarray,
        truncated: np.ndarray,
        skipped: np.ndarray,
        skip_reasons: dict[int, str],
        n_layers: int,
        d_model: int,
        poolings: list[str],
        per_residue: bool,
        store_dtype: str,
        compression: str | None,
        overwrite: bool,
        flush_seconds: float = 5.0,
        flush_bytes: int = 64 << 20,
        complete_ok: bool = False,
    ) -> EmbeddingWriter:
        """Create the output, or reopen an unfinished one made with the same settings.

        `attrs` are stored as root attributes (None values are left out); all of them except
        `reader.NOT_COMPARED` must match to resume.

        Raises:
            OutputCompleteError: the output is complete (with `complete_ok`: and was made with
                these settings, so there is nothing left to do).
            OutputExistsError: a non-protembed file is in the way (and not `overwrite`), or
                another run holds the lock.
            ResumeMismatchError: an unfinished output made with other settings exists.
            StoreError: the output path cannot be written.
        """
        if store_dtype not in STORE_DTYPES or compression not in COMPRESSIONS:
            raise ValueError(f"store_dtype {store_dtype!r} / compression {compression!r} not supported")
        path, n = Path(path), len(ids)
        skipped = np.asarray(skipped, dtype=bool)
        lengths = np.where(skipped, 0, lengths).astype("<i4")
        assert len(descriptions) == n and lengths.shape == skipped.shape == np.shape(truncated) == (n,)
        assert len(np.atleast_1d(attrs.get("layers", [0] * n_layers))) == n_layers, "layers vs n_layers"
        offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        full = {k: v for k, v in attrs.items() if v is not None}
        full.update(
            format=FORMAT, format_version=FORMAT_VERSION, protembed_version=__version__, n_sequences=n
        )
        full.update(per_residue=bool(per_residue), store_dtype=store_dtype, created=created, complete=False)
        shape = (d_model,) if n_layers == 1 else (n_layers, d_model)
        big = {name: (n, *shape) for name in poolings}
        if per_residue:
            big["residues"] = (int(offsets[-1]), *shape)
        check_replaceable(path)
        lock = OutputLock(path)
        try:
            if path.exists() and not overwrite:
                check_resumable(path, full, big, lengths, skipped, complete_ok)
            else:
                records: dict[str, np.ndarray | Sequence[str]] = {
                    "ids": ids,
                    "descriptions": descriptions,
                    "lengths": lengths,
                    "truncated": np.asarray(truncated, dtype=bool),
                    "skipped": skipped,
                    "skip_reasons": np.array([skip_reasons.get(i, "") for i in range(n)], dtype=object),
                    "written": np.zeros(n, dtype=bool),
                    **({"offsets": offsets} if per_residue else {}),
                }
                create_output(path, full, records, big, STORE_DTYPES[store_dtype])
            with (
                h5py.File(path, "r") as h5,
                intact(path, OutputExistsError, "pass --overwrite to replace it"),
            ):
                written = h5["written"][...].astype(bool)
                slabs = {name: slab_of(h5[name]) for name in [*big, "written"]}
            return cls(path, lock, slabs, offsets, written, skipped, compression, flush_seconds, flush_bytes)
        except OSError as exc:
            lock.release()
            raise StoreError(f"{path}: cannot write output: {exc.strerror or exc}") from None
        except BaseException:
            lock.release()
            raise

    def write(
        self, rows: np.ndarray, pooled: dict[str, np.ndarray], residues: list[np.ndarray] | None
    ) -> None:
        """Buffer finished rows (copied, in the store dtype); hands them to the writer thread
        every `flush_seconds` or `flush_bytes`. Raises the writer thread's last error, if any.

        pooled[name]: float [n, K, D]; residues[j]: float [lengths[rows[j]], K, D] (float32, or
        the store dtype when copying from another file).
        """
        rows = np.asarray(rows, dtype=np.int64)
        assert not self._skipped[rows].any(), "skipped rows have no embeddings"
        assert sorted(pooled) == sorted(self._poolings)
        assert all(pooled[name].shape[0] == rows.size for name in pooled)
        converted = {name: np.asarray(pooled[name]).astype(self._slabs[name].dtype) for name in pooled}
        per_residue: list[np.ndarray] = []
        if "residues" in self._slabs:
            assert residues is not None and len(residues) == rows.size, "per-residue output needs residues"
            dtype = self._slabs["residues"].dtype
            per_residue = [np.asarray(r).astype(dtype) for r in residues]
        self._pending.append((rows, converted, per_residue))
        self._buffered += sum(a.nbytes for a in converted.values()) + sum(r.nbytes for r in per_residue)
        if self._buffered >= self._flush_bytes or time.monotonic() - self._last_flush >= self._flush_seconds:
            self._hand_off()

    def flush(self) -> None:
        """Write every buffered row and wait until it is on disk and marked written."""
        self._hand_off()
        self._wait()

    def close(self, complete: bool) -> None:
        """Flush; with complete=True (every non-skipped row written) mark the file complete; unlock."""
        if self._lock.fd < 0:
            return  # already closed
        try:
            self.flush()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            if complete:
                missing = int(np.count_nonzero(~self._written & ~self._skipped))
                if missing:
                    raise RuntimeError(f"{self.path}: close(complete=True) with {missing} rows not written")
                finish_output(self.path, self._compression)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot finish output: {exc.strerror or exc}") from None
        finally:
            self._thread.shutdown(wait=True)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._lock.release()

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(complete=False)

    def _hand_off(self) -> None:
        """Give the buffer to the writer thread, after the previous hand-off has finished."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        pending, self._pending, self._buffered = self._pending, [], 0
        batch = (
            np.concatenate([rows for rows, _, _ in pending]),
            {name: [pooled[name] for _, pooled, _ in pending] for name in self._poolings},
            [r for _, _, residues in pending for r in residues],
        )
        self._wait()  # at most one batch in flight; also surfaces its error
        self._inflight = self._thread.submit(self._write_batch, *batch)

    def _wait(self) -> None:
        future, self._inflight = self._inflight, None
        if future is not None:
            future.result()

    def _write_batch(
        self, rows: np.ndarray, pooled: dict[str, list[np.ndarray]], residues: list[np.ndarray]
    ) -> None:
        """Runs on the writer thread: rows sorted into contiguous runs, data, fsync, marks."""
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        assert np.all(np.diff(rows) > 0), "a row was given twice"
        first = np.flatnonzero(np.r_[True, np.diff(rows) != 1])  # where each run of rows starts
        bounds = np.r_[first, rows.size]
        try:
            for name in self._poolings:
                data = np.concatenate(pooled[name])[order]
                self._write_runs(name, data, bounds[:-1], bounds[1:], rows[first])
            if "residues" in self._slabs:
                data = np.concatenate([residues[j] for j in order])
                ends = np.cumsum(np.diff(self._offsets)[rows])
                assert data.shape[0] == ends[-1], "residue arrays do not match lengths"
                starts = np.r_[0, ends][bounds]
                self._write_runs("residues", data, starts[:-1], starts[1:], self._offsets[rows[first]])
            os.fsync(self._fd)
            self._written[rows] = True
            pages = np.unique(rows // _PAGE) * _PAGE  # marks go out a page of rows at a time
            self._write_runs("written", self._written, pages, pages + _PAGE, pages)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write output: {exc.strerror or exc}") from None

    def _write_runs(
        self, name: str, data: np.ndarray, starts: np.ndarray, ends: np.ndarray, file_rows: np.ndarray
    ) -> None:
        """Write rows starts[i]:ends[i] of data (ends clipped to it) at row file_rows[i] of `name`."""
        slab = self._slabs[name]
        data = np.ascontiguousarray(data, dtype=slab.dtype)
        assert data[:1].nbytes in (0, slab.row_bytes), f"{name}: wrong row shape"
        view, rb = memoryview(data.reshape(-1)).cast("B"), slab.row_bytes  # type: ignore[arg-type]
        ends = np.minimum(ends, data.shape[0])
        for a, b, row in zip(starts.tolist(), ends.tolist(), file_rows.tolist(), strict=True):
            pwrite(self._fd, view[a * rb : b * rb], slab.offset + row * slab.row_bytes)
