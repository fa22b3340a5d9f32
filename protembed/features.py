"""Frozen features for FLIP heads: one-hot baselines and cached language-model embeddings.

Model features are cached in one HDF5 file per (model source and revision, layer) under
`<cache>/features/`, rows keyed by the sha256 of the sequence, so a second run with another head or
seed reads them back in seconds. Layout (attributes record model, source, revision, layer, d_model):

    pooled/keys [n] S64, pooled/mean [n, D] float32, pooled/truncated [n] bool
    residues/keys [m] S64, residues/start [m] int64, residues/length [m] int64, residues/data [T, D] float16
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from protembed import __version__
from protembed.api import Model
from protembed.cache import ensure_dir
from protembed.errors import HubError
from protembed.flip import FlipError

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
ONEHOT_DIM = len(AMINO_ACIDS) + 1  # last column: any other letter
FORMAT = "protembed-flip-features/1"

_ONEHOT_INDEX = np.full(256, len(AMINO_ACIDS), dtype=np.int64)
for _i, _c in enumerate(AMINO_ACIDS):
    _ONEHOT_INDEX[ord(_c)] = _ONEHOT_INDEX[ord(_c.lower())] = _i


@dataclass
class Ragged:
    """Variable-length rows stored flat: row i is data[offsets[i]:offsets[i + 1]]."""

    data: np.ndarray  # [T, D]
    offsets: np.ndarray  # [n + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Features:
    """Per-sequence (`pooled` [n, D]) and/or per-residue features, plus which inputs were cut short."""

    pooled: np.ndarray | None
    residues: Ragged | None
    truncated: np.ndarray  # [n] bool

    @property
    def dim(self) -> int:
        if self.pooled is not None:
            return int(self.pooled.shape[1])
        assert self.residues is not None
        return self.residues.dim


def onehot_ids(seq: str) -> np.ndarray:
    """Column index (0-20) of each residue."""
    return _ONEHOT_INDEX[np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8)]


def onehot_residues(seqs: Sequence[str]) -> Features:
    """One-hot per residue (20 amino acids + other), float32 [L, 21] per sequence."""
    ids = np.concatenate([onehot_ids(s) for s in seqs]) if seqs else np.zeros(0, dtype=np.int64)
    data = np.zeros((ids.size, ONEHOT_DIM), dtype=np.float32)
    data[np.arange(ids.size), ids] = 1.0
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    return Features(None, Ragged(data, offsets), np.zeros(len(seqs), dtype=bool))


def onehot_flat(seqs: Sequence[str], length: int) -> Features:
    """FLIP's one-hot baseline: one-hot zero-padded or cut to `length`, flattened: [n, length * 21]."""
    out = np.zeros((len(seqs), length, ONEHOT_DIM), dtype=np.float32)
    for i, s in enumerate(seqs):
        ids = onehot_ids(s[:length])
        out[i, np.arange(ids.size), ids] = 1.0
    truncated = np.array([len(s) > length for s in seqs], dtype=bool)
    return Features(out.reshape(len(seqs), -1), None, truncated)


def cache_path(cache_dir: Path, model: Model, layer: int) -> Path:
    """The cache file of one model (source + revision + compute dtype) and resolved layer."""
    dtype = str(model.encoder.embed.weight.dtype).removeprefix("torch.")
    tag = hashlib.sha256(f"{model.source}@{model.revision}@{dtype}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name)[:40]
    return cache_dir / "features" / f"{slug}-{tag}-layer{layer}.h5"


def seq_key(seq: str) -> bytes:
    return hashlib.sha256(seq.encode()).hexdigest().encode()


def model_features(
    seqs: Sequence[str],
    model: Model,
    layer: int,
    per_residue: bool,
    cache_dir: Path,
    chunk: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Features:
    """Mean-pooled (and with `per_residue`, per-residue) embeddings of one layer, through the cache.

    Only sequences missing from the cache are embedded, `chunk` at a time, and each chunk is
    written before the next starts, so an interrupted run resumes where it stopped.
    """
    layer = model.layers([layer])[0]
    path = cache_path(cache_dir, model, layer)
    ensure_dir(path.parent, "feature cache folder")
    keys = [seq_key(s) for s in seqs]
    with open_cache(path) as h5:
        _init(h5, model, layer)
        have_pooled = _index(h5["pooled/keys"])
        have_res = _index(h5["residues/keys"])
        todo = sorted(
            {i for i, k in enumerate(keys) if k not in have_pooled or (per_residue and k not in have_res)},
            key=lambda i: len(seqs[i]),
        )
        unique: dict[bytes, int] = {}
        for i in todo:
            unique.setdefault(keys[i], i)
        rows = list(unique.values())
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            out = model.embed(
                [seqs[i] for i in part], layers=[layer], pooling=("mean",), per_residue=per_residue
            )
            new_p = [j for j, i in enumerate(part) if keys[i] not in have_pooled]
            _append_pooled(
                h5, [keys[part[j]] for j in new_p], out.pooled["mean"][new_p, 0], out.truncated[new_p]
            )
            if out.residues is not None:
                new_r = [j for j, i in enumerate(part) if keys[i] not in have_res]
                _append_residues(h5, [keys[part[j]] for j in new_r], [out.residues[j][:, 0] for j in new_r])
                have_res = _index(h5["residues/keys"])
            have_pooled = _index(h5["pooled/keys"])
            h5.flush()
            if progress is not None:
                progress(min(start + chunk, len(rows)), len(rows))
        pooled_all = h5["pooled/mean"][: len(have_pooled)]
        trunc_all = h5["pooled/truncated"][: len(have_pooled)]
        prow = np.array([have_pooled[k] for k in keys], dtype=np.int64)
        residues = None
        if per_residue:
            start_ds, length_ds, data_ds = h5["residues/start"], h5["residues/length"], h5["residues/data"]
            rrow = [have_res[k] for k in keys]
            starts, lengths = start_ds[:][rrow], length_ds[:][rrow]
            offsets = np.zeros(len(keys) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum(lengths)
            data = np.empty((int(offsets[-1]), data_ds.shape[1]), dtype=np.float16)
            for i, (s, n) in enumerate(zip(starts, lengths)):
                data[offsets[i] : offsets[i + 1]] = data_ds[s : s + n]
            residues = Ragged(data, offsets)
    return Features(pooled_all[prow], residues, trunc_all[prow].astype(bool))


def open_cache(path: Path, wait_s: float = 3600.0) -> h5py.File:
    """The cache file, opened for appending; waits while another run holds it (HDF5's file lock)."""
    deadline, waiting = time.monotonic() + wait_s, False
    while True:
        try:
            return h5py.File(path, "a")
        except OSError as exc:  # locked by another run, or not an HDF5 file
            locked = "unable to lock file" in str(exc) or "errno = 11" in str(exc)
            if not locked or time.monotonic() > deadline:
                raise HubError(f"cannot open feature cache {path}: {exc}") from None
            if not waiting:
                print(f"waiting for another run to release the feature cache {path}", file=sys.stderr)
                waiting = True
            time.sleep(0.5)


def _init(h5: h5py.File, model: Model, layer: int) -> None:
    if "pooled" in h5:
        return
    d = model.encoder.config.d_model
    h5.attrs.update(
        {
            "format": FORMAT,
            "model": model.name,
            "source": model.source,
            "revision": model.revision,
            "layer": layer,
            "d_model": d,
            "protembed_version": __version__,
        }
    )
    h5.create_dataset("pooled/keys", (0,), maxshape=(None,), dtype="S64", chunks=(4096,))
    h5.create_dataset("pooled/mean", (0, d), maxshape=(None, d), dtype=np.float32, chunks=(64, d))
    h5.create_dataset("pooled/truncated", (0,), maxshape=(None,), dtype=bool, chunks=(4096,))
    h5.create_dataset("residues/keys", (0,), maxshape=(None,), dtype="S64", chunks=(4096,))
    h5.create_dataset("residues/start", (0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
    h5.create_dataset("residues/length", (0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
    h5.create_dataset("residues/data", (0, d), maxshape=(None, d), dtype=np.float16, chunks=(256, d))


def _index(keys_ds: h5py.Dataset) -> dict[bytes, int]:
    return {bytes(k): i for i, k in enumerate(keys_ds[:])}


def _grow(ds: h5py.Dataset, n: int) -> int:
    old = ds.shape[0]
    ds.resize(old + n, axis=0)
    return old


def _append_pooled(h5: h5py.File, keys: list[bytes], mean: np.ndarray, truncated: np.ndarray) -> None:
    # keys last: a row counts as cached only once its data is written.
    n = len(keys)
    if not n:
        return
    at = h5["pooled/keys"].shape[0]
    for name, values in (("pooled/mean", mean), ("pooled/truncated", truncated)):
        ds = h5[name]
        ds.resize(at + n, axis=0)
        ds[at : at + n] = values
    ds = h5["pooled/keys"]
    ds.resize(at + n, axis=0)
    ds[at:] = np.array(keys, dtype="S64")


def _append_residues(h5: h5py.File, keys: list[bytes], arrays: list[np.ndarray]) -> None:
    if not keys:
        return
    half = np.concatenate(arrays).astype(np.float16)
    if not np.isfinite(half).all():
        raise FlipError("residue features overflow the float16 cache; use another --layer")
    data = h5["residues/data"]
    start = _grow(data, len(half))
    data[start:] = half
    starts = start + np.concatenate([[0], np.cumsum([len(a) for a in arrays])[:-1]])
    at = h5["residues/keys"].shape[0]
    for name, values in (("residues/start", starts), ("residues/length", [len(a) for a in arrays])):
        ds = h5[name]
        ds.resize(at + len(keys), axis=0)
        ds[at:] = values
    ds = h5["residues/keys"]
    ds.resize(at + len(keys), axis=0)
    ds[at:] = np.array(keys, dtype="S64")
