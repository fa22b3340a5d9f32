"""The streaming part of `embed`: reader thread -> compute -> writer thread, bounded queues.

Rows are grouped into read-ahead windows of consecutive records fixed by the input alone (about
`window_tokens` tokens each); each window is length-sorted and cut into token-budget batches (the
input's last few batches into smaller ones, so several devices finish together).
Batches are formed over every row, not only the rows still to compute, so a resumed run, or a
torchrun shard (shards hold whole windows), computes exactly the batches an uninterrupted
single-process run would: results are bitwise equal (for a shard, unless a sequence repeats in
another shard: duplicates are computed once per shard, which changes that window's batches).
Batches whose rows are all written already are not computed again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from protembed import signals
from protembed.alphabet import Alphabet
from protembed.batching import split_tail, token_batches
from protembed.compute import BatchResult, JobSpec, SequenceTooLargeError, compute_unit
from protembed.errors import FastaError, InvalidSequenceError, ProtembedError
from protembed.fasta import FastaIndex, iter_records, token_hash
from protembed.models.encoder import Encoder
from protembed.store import EmbeddingWriter
from protembed.windows import split

MAX_WINDOW_TOKENS = 1 << 21  # tokens read ahead and length-sorted together (bounded memory)
MIN_WINDOW_TOKENS = 1 << 16
TAIL_BATCHES, TAIL_PIECES = 3, 4  # the input's last batches are cut smaller (see split_tail)

Unit = tuple[np.ndarray, list[np.ndarray], list[int] | None]  # representative rows, tokens, window starts
Progress = Callable[[int, int, int], None]
DONE = None  # end-of-stream marker on every queue
POLL_S = 0.5  # longest sleep of a waiting pipeline thread before it looks again


@dataclass
class Work:
    """The rows of one output (the index's rows: a torchrun rank's part has its own): which to
    compute, and how they are read."""

    index: FastaIndex
    alphabet: Alphabet
    members: Members  # representative row -> rows holding the same sequence
    pending: np.ndarray  # bool [N], rows still to write
    lengths: np.ndarray  # int [N], residues stored per row
    limit: int
    window: bool
    window_of: np.ndarray  # int [N], read-ahead window of each row (see `read_windows`)
    last_window: int  # the whole input's last window, whose batches end small (see `split_tail`)


def window_tokens(total_tokens: int) -> int:
    """Tokens per read-ahead window: 1/256 of the input, within [2^16, 2^21]."""
    return int(min(MAX_WINDOW_TOKENS, max(MIN_WINDOW_TOKENS, total_tokens // 256)))


def read_windows(n_tokens: np.ndarray) -> np.ndarray:
    """Window index of each row: rows whose first token falls in the same window_tokens span."""
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    starts = np.cumsum(n_tokens) - n_tokens
    return starts // window_tokens(int(n_tokens.sum()))


class Executor(Protocol):
    """Takes units from `get` until it returns DONE and hands `(reps, result)` to `put`."""

    def serve(self, get: Callable[[], Unit | None], put: Callable[[Any], None]) -> None: ...


class LocalExecutor:
    """Computes on this thread with an already-loaded encoder."""

    def __init__(self, encoder: Encoder, spec: JobSpec) -> None:
        self.encoder, self.spec = encoder, spec

    def serve(self, get: Callable[[], Unit | None], put: Callable[[Any], None]) -> None:
        while (unit := get()) is not None:
            reps, tokens, starts = unit
            try:
                put((reps, compute_unit(self.encoder, self.spec, tokens, starts)))
            except SequenceTooLargeError as exc:
                exc.row = int(reps[min(exc.position, reps.size - 1)])
                raise


class Members:
    """Representative row -> every row holding the same sequence, read like a dict.

    Kept as three arrays (about 24 bytes per row), not a dict of arrays (about 230), so that an
    input of tens of millions of records fits: `rows` grouped by representative, where each
    group `starts`, and `group_of` each global row (-1 where the row represents no group).
    """

    def __init__(self, rows: np.ndarray, starts: np.ndarray, group_of: np.ndarray) -> None:
        self.rows, self.starts, self.group_of = rows, starts, group_of

    def __len__(self) -> int:
        return int(self.starts.size) - 1

    def __contains__(self, row: int) -> bool:
        return 0 <= row < self.group_of.size and self.group_of[row] >= 0

    def __getitem__(self, row: int) -> np.ndarray:
        if row not in self:
            raise KeyError(row)
        g = int(self.group_of[row])
        return self.rows[self.starts[g] : self.starts[g + 1]]

    def values(self) -> Iterator[np.ndarray]:
        for g in range(len(self)):
            yield self.rows[self.starts[g] : self.starts[g + 1]]


def plan_members(rows: np.ndarray, first_row_of: np.ndarray) -> Members:
    """Representative row -> every row (of `rows`) holding the same sequence."""
    reps = first_row_of[rows]
    order = np.argsort(reps, kind="stable")
    reps, rows = reps[order], np.asarray(rows, dtype=np.int64)[order]
    assert not reps.size or reps[0] >= 0, "skipped rows have no sequence"
    firsts = np.flatnonzero(np.r_[True, reps[1:] != reps[:-1]]) if reps.size else np.zeros(0, np.int64)
    group_of = np.full(first_row_of.size, -1, dtype=np.int64)
    group_of[reps[firsts]] = np.arange(firsts.size)
    return Members(rows, np.r_[firsts, rows.size].astype(np.int64), group_of)


def run_pipeline(
    work: Work, spec: JobSpec, executor: Executor, writer: EmbeddingWriter, progress: Progress | None
) -> None:
    """Stream every pending row through `executor` into `writer`; the first error stops all."""
    units: queue.Queue = queue.Queue(maxsize=8)
    results: queue.Queue = queue.Queue(maxsize=8)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            for unit in units_to_compute(work, spec.budget):
                while not stop.is_set():
                    try:
                        units.put(unit, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the main thread, which re-raises it
            errors.append(exc)
        units.put(DONE)

    def next_result() -> Any:
        # A timed wait re-checks the queue, so a wake-up lost to a signal (Ctrl-C landing inside
        # the main thread's put) cannot leave this thread asleep beside a waiting item.
        while True:
            try:
                return results.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def write() -> None:
        rows_done = res_done = 0
        total = int(work.pending.sum())
        try:
            while (item := next_result()) is not DONE:
                rows, pooled, residues = expand(work, *item)
                writer.write(rows, pooled, residues)
                rows_done += rows.size
                res_done += int(work.lengths[rows].sum())
                if progress is not None:
                    progress(rows_done, res_done, total)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            while next_result() is not DONE:  # drain so the compute side never blocks
                pass

    def get() -> Unit | None:  # called by the executor in the main thread, once per unit
        signals.check()
        return None if errors else units.get()

    reader = threading.Thread(target=read, name="protembed-reader", daemon=True)
    writer_thread = threading.Thread(target=write, name="protembed-writer", daemon=True)
    reader.start()
    writer_thread.start()
    try:
        executor.serve(get, results.put)
    except SequenceTooLargeError as exc:
        row = exc.row if exc.row is not None else -1
        name = work.index.ids[row] if row >= 0 else "?"
        raise ProtembedError(
            f"{work.index.source}: record '{name}' ({exc.n_tokens - 2} residues) does not fit in the memory "
            f"of {exc.device} even alone; use --max-length or --long window"
        ) from None
    finally:
        stop.set()
        results.put(DONE)
        while writer_thread.is_alive():  # timed joins keep Ctrl-C responsive
            writer_thread.join(timeout=POLL_S)
        reader.join(timeout=5)
    if errors:
        raise errors[0]


def units_to_compute(work: Work, budget: int) -> Iterator[Unit]:
    """Length-sorted token-budget batches (and long-protein windows) with rows still pending."""
    rows: list[int] = []
    tokens: list[np.ndarray] = []
    current = -1
    for row, seq in iter_records(work.index):
        if row not in work.members:
            continue
        if work.window_of[row] != current:
            yield from _sorted(work, rows, tokens, budget, current)
            rows, tokens, current = [], [], int(work.window_of[row])
        # the scan validated this record and hashed its tokens: it was edited while this run read it
        try:
            ids = work.alphabet.encode(seq)
            same = token_hash(ids[1:-1]) == int(work.index.seq_hash[row])
        except InvalidSequenceError:
            same = False
        if not same:
            changed = f"input changed since it was scanned (record {work.index.first_row + row + 1})"
            raise FastaError(work.index.source, None, None, changed)
        if ids.size - 2 > work.limit:
            if work.window:
                if work.pending[work.members[row]].any():
                    pieces, starts = split(ids, work.limit)
                    yield np.array([row]), pieces, starts
                continue
            ids = np.concatenate([ids[: work.limit + 1], ids[-1:]])
        rows.append(row)
        tokens.append(ids)
    yield from _sorted(work, rows, tokens, budget, current)


def _sorted(
    work: Work, rows: list[int], tokens: list[np.ndarray], budget: int, window: int
) -> Iterator[Unit]:
    if not rows:
        return
    row_arr = np.array(rows, dtype=np.int64)
    n_tokens = np.array([t.size for t in tokens])
    batches = token_batches(n_tokens, budget)
    if window == work.last_window:  # the input's last window: end on small units
        batches = split_tail(batches, n_tokens, TAIL_BATCHES, TAIL_PIECES)
    for idx in batches:
        reps = row_arr[idx]
        if any(work.pending[work.members[int(r)]].any() for r in reps):
            yield reps, [tokens[i] for i in idx], None


def expand(
    work: Work, reps: np.ndarray, result: BatchResult
) -> tuple[np.ndarray, dict[str, np.ndarray], list[np.ndarray] | None]:
    """Rows to write for computed representatives: every pending row with the same sequence."""
    groups = [g[work.pending[g]] for g in (work.members[int(r)] for r in reps)]
    counts = np.array([g.size for g in groups])
    rows = np.concatenate(groups)
    pooled = {k: np.repeat(v, counts, axis=0) for k, v in result.pooled.items()}
    residues = None
    if result.residues is not None:
        residues = [arr for arr, c in zip(result.residues, counts) for _ in range(c)]
    return rows, pooled, residues
