"""Language-model features for FLIP heads, cached as ordinary `protembed embed` output files.

Layout: `<cache>/features/<model>-<tag>/layer<L>/{pooled,residues}/part-<digest>.h5`, where the tag
hashes the model's source, revision and compute dtype. Every part is an embeddings file (README,
"HDF5 layout") whose ids are the sha256 of the sequences it holds, written by `embed_fasta`: it runs
on every GPU, resumes after an interruption and opens with `protembed.reader`. `pooled` parts hold
float32 means; `residues` parts float16 per-residue embeddings. A run embeds only the sequences
that no complete part holds yet, into one new part, so another head or seed costs seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from protembed.cache import ensure_dir, held_lock, read_only
from protembed.embed import embed_fasta
from protembed.embed_setup import ModelRef
from protembed.errors import OutputExistsError, ResumeMismatchError, StoreError, first_line
from protembed.features import Features, Ragged
from protembed.flip import FlipError
from protembed.reader import EmbeddingFile, open_embeddings


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
    memo_dir: Path | None = None,
) -> Features:
    """Mean-pooled (`per_residue`: per-residue) embeddings of one resolved layer, through the cache
    in `cache_dir`; a local checkpoint's weights digest is remembered in `memo_dir` (default: the same)."""
    folder = model_folder(cache_dir, ref, layer, dtype) / ("residues" if per_residue else "pooled")
    keys = [seq_key(s) for s in seqs]
    if read_only(folder):  # a shared cache, filled by someone else
        return _read_only(folder, keys, per_residue, ref.config.d_model)
    ensure_dir(folder, "feature cache folder")
    local = Path(ref.source).is_dir()

    def embed(fasta: Path, part: Path, overwrite: bool) -> None:
        embed_fasta(
            fasta, part, model=ref.source, revision=None if local else ref.revision,
            layers=[layer], per_residue=per_residue, dtype=dtype,
            store_dtype="float16" if per_residue else "float32", device=device, backend=backend,
            overwrite=overwrite, quiet=True, cache_dir=memo_dir or cache_dir,
            progress=None if progress is None else (lambda rows, _res, n: progress(rows, n)),
        )  # fmt: skip

    with held_lock(folder / ".lock", f"the feature cache {folder}"):
        fresh: set[Path] = set()  # parts computed by this call
        while True:  # each pass removes one damaged older part, or returns, or raises
            where = _index(folder)
            missing = {k: s for k, s in zip(keys, seqs) if k not in where}  # first-seen order
            if missing:  # the name follows the order too: a resumed part must get the same input
                digest = hashlib.sha256("".join(missing).encode()).hexdigest()[:16]
                part, fasta = _part_paths(folder, digest)
                _write_fasta(fasta, missing)
                resumed = part.exists()
                try:  # resumes an interrupted part
                    embed(fasta, part, overwrite=False)
                except (OutputExistsError, ResumeMismatchError) as exc:  # ours, and it cannot resume
                    _notice(f"feature cache: computing {part.name} again ({_first_clause(exc, part)})")
                    embed(fasta, part, overwrite=True)
                    resumed = False
                fasta.unlink()
                written = _rows(part)
                assert written is not None, "embed_fasta returned with the part unfinished"
                where.update(written)
                if not resumed:  # rows an earlier run wrote may be damaged; these are the model's
                    fresh.add(part)
            try:
                return _gather(keys, where, per_residue, ref.config.d_model)
            except _DamagedPart as exc:
                if exc.part in fresh and exc.reason == NOT_FINITE:  # the model's own values
                    what = "values beyond float16, the residue cache's type" if per_residue else "NaN or inf"
                    text = f"layer {layer} of {ref.name} gives {what}; try another --layer"
                    raise FlipError(text) from None
                if exc.part in fresh:
                    raise FlipError(f"{exc.part}: the feature cache cannot be read ({exc.reason})") from None
                _notice(f"feature cache: {exc.part.name} is damaged ({exc.reason}); computing it again")
                _remove(exc.part)


def _read_only(folder: Path, keys: list[str], per_residue: bool, dim: int) -> Features:
    """The features of `keys` from a cache folder this process cannot change (or create): no lock,
    no repairs."""
    where = _index(folder, repair=False) if folder.is_dir() else {}
    if missing := len({k for k in keys if k not in where}):
        raise FlipError(
            f"{folder}: the feature cache is read-only and lacks {missing} of these sequences; "
            "pass a --cache-dir you can write to"
        )
    try:
        return _gather(keys, where, per_residue, dim)
    except _DamagedPart as exc:
        raise FlipError(f"{exc.part}: damaged ({exc.reason}), in a read-only feature cache") from None


def _part_paths(folder: Path, digest: str) -> tuple[Path, Path]:
    """The part that holds the sequences of `digest`, and the FASTA file it is computed from. Files
    of that name that another user left and this one cannot read and write (an interrupted run's)
    are left alone: the part then gets a name of this user's own."""
    for name in (f"part-{digest}", f"part-{digest}-u{os.geteuid()}"):
        part, fasta = folder / f"{name}.h5", folder / f"{name}.fasta"
        if all(not p.exists() or os.access(p, os.R_OK | os.W_OK) for p in (part, fasta)):
            break
    return part, fasta


def _write_fasta(path: Path, records: dict[str, str]) -> None:
    """The sequences a part is computed from (the embed pipeline reads a file)."""
    try:
        path.write_text("".join(f">{k}\n{s}\n" for k, s in records.items()))
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise FlipError(f"{path}: cannot write to the feature cache: {exc.strerror or exc}") from None


NOT_FINITE = "values that are not finite numbers"


class _DamagedPart(Exception):
    """A complete part whose data cannot be read (the file was truncated or overwritten)."""

    def __init__(self, part: Path, reason: str) -> None:
        super().__init__(f"{part}: {reason}")
        self.part, self.reason = part, reason


def _notice(text: str) -> None:
    print(text, file=sys.stderr)


def _first_clause(exc: Exception, part: Path) -> str:
    """The reason in an error about `part`, without the path and the --overwrite hint."""
    return (str(exc).removeprefix(f"{part}: ").split(";")[0].splitlines() or [""])[0]


def _index(folder: Path, repair: bool = True) -> dict[str, tuple[Path, int]]:
    """Sequence key -> (part, row) over the complete parts of a folder (the first part wins).
    A part that is no embeddings file is removed (`repair`: else left out, with a notice)."""
    where: dict[str, tuple[Path, int]] = {}
    for part in sorted(folder.glob("part-*.h5")):
        if not os.access(part, os.R_OK):  # another user's, not shared: not damaged, just not ours
            _notice(f"feature cache: ignoring {part.name} (permission denied)")
            continue
        try:
            rows = _rows(part)
        except StoreError as exc:  # not an embeddings file at all: damaged, of no use to anyone
            verb = "removing" if repair else "ignoring"
            _notice(f"feature cache: {verb} {part.name} ({_first_clause(exc, part)})")
            if repair:
                _remove(part)
            continue
        if rows is None:
            continue  # unfinished: a later run with the same sequences resumes it
        where.update({k: v for k, v in rows.items() if k not in where})
    return where


def _rows(part: Path) -> dict[str, tuple[Path, int]] | None:
    """Sequence key -> (part, row) of one complete part; None if it is unfinished, StoreError if it
    is not an embeddings file."""
    with open_embeddings(part, allow_incomplete=True) as emb:
        if not emb.attrs.get("complete"):
            return None
        skipped, ids = emb.skipped, emb.ids
    rows: dict[str, tuple[Path, int]] = {}
    for row, key in enumerate(ids):
        if not skipped[row]:
            rows.setdefault(key, (part, row))
    return rows


@contextmanager
def _reading(part: Path) -> Iterator[EmbeddingFile]:
    """An open complete part; any failure to read it is a _DamagedPart."""
    try:
        with open_embeddings(part) as emb:
            yield emb
    except StoreError as exc:
        raise _DamagedPart(part, _first_clause(exc, part)) from None
    except (OSError, RuntimeError, KeyError, IndexError, ValueError) as exc:  # truncated, lost or damaged
        raise _DamagedPart(part, first_line(exc)) from None


def _remove(part: Path) -> None:
    """Delete a damaged part (a folder in its place too); a FlipError when the cache is not ours to change."""
    try:
        if part.is_dir() and not part.is_symlink():
            shutil.rmtree(part)
        else:
            part.unlink()
    except OSError as exc:
        raise FlipError(
            f"{part}: damaged, and it cannot be removed ({exc.strerror or exc}); delete it (or ask "
            "its owner to), or pass another --cache-dir"
        ) from None


def _gather(keys: list[str], where: dict[str, tuple[Path, int]], per_residue: bool, dim: int) -> Features:
    """The features of `keys`, in order, read part by part (residues row by row, into one array);
    a part whose shapes do not fit (`dim` features per row) is a _DamagedPart."""
    order = [where[k] for k in keys]
    positions: dict[Path, list[int]] = {}
    for i, (part, _) in enumerate(order):
        positions.setdefault(part, []).append(i)
    truncated = np.zeros(len(keys), dtype=bool)
    if not per_residue:
        pooled: np.ndarray | None = None
        for part, at in positions.items():
            with _reading(part) as emb:
                rows = [order[i][1] for i in at]
                mean, trunc = emb.pooled("mean"), emb.h5["truncated"][...]
                if mean.shape != (len(emb), dim) or trunc.shape != (len(emb),):
                    raise _DamagedPart(part, f"mean {mean.shape}, expected {(len(emb), dim)}")
                if pooled is None:
                    pooled = np.zeros((len(keys), dim), dtype=np.float32)
                pooled[at], truncated[at] = mean[rows], trunc[rows]
                if not np.isfinite(pooled[at]).all():
                    raise _DamagedPart(part, NOT_FINITE)
        return Features(np.zeros((0, 0), np.float32) if pooled is None else pooled, None, truncated)
    spans: dict[int, tuple[int, int]] = {}
    for part, at in positions.items():
        with _reading(part) as emb:
            offsets, trunc = emb.h5["offsets"][...], emb.h5["truncated"][...]
            shape, expected = emb.h5["residues"].shape, (int(offsets[-1]), dim)
            if shape != expected or offsets.shape != (len(emb) + 1,) or trunc.shape != (len(emb),):
                raise _DamagedPart(part, f"residues {shape}, expected {expected}")
            for i in at:
                r = order[i][1]
                spans[i], truncated[i] = (int(offsets[r]), int(offsets[r + 1])), bool(trunc[r])
    lengths = [spans[i][1] - spans[i][0] for i in range(len(keys))]
    out_offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    out_offsets[1:] = np.cumsum(lengths)
    data = np.empty((int(out_offsets[-1]), dim), dtype=np.float16)
    for part, at in positions.items():
        with _reading(part) as emb:
            residues = emb.h5["residues"]
            for i in at:  # rows in part order when the part was written by this task: sequential
                a, b = spans[i]
                data[out_offsets[i] : out_offsets[i + 1]] = residues[a:b]
                if not np.isfinite(data[out_offsets[i] : out_offsets[i + 1]]).all():
                    raise _DamagedPart(part, NOT_FINITE)
    return Features(None, Ragged(data, out_offsets), truncated)
