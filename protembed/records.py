"""Whole FASTA records in memory, for FLIP files and `predict` input.

`embed` reads its input with `fasta.scan_fasta`, an indexed, vectorised pass that checks residues
against a model's alphabet. The files read here are small by comparison (FLIP splits, label and
mask files, sequences to predict), and what a body may hold depends on the file: residues, class
labels or a 0/1 mask. So this reader only splits records and leaves that check to the caller, with
`Record.error` pointing its message at the file line of the offending character.

Input is plain or gzip FASTA (recognised by its bytes), or `-` for stdin. Bodies may span lines;
spaces inside a line and whitespace at its end are dropped, as `embed` (Biopython) drops them.
Text is decoded as UTF-8 with errors="surrogateescape", and a byte that is not UTF-8 is reported
with its record and position.
"""

from __future__ import annotations

import bisect
import io
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from gzip import BadGzipFile
from pathlib import Path

from protembed.errors import FastaError
from protembed.fasta_io import decompressed, storable, undecoded_byte


@dataclass(frozen=True)
class Record:
    """One record: where it is, its header (without '>') and its body (whitespace removed)."""

    path: str
    line: int  # of the header
    header: str
    body: str
    starts: tuple[int, ...]  # body offset at which each body line starts
    lines: tuple[int, ...]  # file line number of each body line

    @property
    def id(self) -> str:
        """The first word of the header ('' when the header is empty)."""
        words = self.header.split(None, 1)
        return words[0] if words else ""

    def line_at(self, pos: int) -> int:
        """The file line holding body position `pos` (0-based)."""
        return self.lines[bisect.bisect_right(self.starts, pos) - 1]

    def error(self, reason: str, pos: int | None = None) -> FastaError:
        """A FastaError for this record, at its header line or at the line of body position `pos`."""
        line = self.line if pos is None or not self.lines else self.line_at(pos)
        return FastaError(self.path, line, self.id, reason)

    def check_residues(self) -> None:
        """Letters only (ambiguity codes allowed; the encoders map them to <unk>)."""
        seq = self.body
        if not (seq.isalpha() and seq.isascii()):
            pos = next(i for i, c in enumerate(seq) if not (c.isascii() and c.isalpha()))
            raise self.error(f"invalid residue {seq[pos]!r} at position {pos + 1}", pos)


def read_records(path: str | Path) -> Iterator[Record]:
    """Every record of a FASTA file, in order; a one-line FastaError for a defect or unreadable file.

    Empty records, headers without an id or with a NUL byte, and bytes that are not UTF-8 are
    errors; so is a file with no records or with text before the first header.
    """
    stdin = str(path) == "-"
    source = "<stdin>" if stdin else str(path)  # as `embed` names it
    try:
        raw = _stdin() if stdin else open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise FastaError(source, None, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        binary = decompressed(raw, source)
        yield from _records(source, io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape"))
    except (EOFError, zlib.error, BadGzipFile) as exc:
        raise FastaError(source, None, None, f"corrupt gzip input: {exc}") from None
    except OSError as exc:
        raise FastaError(source, None, None, f"cannot read: {exc.strerror or exc}") from None
    finally:
        if not stdin:
            raw.close()


_TOKEN = re.compile(r"<[A-Za-z]+>")  # a special token such as <mask> in a sequence


def _stdin() -> io.BufferedReader:
    """Standard input as a buffered binary stream that can peek (to recognise gzip)."""
    stdin = sys.stdin.buffer
    return stdin if isinstance(stdin, io.BufferedReader) else io.BufferedReader(stdin)  # type: ignore[arg-type]


def _records(source: str, text: io.TextIOWrapper) -> Iterator[Record]:
    header: str | None = None
    parts: list[str] = []
    starts: list[int] = []  # body offset and file line of each body line
    lines: list[int] = []
    start = size = 0
    for n, raw in enumerate(text, 1):
        if raw.startswith(">"):
            if header is not None:
                yield _record(source, start, header, parts, starts, lines)
            header, start, parts, starts, lines, size = raw[1:].strip(), n, [], [], [], 0
            continue
        chunk = raw.rstrip().replace(" ", "")
        if not chunk:
            continue
        if header is None:
            raise FastaError(source, n, None, "text before the first '>' header")
        if ">" in chunk:  # ' >id' or a BOM before it: a header that does not start its line
            shown = storable(header.split(None, 1)[0]) if header.split() else None
            reason = f"'>' at column {raw.index('>') + 1}: a header must start at the beginning of its line"
            if token := _TOKEN.search(raw):  # `embed` takes <mask>; these files hold residue letters only
                where = f"{token.group()!r} at column {token.start() + 1}"
                reason = f"{where}: only residue letters are read here"
            raise FastaError(source, n, shown, reason)
        parts.append(chunk)
        starts.append(size)
        lines.append(n)
        size += len(chunk)
    if header is None:
        raise FastaError(source, None, None, "no FASTA records")
    yield _record(source, start, header, parts, starts, lines)


def _record(
    source: str, line: int, header: str, parts: list[str], starts: list[int], lines: list[int]
) -> Record:
    rec = Record(source, line, header, "".join(parts), tuple(starts), tuple(lines))
    if found := undecoded_byte(header):
        reason = f"byte 0x{found[1]:02x} in the header is not UTF-8 text"
        raise FastaError(source, line, storable(rec.id), reason)  # the id as it can be printed
    if not rec.id:
        raise rec.error("header without an id")
    if "\x00" in header:
        raise rec.error("NUL byte in the header")
    if not rec.body:
        raise rec.error("empty record")
    if found := undecoded_byte(rec.body):
        raise rec.error(f"byte 0x{found[1]:02x} at position {found[0] + 1} is not UTF-8 text", found[0])
    return rec
