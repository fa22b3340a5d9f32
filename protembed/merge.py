"""Shard files of a multi-node run: where each rank's rows go, and joining the shards.

Under `torchrun`, rank r of W embeds a contiguous range of the input's rows, chosen so that
every rank gets about the same number of tokens, into `OUTPUT.shard-<r>-of-<W>.h5` (a normal
protembed file of those rows, with attributes `shard_start`, `shard_stop`, `shard_rank`,
`shard_world_size`). When all are done, rank 0 either merges them into OUTPUT (a plain file,
identical to a single-process run) or, with `--no-merge`, writes OUTPUT as an HDF5 virtual-dataset
file that reads through to the shards (which must then stay beside it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import h5py
import numpy as np

from protembed import signals
from protembed.cache import check_replaceable, write_partial
from protembed.errors import StoreError
from protembed.reader import FORMAT, open_embeddings, open_h5, plain, row_blocks, row_bytes
from protembed.store import EmbeddingWriter
from protembed.store_file import TEXT_ROWS

SHARD_ATTRS = ("shard_start", "shard_stop", "shard_rank", "shard_world_size")
WRITER_ATTRS = ("format", "format_version", "protembed_version", "n_sequences", "per_residue", "store_dtype",
                "created", "complete")  # fmt: skip
VARYING_ATTRS = ("protembed_version", "n_sequences", "created", "complete")  # may differ between shards
COPY_BYTES = 64 << 20  # embeddings copied per step when merging (at least one row)


def shard_ranges(n_tokens: np.ndarray, window_of: np.ndarray, world: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) per rank, cut at read-ahead window boundaries (so each
    rank computes exactly the batches a single process would), with about equal token counts."""
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    n = len(n_tokens)
    bounds = np.flatnonzero(np.r_[True, window_of[1:] != window_of[:-1]]) if n else np.zeros(0, np.int64)
    starts = (np.cumsum(n_tokens) - n_tokens)[bounds]  # first token of each window
    total = int(n_tokens.sum())
    # a window belongs to the rank whose share of the token stream it starts in
    cut_windows = [int(np.searchsorted(starts, total * r / world, side="left")) for r in range(1, world)]
    cuts = [0] + [int(bounds[w]) if w < len(bounds) else n for w in cut_windows] + [n]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def shard_path(output: Path, rank: int, world: int) -> Path:
    """Where rank `rank` writes its shard, next to the output."""
    return output.with_name(f"{output.stem}.shard-{rank:03d}-of-{world:03d}{output.suffix or '.h5'}")


def shard_worlds(output: Path) -> list[int]:
    """World sizes of the shard files beside `output` (`*-of-<world>`), ascending."""
    suffix = output.suffix or ".h5"
    pattern = re.compile(re.escape(output.stem) + r"\.shard-\d{3,}-of-(\d{3,})" + re.escape(suffix))
    try:
        found = [(p, m) for p in output.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except OSError:
        return []
    return sorted({int(m.group(1)) for p, m in found if not p.is_dir()})  # a folder is not a shard


def shard_sets(worlds: list[int]) -> str:
    """Shard sets named for messages: `*-of-002, *-of-004`."""
    return ", ".join(f"*-of-{w:03d}" for w in worlds)


def find_shards(output: Path) -> list[Path]:
    """The shard files of an output, in rank order.

    Raises:
        StoreError: no shards, a rank's file missing, or shards of runs with different world sizes.
    """
    worlds = shard_worlds(output)
    if not worlds:
        raise StoreError(f"{output}: no shard files ({shard_path(output, 0, 1).name} ...) beside it")
    if len(worlds) > 1:
        raise StoreError(
            f"{output}: shard files of runs with different numbers of ranks beside it "
            f"({shard_sets(worlds)}); move away the set that does not belong to this output"
        )
    expected = [shard_path(output, r, worlds[0]) for r in range(worlds[0])]
    missing = [p.name for p in expected if not p.exists()]
    if missing:
        raise StoreError(f"{output}: shard files missing: {', '.join(missing)}")
    return expected


def _check_shards(shards: list[Path]) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Shared settings of complete, contiguous shards; StoreError naming the first problem."""
    settings: dict[str, Any] | None = None
    ranges, budgets = [], set()
    for path in shards:
        with open_h5(path) as h5:
            attrs = {k: plain(v) for k, v in h5.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise StoreError(f"{path}: not a protembed embeddings file")
            if not attrs.get("complete"):
                done = int(np.count_nonzero(h5["written"][...]))
                todo = int(np.count_nonzero(~h5["skipped"][...]))
                raise StoreError(
                    f"{path}: shard is unfinished ({done} of {todo} records); rerun the same command "
                    "(torchrun ...) to finish every shard before merging"
                )
        if any(k not in attrs for k in SHARD_ATTRS):
            raise StoreError(f"{path}: not a shard of a torchrun job (no shard_start/shard_stop attributes)")
        ranges.append((int(attrs["shard_start"]), int(attrs["shard_stop"])))
        mine = {k: v for k, v in attrs.items() if k not in (*SHARD_ATTRS, *VARYING_ATTRS)}
        budgets.add(mine.pop("tokens_per_batch", None))  # ranks may size batches to their own GPU
        if settings is None:
            settings = mine
        elif mine != settings:
            differ = sorted(k for k in set(mine) | set(settings) if mine.get(k) != settings.get(k))
            raise StoreError(f"{path}: made with other settings than {shards[0].name} ({', '.join(differ)})")
    starts = [a for a, _ in ranges]
    if starts[0] != 0 or any(ranges[i][1] != starts[i + 1] for i in range(len(ranges) - 1)):
        listing = ", ".join(f"{p.name} rows {a}:{b}" for p, (a, b) in zip(shards, ranges))
        raise StoreError(f"{shards[0].resolve().parent}: shards do not cover consecutive rows ({listing})")
    assert settings is not None
    settings = {k: v for k, v in settings.items() if k not in WRITER_ATTRS}
    if len(budgets) == 1 and None not in budgets:  # kept only when every shard used the same
        settings["tokens_per_batch"] = budgets.pop()
    return settings, ranges


def merge_shards(
    output: Path,
    shards: list[Path],
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Join complete shards into one plain output, identical to a single-process run (compressed
    as the shards are). An unfinished output of an earlier merge of the same shards resumes.
    `progress(rows copied, rows to copy)` is called once before the copy and after every step."""
    settings, _ = _check_shards(shards)
    files = [open_embeddings(p) for p in shards]
    try:
        first = files[0]
        compression = first.h5[first.poolings[0]].compression  # the job's --compression
        ids = _JoinedTexts([f.h5["ids"] for f in files])
        writer = EmbeddingWriter.open(
            output, attrs=settings, ids=ids, descriptions=_JoinedTexts([f.h5["descriptions"] for f in files]),
            lengths=np.concatenate([f.lengths for f in files]),
            truncated=np.concatenate([f.h5["truncated"][...] for f in files]),
            skipped=np.concatenate([f.skipped for f in files]), skip_reasons=_skip_reasons(files),
            n_layers=len(first.layers), d_model=first.h5[first.poolings[0]].shape[-1],
            poolings=first.poolings, per_residue="residues" in first.h5,
            store_dtype=str(first.attrs["store_dtype"]), compression=compression, overwrite=overwrite,
        )  # fmt: skip
        todo = np.zeros(len(ids), dtype=bool)
        todo[writer.pending] = True  # all rows, less those a stopped merge already copied
        count = [0, int(todo.sum())]  # copied, to copy

        def copied(rows: int) -> None:
            count[0] += rows
            if progress is not None:
                progress(*count)

        copied(0)
        with writer:
            base = 0
            for f in files:
                _copy_rows(f, writer, base, todo[base : base + len(f)], copied)
                base += len(f)
            writer.close(complete=True)
    finally:
        for f in files:
            f.close()
    return output


class _JoinedTexts(Sequence[str]):
    """A text dataset of several shards end to end, read a slice at a time (as the writer takes
    it), never whole: a list of every id and header of a large job would cost gigabytes."""

    def __init__(self, datasets: list[h5py.Dataset]) -> None:
        self._datasets = datasets
        self._ends = np.cumsum([0, *(len(d) for d in datasets)])

    def __len__(self) -> int:
        return int(self._ends[-1])

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if not isinstance(i, slice):
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} out of range for {len(self)} rows")
            i %= len(self)
            return self[i : i + 1][0]
        start, stop, step = i.indices(len(self))
        if step != 1:
            raise ValueError("slices with a step are not supported")
        texts: list[str] = []
        for ds, begin, end in zip(self._datasets, self._ends[:-1].tolist(), self._ends[1:].tolist()):
            if max(start, begin) < min(stop, end):
                texts += ds.asstr()[max(start, begin) - begin : min(stop, end) - begin].tolist()
        return texts


def _skip_reasons(files: list[Any]) -> dict[int, str]:
    """Why each skipped row of the joined shards was skipped, by output row (read where there are any)."""
    reasons: dict[int, str] = {}
    base = 0
    for f in files:
        rows = np.flatnonzero(f.skipped)
        for start in np.unique(rows // TEXT_ROWS * TEXT_ROWS).tolist():
            block = f.h5["skip_reasons"].asstr()[start : start + TEXT_ROWS]
            for r in rows[(rows >= start) & (rows < start + TEXT_ROWS)].tolist():
                reasons[base + r] = block[r - start]
        base += len(f)
    return reasons


def _copy_rows(
    f: Any, writer: EmbeddingWriter, base: int, todo: np.ndarray, copied: Callable[[int], None]
) -> None:
    """Copy the rows of shard `f` marked in `todo` to rows base + i of the output, about
    COPY_BYTES at a time (per-residue rows of a large model are megabytes each); `copied(n)`
    after each step."""
    pooled_bytes = sum(row_bytes(f.h5[name]) for name in f.poolings)
    if "residues" in f.h5:  # each row's residues too
        cost = pooled_bytes + f.lengths.astype(np.int64) * row_bytes(f.h5["residues"])
    else:
        cost = np.full(len(f), pooled_bytes, dtype=np.int64)
    for start, stop in row_blocks(cost, COPY_BYTES):
        signals.check()
        rows = np.flatnonzero(todo[start:stop]) + start
        if rows.size:
            pooled = {}
            for name in f.poolings:
                block = f.pooled_block(name, start, stop)[rows - start]
                pooled[name] = block if block.ndim == 3 else block[:, None, :]
            residues = None
            if "residues" in f.h5:
                block, offs = f.residue_block(start, stop)
                block = block if block.ndim == 3 else block[:, None, :]
                residues = [block[offs[r - start] : offs[r - start + 1]] for r in rows]
            writer.write(rows + base, pooled, residues)
            copied(int(rows.size))


def write_virtual(output: Path, shards: list[Path], overwrite: bool = False) -> Path:
    """Write OUTPUT as an HDF5 virtual-dataset file over complete shards (names relative to it)."""
    settings, _ = _check_shards(shards)
    check_replaceable(output)
    if output.exists() and not overwrite:
        raise StoreError(f"{output}: exists; pass --overwrite to replace it")
    with h5py.File(shards[0], "r") as h5:
        names = [k for k in h5 if k != "offsets"]
        attrs = {k: h5.attrs[k] for k in h5.attrs if k not in SHARD_ATTRS}
    sizes, lengths = [], []
    for path in shards:
        with h5py.File(path, "r") as h5:
            sizes.append({k: h5[k].shape for k in names})
            lengths.append(h5["lengths"][...].astype(np.int64))
    write_partial(output, lambda tmp: _write_layout(tmp, shards, names, sizes, lengths, attrs))
    return output


def _write_layout(
    tmp: Path,
    shards: list[Path],
    names: list[str],
    sizes: list[dict[str, Any]],
    lengths: list[np.ndarray],
    attrs: dict[str, Any],
) -> None:
    """The virtual-dataset file itself: each dataset maps its rows onto the shards' in order."""
    with h5py.File(tmp, "w", libver="latest") as out:
        for name in names:
            with h5py.File(shards[0], "r") as h5:
                dtype, tail = h5[name].dtype, h5[name].shape[1:]
            total = sum(s[name][0] for s in sizes)
            layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
            at = 0
            for path, s in zip(shards, sizes):
                n = s[name][0]
                layout[at : at + n] = h5py.VirtualSource(path.name, name, shape=s[name])
                at += n
            out.create_virtual_dataset(name, layout, fillvalue=None)
        if "residues" in names:
            all_lengths = np.concatenate(lengths)
            out.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(all_lengths)]).astype(np.int64))
        for key, value in attrs.items():
            out.attrs[key] = value
        out.attrs["n_sequences"] = sum(s["ids"][0] for s in sizes)
        out.attrs["virtual_shards"] = np.array([p.name for p in shards], dtype=h5py.string_dtype())
        out.attrs["complete"] = True
