"""What every `protembed` command module shares: consoles, shared options, the error-to-exit-code
mapping, device resolution and JSON output. The Typer app and its commands are in `cli.py`."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from protembed import signals
from protembed.cache import user_path
from protembed.errors import RERUN, ProtembedError
from protembed.progress_log import ProgressLog
from protembed.signals import Terminated

if TYPE_CHECKING:
    import torch


class _StdoutConsole(Console):
    """Results on stdout; a reader that closed the pipe ends the command as `print_json`'s does."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _discard_stdout()
        raise SystemExit(EXIT_BROKEN_PIPE)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Console.print; a full disk behind stdout is the ProtembedError `write_stdout` raises."""
        _to_stdout(lambda: super(_StdoutConsole, self).print(*objects, **kwargs))


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process the signal ended
# emoji=False: ":fire:" in a file name or FASTA id must print as typed
err_console = Console(stderr=True, emoji=False)
out_console = _StdoutConsole(emoji=False)

F = TypeVar("F", bound=Callable[..., Any])


# options shared by several commands
class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    te = "te"


BackendOption = Annotated[
    Backend, typer.Option(help="auto, torch or te (NVIDIA Transformer Engine; auto picks te when usable).")
]
QuietOption = Annotated[  # commands whose only output besides progress is a closing line
    bool, typer.Option("--quiet", "-q", help="No progress and no closing line on stderr.", metavar="")
]
CompileOption = Annotated[
    bool, typer.Option("--compile", help="torch.compile the model (torch backend).", metavar="")
]


def path_value(text: str) -> Path:
    """A path given on the command line, `~` expanded; an empty one (an unset shell variable, most
    likely) is refused instead of meaning the current folder."""
    if not text.strip():
        raise typer.BadParameter("the path is empty")
    path = user_path(text)
    if path is None:
        raise typer.BadParameter(f"{text.split('/', 1)[0]}: no such user")
    return path


def revision_value(text: str) -> str:
    """A Hub revision; an empty one (an unset shell variable, most likely) is refused instead of
    meaning `main`."""
    if not text.strip():
        raise typer.BadParameter("the revision is empty")
    return text


def input_value(text: str) -> str:
    """An input path as typed (`-` is stdin, `./-` a file of that name), `~` expanded; an empty
    one is refused."""
    path = path_value(text)
    return str(path) if text.startswith("~") else text


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # writes to stdout, or files not named in the error
DEBUG = {"on": False}  # set by `protembed --debug`: known errors raise with their traceback


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # shown as \xNN: never sent to the terminal raw


def handle_errors(fn: F) -> F:
    """Turn known errors into `error: <one line>` on stderr with exit code 1 (130 on Ctrl-C, 143 on
    SIGTERM)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            signals.clear()  # a request dropped where no check followed: the command finished anyway
            return result
        except ProtembedError as exc:
            if DEBUG["on"]:
                raise
            # texts quoted from HDF5 or the OS may hold line breaks; spaces inside a line are kept
            one_line = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
            one_line = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", one_line)  # ids with NUL, ESC
            one_line = rank_prefix() + _without_overwrite(fn.__name__, kwargs, one_line)
            err_console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except BrokenPipeError:  # `protembed ... | head`: the reader has all it wanted
            _discard_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except OSError as exc:
            if exc.errno not in _DISK_FULL or DEBUG["on"]:
                raise
            reason = escape(exc.strerror or str(exc))  # a write whose file is not named: --debug finds it
            err_console.print(f"[bold red]error:[/] cannot write: {reason} (--debug shows where)",
                              highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            signals.clear()
            hint = _without_overwrite(
                fn.__name__, kwargs, _INTERRUPT_HINTS.get(fn.__name__, lambda _: "")(kwargs)
            )
            text = f"; {hint}" if hint else ""
            word, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            line = f"{escape(rank_prefix())}[yellow]{word}[/]{escape(text)}"
            err_console.print(line, highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail on the closed pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def rank_prefix() -> str:
    """`rank R/W: ` in a torchrun job, whose ranks' messages share one stream; else '' (a broken
    launcher environment too: its own message says what is wrong)."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return ""
    from protembed.torchrun import distributed_env

    try:
        dist = distributed_env()
    except ProtembedError:
        return ""
    return f"rank {dist[0]}/{dist[1]}: " if dist else ""


def _without_overwrite(command: str, options: dict[str, Any], text: str) -> str:
    """Advice to run the same command again is wrong where that command ran with --overwrite (embed,
    merge) and had begun its new output: it would start over. Say to drop the option instead. Before
    that (a download, the model load) the old output is untouched, and the same command is right."""
    if command in ("embed", "merge") and options.get("overwrite") and RERUN in text:
        if _output_begun(command, options):
            return text.replace(RERUN, "run the command again without --overwrite")
    return text


def _output_begun(command: str, options: dict[str, Any]) -> bool:
    """Whether the output of an embed or merge command is an unfinished embeddings file now."""
    from protembed.store_file import unfinished_output

    output = options.get("output")
    if output is None and command == "embed":
        from protembed.cli_embed import default_output

        output = default_output(str(options.get("input_path")))
    return output is not None and unfinished_output(Path(output))


def _embed_hint(options: dict[str, Any]) -> str:
    if rank_prefix() or _output_begun("embed", options):  # a torchrun job keeps its shards
        return f"everything written so far is kept; {RERUN} to resume"
    return f"no embeddings were written yet; {RERUN} to start"


def _cache_hint(options: dict[str, Any]) -> str:
    if options.get("no_cache") or getattr(options.get("features"), "value", None) == "onehot":
        return ""  # nothing kept
    return f"features computed so far are cached; {RERUN} to reuse them (training starts over)"


# What Ctrl-C leaves behind, by command function; commands not listed keep nothing to resume.
_INTERRUPT_HINTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "embed": _embed_hint,
    "finetune": _cache_hint,
    "predict": _cache_hint,
    "download": lambda _: f"{RERUN} to go on with the download",
    "merge": lambda _: f"rows joined so far are kept; {RERUN} to go on",
}


def counted(n: int, noun: str) -> str:
    """`1 sequence`, `2 sequences`, `1,024 sequences`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def resolve_device(device: str | None) -> torch.device:
    """The requested torch device, checked to exist; default: first GPU, else CPU."""
    from protembed.api import check_device

    return check_device(device, "--device")


def print_json(data: Any) -> None:
    """Machine-readable output on stdout: strict JSON, so a number that is not finite is null."""
    write_stdout(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities (in dicts, lists and tuples) replaced by None; NumPy and torch
    numbers and arrays become plain numbers and lists."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _finite(tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


_PIECE = 1 << 16  # characters


def write_in_pieces(stream: TextIO, text: str) -> None:
    """`text` to `stream`, flushed after every 64 Ki characters. One large write into a pipe whose
    reader goes away midway comes back short without an error (exit status 0, output cut); the
    next piece raises BrokenPipeError, which `handle_errors` turns into exit status 141."""
    for start in range(0, len(text), _PIECE):
        stream.write(text[start : start + _PIECE])
        stream.flush()


def write_stdout(text: str) -> None:
    """`text` on stdout (`write_in_pieces`); a full disk behind it is a ProtembedError."""
    _to_stdout(lambda: write_in_pieces(sys.stdout, text))


def _to_stdout(write: Callable[[], object]) -> None:
    """Run `write`; an OSError other than a closed pipe (see `handle_errors`) is a ProtembedError."""
    try:
        write()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise ProtembedError(f"cannot write to standard output: {exc.strerror or exc}") from None


@contextmanager
def row_progress(verb: str, unit: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback: a bar on a terminal, plain lines a minute apart in a
    log file (stderr not a terminal), nothing when `quiet`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    log = ProgressLog(verb, unit=unit) if not quiet and not err_console.is_terminal else None
    columns = (TextColumn(verb), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, disable=quiet or log is not None, transient=True) as bar:
        task = bar.add_task(verb, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            if log is not None:
                log.advance(done, total)

        yield progress
