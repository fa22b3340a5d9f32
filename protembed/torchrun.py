"""`embed` under torchrun: a rank's settings from its environment, and the shards joined at the end.

Every rank embeds its share of the rows into its own shard file (`merge.shard_path`); when all
are done, rank 0 copies them into the output (or, with `merge=False`, writes a virtual-dataset
file over them). A rerun of a stopped job reuses finished shards and resumes a stopped merge.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch

from protembed.errors import (
    RERUN,
    OptionError,
    OutputCompleteError,
    OutputExistsError,
    StoreError,
    first_line,
)
from protembed.merge import merge_shards, shard_path, shard_sets, shard_worlds, write_virtual
from protembed.progress_log import ProgressLog
from protembed.store_file import output_complete, unfinished_output

T = TypeVar("T")


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) under torchrun or a launcher setting its variables; else None."""
    env = os.environ

    def number(name: str, default: str | None) -> int:
        text = env.get(name, default)
        if text is None:
            raise OptionError(
                f"WORLD_SIZE={env['WORLD_SIZE']} is set but {name} is not (launch with torchrun)"
            )
        try:
            return int(text)
        except ValueError:
            raise OptionError(f"{name}={text!r} is not a number (set by torchrun or your launcher)") from None

    world = number("WORLD_SIZE", "1")
    if world <= 1:
        return None
    rank, local_rank = number("RANK", None), number("LOCAL_RANK", "0")
    if not 0 <= rank < world:
        raise OptionError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            raise OptionError(f"WORLD_SIZE={world} is set but {name} is not (launch with torchrun)")
    return rank, world, local_rank


def rank_device(local_rank: int) -> str:
    """The device of a rank launched without --device: its node's GPU by local rank, else the CPU
    (whose threads the node's ranks share)."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu:
        return f"cuda:{local_rank % n_gpu}"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return "cpu"


def check_output(output: Path, world: int, merge: bool, overwrite: bool) -> None:
    """OutputExistsError if `output` exists, unless overwriting or it is this job's stopped merge."""
    if not output.exists() or overwrite or _stopped_merge(output, world, merge):
        return
    state = output_complete(output)  # None: not an embeddings file
    if state:
        raise OutputCompleteError(
            f"{output}: a complete output already exists; pass --overwrite to replace it"
        )
    if state is False and not (worlds := shard_worlds(output)):
        raise OutputExistsError(
            f"{output}: an unfinished output of a single-process run (no shard files beside it); "
            "run its command again without torchrun to resume it, or pass --overwrite to start over"
        )
    if state is False and (done := [w for w in worlds if w != world and _shards_done(output, w)]):
        raise OutputExistsError(
            f"{output}: the stopped merge of a torchrun job of {done[0]} ranks ({shard_sets(done[:1])}); "
            f"run it with {done[0]} ranks, or `protembed merge {output}`, to finish it; or pass --overwrite "
            "to start over"
        )
    raise OutputExistsError(f"{output}: exists; pass --overwrite to replace it")


def check_single_process_output(output: Path, overwrite: bool) -> None:
    """Refuse a run without torchrun on an output that a torchrun job is writing or left unfinished
    (its shard files are beside it, and there is no output yet or it is that job's stopped merge):
    the run would neither use the shards nor remove them. A complete output is left to the usual
    checks (a `--no-merge` output keeps its shards beside it); an unfinished output beside shards
    that are not all done is a single-process run's own, which resumes. Wherever the run goes on,
    a note says that the shards stay."""
    worlds = shard_worlds(output)
    if not worlds:
        return
    shards = f"shard files of a torchrun job are beside {output} ({shard_sets(worlds)})"
    note = f"note: {shards}; this run does not use or remove them"
    state = output_complete(output)  # None: absent, or not an embeddings file
    if output.exists() and state is not False:  # complete, or not ours: the usual checks
        if overwrite:
            print(note, file=sys.stderr)
        return
    stopped_merge = state is False and any(_shards_done(output, w) for w in worlds)
    if overwrite or (state is False and not stopped_merge):
        print(note, file=sys.stderr)
        return
    if stopped_merge:
        raise OutputExistsError(
            f"{output}: the stopped merge of a torchrun job whose shards are all done "
            f"({shard_sets(worlds)}): `protembed merge {output}` or that torchrun command finishes it; "
            "or pass --overwrite to embed without them"
        )
    raise OutputExistsError(
        f"{shards}: run that torchrun command again to finish the job (or `protembed merge {output}`, "
        "with --virtual for a --no-merge job, once every shard is done), or pass --overwrite to embed "
        "without them"
    )


def _shards_done(output: Path, world: int) -> bool:
    """Whether every shard of a job of `world` ranks is beside `output` and complete."""
    return all(output_complete(shard_path(output, r, world)) for r in range(world))


def _stopped_merge(output: Path, world: int, merge: bool) -> bool:
    """Whether an existing `output` is the unfinished merge of this job's shards (all of them are
    beside it, as rank 0 merges only once every shard is done): a rerun resumes it."""
    shards = [shard_path(output, r, world) for r in range(world)]
    return merge and unfinished_output(output) and all(p.exists() for p in shards)


def note_stale_shards(output: Path, world: int) -> None:
    """Tell (on stderr) of shard sets beside `output` left by a run with another number of ranks:
    they are neither used nor removed."""
    stale = [w for w in shard_worlds(output) if w != world]
    if stale:
        note = f"shard files of a run with another number of ranks are beside {output} ({shard_sets(stale)})"
        print(f"note: {note}; this run of {world} ranks does not use them", file=sys.stderr)


def sum_over_ranks(values: list[float], elapsed: float) -> tuple[list[float], float]:
    """`values` summed over every rank, and the longest `elapsed` (a collective: all ranks call it)."""
    import torch.distributed as tdist

    sums = torch.tensor(values, dtype=torch.float64)
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    try:
        tdist.all_reduce(sums)
        tdist.all_reduce(slowest, op=tdist.ReduceOp.MAX)
    except RuntimeError as exc:
        raise _peer_lost(exc) from None
    return sums.tolist(), float(slowest)


def _peer_lost(exc: RuntimeError) -> StoreError:
    """A collective that failed because another rank stopped (killed, or its node lost)."""
    return StoreError(
        f"another rank of the job stopped ({first_line(exc)}); this rank's shard is kept: {RERUN} to resume"
    )


def run_rank(
    output: Path,
    rank: int,
    world: int,
    merge: bool,
    overwrite: bool,
    embed_shard: Callable[[Path], T],
    quiet: bool = False,
) -> T:
    """`embed_shard(shard file)` for this rank, then, once every rank is done, rank 0 joins the
    shards into `output` (deleting them; progress as log lines unless `quiet`) or writes a
    virtual-dataset file over them."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        result = embed_shard(shard_path(output, rank, world))
        try:
            tdist.barrier()
        except RuntimeError as exc:
            raise _peer_lost(exc) from None
        if rank == 0:
            shards = [shard_path(output, r, world) for r in range(world)]
            if merge:
                log = None if quiet else ProgressLog("merging", f"rank 0/{world}: ")
                merge_shards(output, shards, overwrite, log.advance if log is not None else None)
                for path in shards:
                    path.unlink()
            else:
                write_virtual(output, shards, overwrite=overwrite)
        try:
            tdist.barrier()
        except RuntimeError:  # rank 0 stopped while joining the shards: its message says why
            if rank == 0:
                raise
            raise StoreError(
                f"{output}: rank 0 could not join the shards (see its message, if it printed one); "
                f"{RERUN} to resume"
            ) from None
    finally:
        tdist.destroy_process_group()
    return result
