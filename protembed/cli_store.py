"""`protembed export`: rewrite an embeddings file in another layout."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from protembed.cli_common import QuietOption, err_console, handle_errors, path_value, row_progress


class Layout(str, Enum):
    per_protein = "per-protein"


class What(str, Enum):
    mean = "mean"
    cls = "cls"
    residues = "residues"


@handle_errors
def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="Embeddings file written by `protembed embed`.",
            metavar="SOURCE",
            show_default=False,
            parser=path_value,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="File to write.",
            metavar="FILE",
            show_default=False,
            parser=path_value,
        ),
    ],
    layout: Annotated[
        Layout,
        typer.Option(help="per-protein: one dataset per record, named by its id ('/' -> %2F, '%' -> %25)."),
    ] = Layout.per_protein,
    what: Annotated[
        What, typer.Option(help="Pooled vector per record, or its per-residue matrix.")
    ] = What.mean,
    layer: Annotated[
        int | None,
        typer.Option(help="Model layer to export (-1 = last); needed when the file holds several."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.", metavar="")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Export embeddings to the per-protein layout (bio_embeddings / ProtTrans convention).

    One dataset per record, named by its FASTA id (repeats get #2, #3, ...); skipped records are left out.
    """
    from protembed.export import export_per_protein  # h5py and numpy: not for --help

    with row_progress("exporting", "records", quiet) as progress:
        summary = export_per_protein(
            source, output, what=what.value, layer=layer, overwrite=overwrite, progress=progress
        )
    skipped = f" ({summary.n_skipped:,} skipped records left out)" if summary.n_skipped else ""
    if not quiet:
        err_console.print(f"exported {summary.n_written:,} records{skipped}", highlight=False)
    typer.echo(str(summary.path))
