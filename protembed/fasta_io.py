"""Opening FASTA input for reading: stdin and pipes spooled to a file, gzip recognised by its magic
bytes, text decoded with a running SHA-256 of the decompressed bytes, header text made storable.

Stdin and named pipes (``<(zcat x.gz)``) are copied to a temporary file so that they can be read
twice; an ``atexit`` hook deletes it, and a later run deletes spools of runs that were killed.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import io
import itertools
import os
import re
import shutil
import stat
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from protembed.errors import FastaError

# size and modification time (ns): not device and inode, which some network and FUSE file
# systems number afresh when a file is opened again
FileStamp = tuple[int, int]

# Text is decoded with errors="surrogateescape": a byte that is not UTF-8 becomes U+DC80..U+DCFF,
# so such a record is reported (and skippable) like any other bad record.
_ESCAPED = re.compile("[\udc80-\udcff]")
_MAGIC = {
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"PK\x03\x04": "a zip archive",
    b"\x89HDF": "an HDF5 file",
}


def storable(title: str) -> str:
    """A header as HDF5 can store it: NUL and bytes that are not UTF-8 become U+FFFD."""
    title = title.replace("\x00", "\ufffd")
    return title if title.isascii() else _ESCAPED.sub("\ufffd", title)


def undecoded_byte(text: str) -> tuple[int, int] | None:
    """(0-based position, value) of the first byte of `text` that was not UTF-8 (decoded with
    errors="surrogateescape"), or None."""
    escaped = None if text.isascii() else _ESCAPED.search(text)
    return None if escaped is None else (escaped.start(), ord(escaped.group()) - 0xDC00)


class _Hashing(io.RawIOBase):
    """A raw stream that feeds every byte it reads to a SHA-256."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner, self.sha = inner, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self.inner.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self.sha.update(memoryview(buffer)[:n])
        return n


_SPOOL = "protembed-stdin-"  # + pid of the run that spooled it + random part + .fasta


def _remove_stale_spools(folder: Path) -> None:
    """Delete stdin spools left behind by runs that were killed (their pid no longer exists)."""
    for spool in folder.glob(f"{_SPOOL}*.fasta"):
        pid = spool.name.removeprefix(_SPOOL).split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            spool.unlink(missing_ok=True)
        except OSError:  # alive, owned by another user
            pass


def resolve_input(path: str | Path) -> tuple[str, Path, bool]:
    """(name for messages, file to read, whether that file is a spool).

    Input is read twice, so stdin and other streams (a named pipe, `<(zcat x.gz)`) are first
    copied to a temporary file.
    """
    stdin = str(path) == "-"
    if not is_stream(path):
        return str(path), Path(path), False
    _remove_stale_spools(Path(tempfile.gettempdir()))
    fd, name = tempfile.mkstemp(prefix=f"{_SPOOL}{os.getpid()}-", suffix=".fasta")
    atexit.register(Path(name).unlink, missing_ok=True)
    with os.fdopen(fd, "wb") as spool:
        if stdin:
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        else:
            try:
                with open(path, "rb") as stream:
                    shutil.copyfileobj(stream, spool, 1 << 20)
            except OSError as exc:
                raise FastaError(str(path), None, None, f"cannot read input: {exc.strerror or exc}") from None
    return ("<stdin>" if stdin else str(path)), Path(name), True


def is_stream(path: str | Path) -> bool:
    """Whether input `path` can be read only once: "-" (stdin), a named pipe or a character device.
    A path that cannot be looked at is not one (the reader names it)."""
    if str(path) == "-":
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def check_exists(path: str | Path) -> None:
    """FastaError if an input path (not "-") cannot be found; a stat only, as opening a pipe would
    take data from it."""
    if str(path) == "-":
        return
    try:
        os.stat(path)
    except OSError as exc:
        raise FastaError(str(path), None, None, f"cannot read input: {exc.strerror or exc}") from None


def decompressed(raw: io.BufferedReader, source: str) -> BinaryIO:
    """`raw`, or a gzip reader over it when its first bytes say gzip (whatever the file is called).

    Other compressed or binary formats are refused with a FastaError naming the format.
    """
    magic = raw.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    for sig, what in _MAGIC.items():
        if magic.startswith(sig):
            raise FastaError(source, None, None, f"not FASTA: input is {what}; use plain or gzip FASTA")
    return raw


@contextmanager
def reading(
    file: Path, source: str, same_as: FileStamp | None = None
) -> Iterator[tuple[Iterator[str], hashlib._Hash, FileStamp]]:
    """Text lines of a plain or gzip file, starting at the first header, plus a running hash and
    the file's stamp.

    Every failure to read becomes a one-line `FastaError`; so does a stamp other than `same_as`
    (the file was modified or replaced since that stamp was taken).
    """
    try:
        raw = open(file, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise FastaError(source, None, None, f"cannot read input: {exc.strerror or exc}") from None
    binary: BinaryIO = raw
    try:
        info = os.fstat(raw.fileno())
        stamp = (info.st_size, info.st_mtime_ns)
        if same_as is not None and stamp != same_as:
            raise FastaError(source, None, None, "input changed since it was scanned (modified or replaced)")
        binary = decompressed(raw, source)
        hashing = _Hashing(binary)
        text = io.TextIOWrapper(
            io.BufferedReader(hashing, 1 << 20), encoding="utf-8-sig", errors="surrogateescape", newline=None
        )
        yield itertools.chain(_first_header(text, source), text), hashing.sha, stamp
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FastaError(source, None, None, f"corrupt gzip input: {exc}") from None
    except OSError as exc:
        raise FastaError(source, None, None, f"cannot read input: {exc.strerror or exc}") from None
    finally:
        binary.close()
        raw.close()


def _first_header(text: Iterator[str], source: str) -> list[str]:
    """The lines up to the first header; blank lines before it are fine, anything else is not FASTA."""
    head: list[str] = []
    for line in text:
        head.append(line)
        if not line.strip():
            continue
        if line[0] != ">":
            snippet = storable(line.strip()[:30])
            raise FastaError(
                source, len(head), None, f"not FASTA: expected a '>' header line, found {snippet!r}"
            )
        break
    return head


def locate_lines(file: Path, targets: dict[int, int]) -> dict[int, int]:
    """File line of each (row -> residue position) target; position 0 means the header line.

    Counts residues per line exactly as `SimpleFastaParser` joins them (trailing whitespace,
    spaces and carriage returns removed). Only runs on the error path.
    """
    found: dict[int, int] = {}
    row, done, count = -1, len(targets), 0
    with reading(file, str(file)) as (lines, _, _):
        lineno = 0
        for lineno, line in enumerate(lines, 1):  # noqa: B007 - lineno is used after the loop
            if line[0] == ">":
                if len(found) == done:
                    break
                row, count = row + 1, 0
                if targets.get(row) == 0:
                    found[row] = lineno
                continue
            want = targets.get(row, 0)
            if want > count:
                count += len(line.rstrip().replace(" ", "").replace("\r", ""))
                if count >= want:
                    found[row] = lineno
    return {row: found.get(row, lineno) for row in targets}
