"""Typed errors. `str(error)` is always one line that names the offender."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TypeGuard


def is_whole(value: object) -> TypeGuard[int]:
    """Whether a user-given value is a whole number (a Python or numpy integer, not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (HDF5, gloo and safetensors quote several), else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Advice that ends messages about work that a rerun resumes; the CLI rewrites it where the command
# ran with --overwrite (which would start over instead).
RERUN = "run the same command again"


class ProtembedError(Exception):
    """Base of every error caused by user input or environment, mapped to exit code 1."""


class FastaError(ProtembedError):
    """A malformed or invalid FASTA file or record."""

    def __init__(self, path: str, line: int | None, record: str | None, reason: str) -> None:
        self.path, self.line, self.record, self.reason = path, line, record, reason
        where = path if line is None else f"{path}:{line}"
        rec = f" record '{record}':" if record is not None else ""
        super().__init__(f"{where}:{rec} {reason}")


class InvalidSequenceError(ProtembedError):
    """A sequence with a character the model cannot take; position is 1-based."""

    def __init__(self, char: str, position: int, record: str | None = None) -> None:
        self.char, self.position, self.record = char, position, record
        rec = f"record '{record}': " if record is not None else ""
        super().__init__(f"{rec}invalid residue {char!r} at position {position}")


class UnknownModelError(ProtembedError):
    """A model name that is neither a registry name, a Hub repo id nor a local directory."""

    def __init__(self, name: str, known: Sequence[str], hint: str = "") -> None:
        self.name, self.known = name, list(known)
        msg = f"unknown model '{name}'"
        super().__init__(f"{msg}; {hint}" if hint else msg)


class CheckpointError(ProtembedError):
    """A checkpoint that cannot be loaded: wrong architecture, missing/unexpected/misshapen keys."""

    def __init__(
        self, path: str, reason: str = "", missing: Sequence[str] = (), unexpected: Sequence[str] = ()
    ) -> None:
        self.path, self.missing, self.unexpected = path, list(missing), list(unexpected)
        parts = [reason] if reason else []
        if self.missing:
            parts.append("missing keys: " + _short(self.missing))
        if self.unexpected:
            parts.append("unexpected keys: " + _short(self.unexpected))
        super().__init__(f"{path}: " + "; ".join(parts))


class BackendError(ProtembedError):
    """A requested backend (device, Transformer Engine, ...) that is not available."""


class OutputExistsError(ProtembedError):
    """An output that would be overwritten or that another run is writing."""


class OutputCompleteError(OutputExistsError):
    """The output is already complete (with `complete_ok`: and made with the same settings)."""


class ResumeMismatchError(ProtembedError):
    """An incomplete output whose settings differ from the current command."""


class StoreError(ProtembedError):
    """An output that cannot be written, or an embeddings file that cannot be read as asked."""


class HubError(ProtembedError):
    """A download or cache problem (offline, not found, gated, network)."""


def _short(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def require_matplotlib() -> None:
    """BackendError with an install hint when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BackendError("--plot needs matplotlib: pip install 'protembed[plot]'") from None


class OptionError(ProtembedError, ValueError):
    """Option values that cannot work together or do not fit the model (also a ValueError, as the
    Python API's wrong arguments are)."""
