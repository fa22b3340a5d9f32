"""`protembed embed`: any FASTA to one HDF5 file, with a progress bar and a summary."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.filesize import decimal
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from protembed.cache import same_file
from protembed.cli_common import (
    Backend,
    BackendOption,
    CompileOption,
    QuietOption,
    err_console,
    handle_errors,
    input_value,
    path_value,
    print_json,
    rank_prefix,
    revision_value,
    row_progress,
)
from protembed.errors import OptionError
from protembed.progress_log import ProgressLog
from protembed.registry import DEFAULT_MODEL

if TYPE_CHECKING:  # the embed machinery (torch) is imported when a command runs, not for --help
    from protembed.embed import EmbedSummary

EXAMPLES = """
Examples:

  protembed embed proteins.fasta                         # esm2-650m, mean of the last layer -> proteins.h5
  protembed embed proteins.fa.gz -o out.h5 --model esm2-35m --layer 0,6,12 --pool mean,cls
  protembed embed proteins.fasta -o residues.h5 --per-residue --store-dtype float16 --long window
  zcat big.fa.gz | protembed embed - -o big.h5 --json    # stdin; JSON summary on stdout
"""


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    fp8 = "fp8"


class StoreDType(str, Enum):
    float32 = "float32"
    float16 = "float16"


class LongPolicy(str, Enum):
    truncate = "truncate"
    window = "window"


class OnInvalid(str, Enum):
    error = "error"
    skip = "skip"


class Compression(str, Enum):
    gzip = "gzip"
    lzf = "lzf"


def default_output(input_path: str) -> Path:
    """`proteins.fasta[.gz]` -> `proteins.h5` beside it."""
    if input_path == "-":
        raise OptionError("reading stdin ('-') needs an output: add -o OUTPUT.h5")
    path = Path(input_path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a pipe: `<(zcat x.gz)`
        raise OptionError(f"reading a pipe ({input_path}) needs an output: add -o OUTPUT.h5")
    if path.is_dir():
        raise OptionError(f"{input_path}: is a folder, not a FASTA file")
    name = path.name
    for suffix in (".gz", ".fasta", ".fa", ".faa", ".fas", ".fna", ".seq", ".txt"):
        name = name.removesuffix(suffix)
    return path.with_name((name or path.name) + ".h5")


def parse_layers(text: str) -> list[int | str]:
    """`-1`, `0,6,12`, `all`, `final` -> a list for `resolve_layers`."""
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("all", "final", "normed"):
            out.append(part)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise OptionError(f"--layer: {part!r} is not a layer number, 'all' or 'final'") from None
    return out


@handle_errors
def embed(
    input_path: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="FASTA file (plain or .gz), or - for stdin.",
            parser=input_value,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="HDF5 output (default: INPUT with .h5 beside it).",
            metavar="FILE",
            parser=path_value,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Registry name, Hub repo id or local checkpoint directory.", metavar="MODEL"
        ),
    ] = DEFAULT_MODEL,
    revision: Annotated[
        str | None,
        typer.Option(help="Hub revision (branch, tag or commit).", metavar="REV", parser=revision_value),
    ] = None,
    layer: Annotated[
        str,
        typer.Option(
            "--layer",
            "-l",
            help="Layers: -1 (last), 0,6,12, all, or final (AMPLIFY normed).",
            metavar="LAYERS",
        ),
    ] = "-1",
    pool: Annotated[
        str, typer.Option("--pool", help="Pooling: mean, cls or mean,cls.", metavar="POOLINGS")
    ] = "mean",
    per_residue: Annotated[
        bool, typer.Option("--per-residue", help="Also store every residue's vector.", metavar="")
    ] = False,
    dtype: Annotated[
        DType, typer.Option(help="Compute dtype (fp8: --backend te on an Ada, Hopper or newer GPU).")
    ] = DType.float32,
    store_dtype: Annotated[StoreDType, typer.Option(help="Stored dtype.")] = StoreDType.float32,
    tokens_per_batch: Annotated[
        int | None,
        typer.Option(min=1, help="Tokens per packed batch (default: 4096 on CPU, from free memory on GPU)."),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(min=1, help="Residues per sequence (default and maximum: the model's, 1022 / 2046)."),
    ] = None,
    long: Annotated[
        LongPolicy,
        typer.Option("--long", help="Longer sequences: truncate (flagged) or window (overlapping windows)."),
    ] = LongPolicy.truncate,
    device: Annotated[
        str | None,
        typer.Option(
            help="cpu, cpu:N, cuda, cuda:0,1, 0,1,3 or all (default: every GPU, else the CPU).",
            metavar="DEVICE",
        ),
    ] = None,
    backend: BackendOption = Backend.auto,
    compile: CompileOption = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Require an unfinished output to continue.", metavar="")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.", metavar="")
    ] = False,
    on_invalid: Annotated[
        OnInvalid, typer.Option(help="Invalid or empty records: error (stop) or skip (recorded as skipped).")
    ] = OnInvalid.error,
    compression: Annotated[Compression | None, typer.Option(help="HDF5 compression.")] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge/--no-merge",
            help="Under torchrun: join the rank shards into OUTPUT (default), or write OUTPUT as an HDF5 "
            "virtual dataset over the shards.",
            metavar="",
        ),
    ] = True,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary.", metavar="")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.", metavar="")
    ] = False,
) -> None:
    """Embed a FASTA file into one HDF5 file; the same command resumes an interrupted run."""
    out = output or default_output(input_path)
    if resume and overwrite:
        raise typer.BadParameter("contradicts --overwrite; choose one", param_hint="'--resume'")
    if input_path != "-" and same_file(Path(input_path), out):
        raise OptionError(f"{out}: the output is the input file; choose another -o")
    if resume and not out.exists():
        from protembed.merge import shard_worlds

        if not shard_worlds(out):  # a torchrun job stopped before its merge has shard files only
            raise OptionError(f"--resume: {out} does not exist, nothing to resume")
    from protembed.embed import embed_fasta

    poolings = list(dict.fromkeys(p.strip() for p in pool.split(",") if p.strip()))  # mean,mean = mean
    show = not quiet and sys.stderr.isatty()
    log = ProgressLog("embedding", rank_prefix()) if not quiet and not show else None  # a log file
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, disable=not show, transient=False) as bar:
        task = bar.add_task("embedding", total=None, rate="")
        state = {"t0": 0.0}

        def started(rows: int, residues: int) -> None:
            state["t0"] = time.perf_counter()
            bar.update(task, total=rows)
            if log is not None:
                log.start(rows, residues)

        def progress(rows_done: int, res_done: int, total: int) -> None:
            dt = max(time.perf_counter() - state["t0"], 1e-9)
            bar.update(task, completed=rows_done, rate=f"{res_done / dt:,.0f} res/s")
            if log is not None:
                log.update(rows_done, res_done)

        summary = embed_fasta(
            input_path, out, model=model, revision=revision, layers=parse_layers(layer),
            poolings=poolings, per_residue=per_residue,
            dtype=dtype.value, store_dtype=store_dtype.value, tokens_per_batch=tokens_per_batch,
            max_length=max_length, long_policy=long.value, device=device, overwrite=overwrite,
            on_invalid=on_invalid.value, compression=compression.value if compression else None,
            merge=merge, backend=backend.value, compile=compile, progress=progress, started=started,
            quiet=quiet,
        )  # fmt: skip
    from protembed.torchrun import distributed_env

    if (distributed_env() or (0,))[0] != 0:
        return  # under torchrun, rank 0 reports the whole job
    if as_json:
        print_json(summary.as_dict())
    elif not quiet:
        _print_summary(summary)


def _print_summary(s: EmbedSummary) -> None:
    from protembed.reader import FORMAT

    table = Table(title=f"{FORMAT}: {s.output}", show_header=False, title_justify="left")
    rows = [
        ("records", f"{s.records:,}"),
        ("residues", f"{s.residues:,}"),
        ("computed this run", f"{s.computed:,} distinct sequences"),
        ("resumed", f"{s.resumed:,} rows from an earlier run"),
        ("duplicates", f"{s.duplicates:,} rows copied from identical sequences"),
        ("truncated", f"{s.truncated:,}"),
        ("skipped", f"{s.skipped:,}"),
        ("model / device", f"{s.model} / {s.device} ({s.backend}), layers {','.join(map(str, s.layers))}"),
        ("elapsed", f"{s.elapsed_s:.1f} s ({s.residues_per_s:,.0f} residues/s)"),
        ("output", f"{s.output} ({decimal(s.output_bytes)})"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    err_console.print(table)
    for row, reason in list(s.skip_reasons.items())[:10]:
        err_console.print(f"skipped row {row}: {reason}", highlight=False, markup=False, soft_wrap=True)


@handle_errors
def merge(
    output: Annotated[
        Path,
        typer.Argument(
            help="The output (OUT.h5) whose shards (OUT.shard-*-of-*.h5) to join.",
            metavar="OUTPUT",
            parser=path_value,
        ),
    ],
    virtual: Annotated[
        bool,
        typer.Option(
            "--virtual", help="Write an HDF5 virtual-dataset file over the shards instead.", metavar=""
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUTPUT.", metavar="")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Join the shard files of a torchrun job (e.g. after an interrupted job was finished by hand)."""
    from protembed.merge import find_shards, merge_shards, write_virtual

    shards = find_shards(output)
    if virtual:
        write_virtual(output, shards, overwrite=overwrite)
    else:
        with row_progress("merging", "rows", quiet) as progress:
            merge_shards(output, shards, overwrite, progress)
        for path in shards:
            path.unlink()
    done = f"{'wrote a virtual-dataset file over' if virtual else 'joined'} {len(shards)} shards"
    if not quiet:
        err_console.print(f"{output}: {done}", highlight=False, markup=False, soft_wrap=True)
    typer.echo(str(output))
