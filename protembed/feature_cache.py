"""Language-model features for FLIP heads, cached as ordinary `protembed embed` output files.

Layout: `<cache>/features/<model>-<tag>/layer<L>/{pooled,residues}/part-<digest>.h5`, where the tag
hashes the model's source, revision and compute dtype. Every part is an embeddings file (README,
"HDF5 layout") whose ids are the sha256 of the sequences it holds, written by `embed_fasta`: it runs
on every GPU, resumes after an interruption and opens with `protembed.reader`. `pooled` parts hold
float32 means; `residues` parts float16 per-residue embeddings. A run embeds only the sequences
that no complete part holds yet, into one new part, so another head or seed costs seconds.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from protembed.cache import ensure_dir
from protembed.embed import ModelRef, embed_fasta
from protembed.errors import StoreError
from protembed.features import Features, Ragged
from protembed.flip import FlipError
from protembed.reader import open_embeddings


def model_folder(cache_dir: Path, ref: ModelRef, layer: int, dtype: str) -> Path:
    """The cache folder of one model (source + revision + compute dtype) and resolved layer."""
    tag = hashlib.sha256(f"{ref.source}@{ref.revision}@{dtype}".encode()).hexdigest()[:12]
    name = Path(ref.source).name if Path(ref.source).is_dir() else ref.name  # a local folder: its name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]
    return cache_dir / "features" / f"{slug}-{tag}" / f"layer{layer}"


def seq_key(seq: str) -> str:
    return hashlib.sha256(seq.encode()).hexdigest()


def model_features(
    seqs: Sequence[str],
    ref: ModelRef,
    layer: int,
    per_residue: bool,
    cache_dir: Path,
    *,
    dtype: str = "float32",
    device: str | None = None,
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> Features:
    """Mean-pooled (`per_residue`: per-residue) embeddings of one resolved layer, through the cache."""
    folder = model_folder(cache_dir, ref, layer, dtype) / ("residues" if per_residue else "pooled")
    ensure_dir(folder, "feature cache folder")
    keys = [seq_key(s) for s in seqs]
    with folder_lock(folder):
        where = _index(folder)
        missing = dict(sorted({k: s for k, s in zip(keys, seqs) if k not in where}.items()))
        if missing:
            digest = hashlib.sha256("".join(missing).encode()).hexdigest()[:16]
            part = folder / f"part-{digest}.h5"
            fasta = folder / f"part-{digest}.fasta"
            fasta.write_text("".join(f">{k}\n{s}\n" for k, s in missing.items()))
            local = Path(ref.source).is_dir()
            embed_fasta(
                fasta, part, model=ref.source, revision=None if local else ref.revision,
                layers=[layer], per_residue=per_residue, dtype=dtype,
                store_dtype="float16" if per_residue else "float32", device=device, backend=backend,
                quiet=True, progress=None if progress is None else (lambda rows, _res, n: progress(rows, n)),
            )  # fmt: skip
            fasta.unlink()
            where = _index(folder)
        return _gather(keys, where, per_residue)


@contextmanager
def folder_lock(folder: Path, wait_s: float = 3600.0) -> Iterator[None]:
    """Hold the folder's lock file; another run that holds it is waited for (with a notice)."""
    with open(folder / ".lock", "a") as fh:
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise FlipError(
                        f"cannot lock the feature cache {folder}: {exc.strerror or exc}"
                    ) from None
                if not waiting:
                    print(f"waiting for another run to release the feature cache {folder}", file=sys.stderr)
                    waiting = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _index(folder: Path) -> dict[str, tuple[Path, int]]:
    """Sequence key -> (part, row) over the complete parts of a folder."""
    where: dict[str, tuple[Path, int]] = {}
    for part in sorted(folder.glob("part-*.h5")):
        try:
            with open_embeddings(part) as emb:
                skipped = emb.skipped
                for row, key in enumerate(emb.ids):
                    if not skipped[row]:
                        where.setdefault(key, (part, row))
        except StoreError:  # unfinished (a later run with the same sequences resumes it)
            continue
    return where


def _gather(keys: list[str], where: dict[str, tuple[Path, int]], per_residue: bool) -> Features:
    """The features of `keys`, in order, read part by part."""
    rows_of: dict[Path, list[int]] = {}
    for key in keys:
        part, row = where[key]
        rows_of.setdefault(part, []).append(row)
    pooled: dict[tuple[Path, int], np.ndarray] = {}
    truncated: dict[tuple[Path, int], bool] = {}
    residues: dict[tuple[Path, int], np.ndarray] = {}
    for part, rows in rows_of.items():
        with open_embeddings(part) as emb:
            trunc = emb.h5["truncated"][...]
            if per_residue:
                offsets = emb.h5["offsets"][...]
                data = emb.h5["residues"][...]
                for r in set(rows):
                    residues[part, r] = data[offsets[r] : offsets[r + 1]]
                    truncated[part, r] = bool(trunc[r])
            else:
                mean = emb.pooled("mean")
                for r in set(rows):
                    pooled[part, r], truncated[part, r] = mean[r], bool(trunc[r])
    order = [where[k] for k in keys]
    trunc_out = np.array([truncated[o] for o in order], dtype=bool)
    if not per_residue:
        return Features(np.array([pooled[o] for o in order], dtype=np.float32), None, trunc_out)
    arrays = [residues[o] for o in order]
    if not all(np.isfinite(a).all() for a in arrays):
        raise FlipError("residue features overflow the float16 cache; use another --layer")
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    data = np.concatenate(arrays) if arrays else np.zeros((0, 0), dtype=np.float16)
    return Features(None, Ragged(data, offsets), trunc_out)
