"""FASTA input: one validating pass that indexes the file, then a second pass that yields sequences.

Input is plain or gzip-compressed FASTA (gzip is recognised by its magic bytes, whatever the
suffix) or ``-`` for stdin, opened by `fasta_io`; `FastaIndex.cleanup` deletes the temporary
copy of stdin or a pipe. Parsing uses Biopython's `SimpleFastaParser`; sequences are checked in
batches with one table lookup through the model's `Alphabet`, so memory holds only ids,
descriptions and a few numbers per record.

`FastaIndex.sha256` is the SHA-256 of the *decompressed* input bytes, so a file, its gzip copy
and the same bytes piped through stdin share one hash. `FastaIndex.seq_hash` is the first 8 bytes
of BLAKE2b over a record's token ids: records that embed identically share it. Two distinct
sequences collide with probability about N^2 / 2^65 (1e-8 for a million records, 3e-4 for a
hundred million), so `duplicate_groups` trusts equal hashes without comparing sequences.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import NoReturn

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protembed.alphabet import Alphabet
from protembed.errors import FastaError, InvalidSequenceError
from protembed.fasta_io import FileStamp, locate_lines, reading, resolve_input, storable, undecoded_byte
from protembed.headers import Headers

_BATCH_CHARS = 1 << 22  # residues checked per vectorised batch
_BATCH_RECORDS = 1 << 15
_INVALID, _DROP = 255, 254  # byte-table codes; token ids are < 254


@dataclass
class FastaIndex:
    """What the first pass learned; rows are records in file order (duplicate ids allowed).

    A part (`index_part`) holds the file's records first_row .. first_row + len - 1 as rows 0..;
    a torchrun rank keeps only its own part, with no array as long as the whole file.
    """

    source: str  # what the user passed, for messages ("proteins.fa", "<stdin>")
    path: Path  # the file the second pass re-reads (a temporary spool for stdin or a pipe)
    ids: Sequence[str]  # first word of each header
    descriptions: Sequence[str]  # full header line without '>'
    n_residues: np.ndarray  # int64 [N] residue tokens per record; 0 for skipped rows
    skipped: np.ndarray  # bool [N]
    skip_reasons: dict[int, str]  # row -> one-line reason
    seq_hash: np.ndarray  # uint64 [N] BLAKE2b-64 of the token ids; 0 for skipped rows
    sha256: str  # SHA-256 of the decompressed input bytes
    stamp: FileStamp  # the file as scanned: later passes refuse it modified or replaced
    temporary: bool = False  # path is a spool that `cleanup` deletes
    first_row: int = 0  # the file's record number of row 0 (non-zero for a part)
    file_rows: int | None = None  # a part's: records in the whole file

    def __len__(self) -> int:
        return int(self.n_residues.size)

    def cleanup(self) -> None:
        """Delete the stdin spool, if any (safe to call more than once)."""
        if self.temporary:
            self.path.unlink(missing_ok=True)


def scan_fasta(
    path: str | Path, alphabet: Alphabet, on_invalid: str = "error", headers: bool = True
) -> FastaIndex:
    """Validate and index a FASTA file in one pass, before any model is loaded.

    Args:
        path: a FASTA file (plain or gzip) or "-" for stdin.
        alphabet: decides which characters are valid and how residues are counted.
        on_invalid: "error" raises on the first invalid or empty record; "skip" keeps its row,
            marked skipped, with a reason.
        headers: keep every header; without them (`ids` and `descriptions` empty) the index
            serves only to choose a part, which `index_part` reads the headers of.

    Raises:
        FastaError: unreadable input, not FASTA, no records, a header without an id, or (with
            on_invalid="error") an invalid character or an empty record.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', not {on_invalid!r}")
    source, file, temporary = resolve_input(path)
    try:
        index = _scan(source, file, alphabet, on_invalid, headers)
    except BaseException:
        if temporary:
            file.unlink(missing_ok=True)
        raise
    index.temporary = temporary
    return index


def _scan(source: str, file: Path, alphabet: Alphabet, on_invalid: str, keep_headers: bool) -> FastaIndex:
    table = _byte_table(alphabet)
    header_blob = bytearray()  # headers, encoded a batch at a time
    header_sizes: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    bad: dict[int, tuple[int, str]] = {}  # row -> (position, reason); position 0 = header line
    seqs: list[str] = []
    batch_titles: list[str] = []
    failed: list[str] = []  # on_invalid="error": the id of the first bad record
    n_rows = n_chars = 0

    def check() -> None:
        first = n_rows - len(seqs)
        n_res, digest, problems = _check_batch(seqs, table, alphabet)
        counts.append(n_res)
        hashes.append(digest)
        for j, pos, reason in problems:
            bad[first + j] = (pos, reason)
            if on_invalid == "error":
                break
        if bad and on_invalid == "error":  # this batch is the last one read: the bad row is in it
            failed.append((batch_titles[min(bad) - first].split(None, 1) or [""])[0])
        if keep_headers:
            header_sizes.append(Headers.append(header_blob, batch_titles))
        seqs.clear()
        batch_titles.clear()

    with reading(file, source) as (handle, digest, stamp):
        for title, seq in SimpleFastaParser(handle):
            if "\x00" in title:  # HDF5 strings cannot hold it
                bad[n_rows] = (0, "NUL byte in the header")
            if not title.isascii() and (found := undecoded_byte(title)):
                bad[n_rows] = (0, f"byte 0x{found[1]:02x} in the header is not UTF-8 text")
            title = storable(title)
            if not title.split(None, 1):  # '>' with nothing after it
                if on_invalid == "skip":  # a row with an empty id, recorded as skipped
                    bad[n_rows] = (0, "header without an id")
                else:
                    if seqs:
                        check()  # an earlier bad record in this batch comes first
                    if not bad:
                        _fail(file, source, n_rows, 0, None, "header without an id")
                    break
            batch_titles.append(title)
            seqs.append(seq)
            n_rows += 1
            n_chars += len(seq)
            if n_chars >= _BATCH_CHARS or len(seqs) >= _BATCH_RECORDS:
                check()
                n_chars = 0
                if bad and on_invalid == "error":
                    break
        if seqs:
            check()
        sha = digest.hexdigest()
    if bad and on_invalid == "error":
        row, (pos, reason) = min(bad.items())
        _fail(file, source, row, pos, failed[0], reason)
    descriptions = Headers.build(header_blob, header_sizes)
    if not n_rows:
        raise FastaError(source, None, None, "empty file: no FASTA records")

    n_residues = np.concatenate(counts)
    seq_hash = np.concatenate(hashes)
    skipped = np.zeros(n_rows, dtype=bool)
    reasons: dict[int, str] = {}
    if bad:
        lines = locate_lines(file, {row: pos for row, (pos, _) in bad.items()})
        for row, (_, reason) in sorted(bad.items()):
            reasons[row] = f"{source}:{lines[row]}: {reason}"
        rows = np.fromiter(bad, dtype=np.int64, count=len(bad))
        skipped[rows], n_residues[rows], seq_hash[rows] = True, 0, 0
    ids = descriptions.ids()
    return FastaIndex(source, file, ids, descriptions, n_residues, skipped, reasons, seq_hash, sha, stamp)


def index_part(index: FastaIndex, start: int, stop: int) -> FastaIndex:
    """Rows start..stop-1 of a whole-file index as an index of their own (rows from 0), with their
    headers read from the file again: one torchrun rank's share, so that a rank holds neither the
    other rows' headers nor any array as long as the file.

    Raises:
        FastaError: the file cannot be read or ends before row `stop`.
    """
    assert index.file_rows is None and 0 <= start <= stop <= len(index), (start, stop, len(index))
    blob, sizes, titles = bytearray(), [], []
    if stop > start:
        with reading(index.path, index.source, index.stamp) as (handle, _, _):
            for title, _seq in islice(SimpleFastaParser(handle), start, stop):
                titles.append(storable(title))
                if len(titles) >= _BATCH_RECORDS:
                    sizes.append(Headers.append(blob, titles))
                    titles.clear()
        sizes.append(Headers.append(blob, titles))
    descriptions = Headers.build(blob, sizes)
    if len(descriptions) != stop - start:
        raise FastaError(index.source, None, None, "input changed since it was scanned (fewer records)")
    rows = slice(start, stop)
    reasons = {r - start: why for r, why in index.skip_reasons.items() if start <= r < stop}
    return FastaIndex(
        index.source, index.path, descriptions.ids(), descriptions, index.n_residues[rows].copy(),
        index.skipped[rows].copy(), reasons, index.seq_hash[rows].copy(), index.sha256, index.stamp,
        index.temporary, first_row=start, file_rows=len(index),
    )  # fmt: skip


def iter_records(index: FastaIndex) -> Iterator[tuple[int, str]]:
    """Second pass: (row, sequence) in file order, skipped rows left out (a part's rows only).

    Raises:
        FastaError: the file cannot be read or no longer matches the index.
    """
    first, stop = index.first_row, index.first_row + len(index)
    row = first - 1
    expected = iter(index.ids)  # decoded in bulk: one lookup per record would cost as much as the parse
    # read to the file's end (to see a record added since the scan) unless a part ends earlier
    end = stop if index.file_rows is not None and stop < index.file_rows else None
    with reading(index.path, index.source, index.stamp) as (handle, _, _):
        records = islice(SimpleFastaParser(handle), first, end)
        for row, (title, seq) in enumerate(records, start=first):
            title = storable(title)  # as the scan stored it
            if (title.split(None, 1) or [""])[0] != next(expected, None):
                raise FastaError(
                    index.source, None, None, f"input changed since it was scanned (record {row + 1})"
                )
            if not index.skipped[row - first]:
                yield row - first, seq
    if row + 1 != stop:
        raise FastaError(index.source, None, None, "input changed since it was scanned (fewer records)")


def duplicate_groups(seq_hash: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """For every row, the first row with the same sequence (itself if first); -1 for skipped rows.

    Rows `r` with `first_row_of[r] == r` are the distinct sequences to compute; the others copy
    row `first_row_of[r]`.
    """
    first_row_of = np.full(seq_hash.shape[0], -1, dtype=np.int64)
    rows = np.flatnonzero(~skipped)
    if rows.size == 0:
        return first_row_of
    order = rows[np.argsort(seq_hash[rows], kind="stable")]  # stable: rows ascending within a group
    h = seq_hash[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    sizes = np.diff(np.r_[starts, order.size])
    first_row_of[order] = np.repeat(order[starts], sizes)
    return first_row_of


# --- validation ----------------------------------------------------------------------------------


def _byte_table(alphabet: Alphabet) -> np.ndarray:
    """Byte -> token id (uint8) of a residue anywhere in a sequence; 255 where not valid there."""
    table = np.full(256, _INVALID, dtype=np.uint8)
    for b in range(256):
        try:
            ids = alphabet.residue_ids(chr(b))
        except InvalidSequenceError:
            continue
        if ids.size == 1:  # '*' is valid only as the last character; handled per record
            table[b] = ids[0]
    return table


def _check_batch(
    seqs: list[str], table: np.ndarray, alphabet: Alphabet
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, str]]]:
    """Residue counts, token hashes and (record, position, reason) of the bad ones, for a batch."""
    n = len(seqs)
    joined = "".join(seqs)
    # latin-1 keeps one byte per character; anything beyond it becomes '?', which is invalid.
    data = joined.encode("latin-1", errors="replace")
    raw = np.frombuffer(data, dtype=np.uint8)
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=n)
    ends = np.cumsum(lens)
    starts = ends - lens
    tok = table[raw]  # [chars] uint8 token ids
    nonempty = np.flatnonzero(lens)
    stars = nonempty[raw[ends[nonempty] - 1] == ord("*")]
    tok[ends[stars] - 1] = _DROP
    n_res = lens.copy()
    n_res[stars] -= 1
    special: dict[int, np.ndarray | tuple[int, str]] = {}
    if b"<" in data:  # `<mask>` is one token: leave those records to the alphabet itself
        for j in np.unique(np.searchsorted(ends, np.flatnonzero(raw == ord("<")), side="right")).tolist():
            tok[starts[j] : ends[j]] = _DROP
            try:
                ids = alphabet.residue_ids(seqs[j])
                special[j], n_res[j] = ids, ids.size
            except InvalidSequenceError as exc:
                special[j] = (exc.position, exc.char)
    problems: dict[int, tuple[int, str]] = {}
    bad_at = np.flatnonzero(tok == _INVALID)
    if bad_at.size:
        bad_rows, first = np.unique(np.searchsorted(ends, bad_at, side="right"), return_index=True)
        for j, at in zip(bad_rows.tolist(), bad_at[first].tolist()):
            problems[j] = (at - int(starts[j]) + 1, joined[at])
    problems.update({j: v for j, v in special.items() if isinstance(v, tuple)})
    reasons = {j: (pos, _reason(pos, char)) for j, (pos, char) in problems.items()}
    for j in np.flatnonzero(n_res == 0).tolist():
        reasons.setdefault(j, (0, "empty sequence"))

    # A valid ordinary record's tokens are exactly tok[start : start + n_res].
    buf = tok.tobytes()
    digests = [_blake(buf[a:b]) for a, b in zip(starts.tolist(), (starts + n_res).tolist(), strict=True)]
    for j, found in special.items():
        if isinstance(found, np.ndarray):
            digests[j] = _blake(found.astype(np.uint8).tobytes())
    seq_hash = np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)
    return n_res, seq_hash, [(j, *reasons[j]) for j in sorted(reasons)]


def _reason(pos: int, char: str) -> str:
    if found := undecoded_byte(char):
        return f"byte 0x{found[1]:02x} at position {pos} is not UTF-8 text"
    return f"invalid residue {char!r} at position {pos}"


def _blake(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def token_hash(residue_ids: np.ndarray) -> int:
    """A record's `FastaIndex.seq_hash` from its residue token ids (`Alphabet.residue_ids`)."""
    return int.from_bytes(_blake(residue_ids.astype(np.uint8).tobytes()), "little")


def _fail(file: Path, source: str, row: int, pos: int, record: str | None, reason: str) -> NoReturn:
    line = locate_lines(file, {row: pos})[row]
    raise FastaError(source, line, record, reason)
