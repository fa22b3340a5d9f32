"""The `protembed` command: a Typer app. Parsing, progress and error-to-exit-code mapping only.

Each command lives in a `cli_<topic>.py` module and is registered at the bottom of this file.
Those modules import torch, h5py and the Hub client inside the command functions, so that
`--help` and `--version` stay instant (tests/test_docs.py checks it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import Enum
from functools import wraps
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from protembed import __version__
from protembed.errors import ProtembedError

if TYPE_CHECKING:
    import torch

app = typer.Typer(
    name="protembed",
    help="Protein language model embeddings (ESM-2, AMPLIFY): FASTA in, HDF5 out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
# emoji=False: ":fire:" in a file name or FASTA id must print as typed
err_console = Console(stderr=True, emoji=False)
out_console = Console(emoji=False)

F = TypeVar("F", bound=Callable[..., Any])


# options shared by several commands
class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    te = "te"


BackendOption = Annotated[
    Backend, typer.Option(help="auto, torch or te (NVIDIA Transformer Engine; auto picks te when usable).")
]
CompileOption = Annotated[bool, typer.Option("--compile", help="torch.compile the model (torch backend).")]
_DEBUG = {"on": False}


def handle_errors(fn: F) -> F:
    """Turn known errors into `error: <one line>` on stderr with exit code 1 (130 on Ctrl-C)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProtembedError as exc:
            if _DEBUG["on"]:
                raise
            one_line = " ".join(str(exc).split())  # texts quoted from HDF5 or the OS may hold newlines
            err_console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            hint = _INTERRUPT_HINTS.get(fn.__name__, lambda _: "")(kwargs)
            text = f"; {hint}" if hint else ""
            err_console.print(f"[yellow]interrupted[/]{escape(text)}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _embed_hint(options: dict[str, Any]) -> str:
    if options.get("overwrite"):  # the same command would start over
        return "everything written so far is kept; run the command again without --overwrite to resume"
    return "everything written so far is kept; run the same command again to resume"


def _cache_hint(options: dict[str, Any]) -> str:
    if options.get("no_cache") or getattr(options.get("features"), "value", None) == "onehot":
        return ""  # nothing kept
    return "features computed so far are cached; run the same command again to go on from there"


# What Ctrl-C leaves behind, by command function; commands not listed keep nothing to resume.
_INTERRUPT_HINTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "embed": _embed_hint,
    "finetune": _cache_hint,
    "predict": _cache_hint,
    "download": lambda _: "run the same command again to go on with the download",
}


def resolve_device(device: str | None) -> torch.device:
    """The requested torch device, checked to exist; default: first GPU, else CPU."""
    from protembed.api import check_device

    return check_device(device)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"protembed {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for known errors too.")] = False,
) -> None:
    """Protein language model embeddings (ESM-2, AMPLIFY): FASTA in, HDF5 out."""
    _DEBUG["on"] = debug


def main() -> None:
    """Console-script entry point."""
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
app.command("predict", epilog=EXAMPLES["predict"])(cli_finetune.predict)

from protembed import cli_bench  # noqa: E402

app.command("bench", epilog=EXAMPLES["bench"])(cli_bench.bench)

from protembed import cli_store  # noqa: E402

app.command("export", epilog=EXAMPLES["export"])(cli_store.export)
