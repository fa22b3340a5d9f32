"""The `protembed` command: the Typer app, its root options and the registration of every command.

Each command lives in a `cli_<topic>.py` module (sharing `cli_common.py`) and is registered at the
bottom of this file. Those modules import torch, h5py and the Hub client inside the command
functions, so that `--help` and `--version` stay instant (tests/test_docs.py checks it).
"""

from __future__ import annotations

from typing import Annotated

import typer

from protembed import __version__, signals
from protembed.cli_common import DEBUG

app = typer.Typer(
    name="protembed",
    help="Protein language model embeddings (ESM-2, AMPLIFY): FASTA in, HDF5 out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"protembed {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit.", metavar=""
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for known errors too.", metavar="")
    ] = False,
) -> None:
    """Protein language model embeddings (ESM-2, AMPLIFY): FASTA in, HDF5 out."""
    DEBUG["on"] = debug


def main() -> None:
    """Console-script entry point."""
    signals.install()
    app()


# --- command registration (one line per command module) ---------------------------------------
EXAMPLES = {
    "merge": """
Examples:

  protembed merge out.h5              # joins out.shard-000-of-004.h5 ... into out.h5, removes the shards
  protembed merge out.h5 --virtual    # out.h5 reads through to the shards (keep them beside it)
""",
    "download": """
Examples:

  protembed download esm2-650m
  protembed download facebook/esm2_t33_650M_UR50D --revision main
  HF_HOME=/data/hf protembed download amplify-350m     # another cache
""",
    "models": """
Examples:

  protembed models
  protembed models --json | jq '.[] | select(.cached) | .name'
""",
    "finetune": """
Examples:

  protembed finetune flip-gb1 --features onehot --head ridge
  protembed finetune flip-secondary-structure --model esm2-650m --output runs/ss3
  protembed finetune flip-meltome --model amplify-350m --head mlp --seed 1 --json
""",
    "predict": """
Examples:

  protembed predict runs/ss3 new.fasta -o ss3.csv
""",
    "bench": """
Examples:

  protembed bench --model esm2-650m --random-weights
  protembed bench -m esm2-35m --random-weights --input proteins.fasta --compare hf
  protembed bench -m esm2-150m --random-weights --dtype bfloat16 --lengths 128,512 --json
""",
    "export": """
Examples:

  protembed export out.h5 -o per_protein.h5
  protembed export out.h5 -o residues.h5 --what residues --layer 33
""",
}

from protembed import cli_embed  # noqa: E402

app.command("embed", epilog=cli_embed.EXAMPLES)(cli_embed.embed)
app.command("merge", epilog=EXAMPLES["merge"])(cli_embed.merge)

from protembed import cli_hub  # noqa: E402

app.command("download", epilog=EXAMPLES["download"])(cli_hub.download)
app.command("models", epilog=EXAMPLES["models"])(cli_hub.models)

from protembed import cli_finetune  # noqa: E402

app.command("finetune", epilog=EXAMPLES["finetune"])(cli_finetune.finetune)

from protembed import cli_predict  # noqa: E402

app.command("predict", epilog=EXAMPLES["predict"])(cli_predict.predict)

from protembed import cli_bench  # noqa: E402

app.command("bench", epilog=EXAMPLES["bench"])(cli_bench.bench)

from protembed import cli_store  # noqa: E402

app.command("export", epilog=EXAMPLES["export"])(cli_store.export)
