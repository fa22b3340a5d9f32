"""`protembed predict`: apply a head saved by `finetune --output` to new sequences."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from protembed.cache import (
    cache_root,
    check_file_output,
    default_cache_dir,
    ensure_dir,
    same_file,
    write_whole,
)
from protembed.cli_common import (
    counted,
    err_console,
    handle_errors,
    input_value,
    path_value,
    resolve_device,
    write_in_pieces,
    write_stdout,
)
from protembed.cli_finetune import CacheDir, Device, Quiet, progress_bar
from protembed.errors import StoreError


@handle_errors
def predict(
    head_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder written by `finetune --output`.",
            metavar="HEAD_DIR",
            show_default=False,
            parser=path_value,
        ),
    ],
    fasta: Annotated[
        str,
        typer.Argument(
            help="Sequences to predict (FASTA, .gz, or - for stdin).",
            metavar="FASTA",
            show_default=False,
            parser=input_value,
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="CSV file (- for stdout). Default: stdout.",
            metavar="FILE",
            parser=input_value,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output file.", metavar="")
    ] = False,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Where the head's local checkpoint folder is now, if it moved since `finetune` "
            "(its weights must be the same ones).",
            show_default=False,
            metavar="DIR",
            file_okay=False,  # for the completions (folders); predict checks the folder itself
            parser=path_value,
        ),
    ] = None,
    cache_dir: CacheDir = None,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            help="Do not keep the input's features in the cache (they are computed in a temporary "
            "folder there and deleted at the end; an interrupted run starts over).",
            metavar="",
        ),
    ] = False,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Apply a saved FLIP head to new sequences: CSV of id and prediction."""
    from protembed.saved_head import CONFIG, WEIGHTS, load, predict_fasta

    out = None if output in (None, "-") else Path(output)
    if out is not None:
        check_file_output(out, overwrite)  # a folder, no folder to write in, permission, exists
        reads = {"the input FASTA": Path(fasta), "the head's weights": head_dir / WEIGHTS}
        reads["the head's config"] = head_dir / CONFIG
        for what, path in reads.items():
            if same_file(out, path):  # --overwrite would destroy what this run reads
                raise StoreError(f"{out}: the output is {what} ({path}); choose another -o")
    dev = str(resolve_device(device))
    cache = cache_dir or default_cache_dir()
    saved = load(head_dir)
    moved = None if model is None else str(model)
    onehot = saved[0]["model"] is None
    if onehot:  # one-hot features need no cache
        pass
    elif no_cache:  # the input's features go to a temporary folder in it
        ensure_dir(cache, "cache folder")
    else:  # a read-only, shared cache serves if it holds them
        cache_root(cache)
    with progress_bar(quiet) as bar:
        emb = bar.add_task("embedding", total=None, visible=False)

        def on_embed(done: int, total: int) -> None:
            bar.update(emb, completed=done, total=total, visible=True)

        args = (head_dir, fasta, dev, cache, on_embed, quiet)
        if no_cache and not onehot:
            with tempfile.TemporaryDirectory(prefix="predict-", dir=cache) as scratch:
                rows, truncated = predict_fasta(*args, scratch=Path(scratch), saved=saved, model=moved)
        else:
            rows, truncated = predict_fasta(*args, saved=saved, model=moved)
    if truncated and not quiet:
        err_console.print(f"note: truncated {counted(truncated, 'sequence')} to the features' maximum length")
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "prediction"])
    writer.writerows(rows)
    if out is None:
        write_stdout(text.getvalue())
    else:

        def fill(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as handle:  # `-o /dev/stdout | head`
                write_in_pieces(handle, text.getvalue())

        write_whole(out, fill)
    if out is not None and not quiet:
        err_console.print(f"wrote {len(rows)} predictions to {out}", highlight=False)
