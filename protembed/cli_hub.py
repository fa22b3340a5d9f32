"""`protembed download` and `protembed models`: fetch checkpoints; show the registry and what is cached."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from protembed.cli_common import (
    QuietOption,
    err_console,
    handle_errors,
    out_console,
    path_value,
    print_json,
    revision_value,
)
from protembed.errors import OptionError
from protembed.registry import MODELS

CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Hub cache directory (default: $HF_HUB_CACHE or $HF_HOME/hub).",
        metavar="DIR",
        file_okay=False,  # for the completions (folders)
        parser=path_value,
    ),
]


def _params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"


@handle_errors
def download(
    model: Annotated[
        str,
        typer.Argument(help="Registry name (esm2-650m), Hub repo id or local directory.", metavar="MODEL"),
    ],
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision",
            help="Branch, tag or commit hash (default: main).",
            metavar="REV",
            parser=revision_value,
        ),
    ] = None,
    cache_dir: CacheDir = None,
    force: Annotated[
        bool, typer.Option("--force", help="Download all files again, even if cached.", metavar="")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Download a model into the Hugging Face cache and check that it loads; prints the snapshot path."""
    from protembed.hub import download_model  # imported here: --help must not wait for torch
    from protembed.models.checkpoints import read_config

    resolved, size = download_model(
        model, revision=revision, cache_dir=cache_dir, force=force, progress=not quiet
    )
    if not quiet:  # download_model has verified the checkpoint; the config only feeds the message
        config = read_config(resolved.path)
        label = resolved.name or resolved.source
        err_console.print(
            f"{label}: revision {resolved.revision}, {decimal(size)}, verified "
            f"({config.family}, {config.n_layers} layers, d_model {config.d_model})",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    typer.echo(str(resolved.path))


@handle_errors
def models(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON on stdout instead of a table.", metavar="")
    ] = False,
    cache_dir: CacheDir = None,
) -> None:
    """List the registry models: shape, size, and whether each is cached (revision, disk size).

    Cached: the revision `main` pointed to when it was downloaded.

    "partial": a download stopped before it finished; `protembed download NAME` finishes it.

    "other revision": only other commits are cached (downloaded with --revision); pass one with --revision.
    """
    from protembed.hub_cache import cache_root, cached_models

    root = cache_root(cache_dir)
    if root.exists() and not root.is_dir():  # a missing one is an empty cache; a file is a mistake
        raise OptionError(f"Hub cache {root}: not a folder")
    cached = {c.name: c for c in cached_models(cache_dir)}
    if as_json:
        print_json(
            [
                {
                    "name": m.name,
                    "repo_id": m.repo_id,
                    "family": m.family,
                    "n_layers": m.n_layers,
                    "d_model": m.d_model,
                    "n_heads": m.n_heads,
                    "n_params": m.n_params,
                    "max_residues": m.max_residues,
                    "cached": cached[m.name].path is not None,
                    "partial": cached[m.name].partial,
                    "revision": cached[m.name].revision,
                    "other_revisions": list(cached[m.name].other_revisions),
                    "path": str(cached[m.name].path) if cached[m.name].path else None,
                    "size_bytes": cached[m.name].size,
                }
                for m in MODELS.values()
            ]
        )
        return
    table = Table(caption=f"cache: {cache_root(cache_dir)}", caption_justify="left")
    for col in ("name", "repo id", "family"):
        table.add_column(col, no_wrap=True)
    for col in ("layers", "hidden", "heads", "params", "max residues"):
        table.add_column(col, justify="right")
    for col in ("cached", "revision", "size"):
        table.add_column(col, no_wrap=True)
    for m in MODELS.values():
        c = cached[m.name]
        table.add_row(
            m.name,
            m.repo_id,
            m.family,
            str(m.n_layers),
            str(m.d_model),
            str(m.n_heads),
            _params(m.n_params),
            str(m.max_residues),
            "yes" if c.path else "partial" if c.partial else "other revision" if c.other_revisions else "no",
            (c.revision or "")[:10] or (c.other_revisions or ("",))[0],  # whole: what --revision takes
            decimal(c.size) if c.path else "",
        )
    # A terminal gets its own width; a pipe gets the whole table rather than 80 columns.
    (out_console if out_console.is_terminal else Console(width=160)).print(table)
