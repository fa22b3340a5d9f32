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
from pathlib import Path
from typing import NoReturn, overload

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from protembed.alphabet import Alphabet
from protembed.errors import FastaError, InvalidSequenceError
from protembed.fasta_io import locate_lines, reading, resolve_input, storable, undecoded_byte

_BATCH_CHARS = 1 << 22  # residues checked per vectorised batch
_BATCH_RECORDS = 1 << 15
_INVALID, _DROP = 255, 254  # byte-table codes; token ids are < 254


class Headers(Sequence[str]):
    """Header texts of many records, kept compact: one UTF-8 blob and the offsets into it (the
    text plus 8 bytes per record; a Python string costs about 50 bytes more, and every record had
    two). With `first_word`, each item is the record's id instead of its whole header. A slice is
    a view on the same blob."""

    def __init__(self, blob: bytes | bytearray, offsets: np.ndarray, first_word: bool = False) -> None:
        self.blob, self.offsets, self.first_word = blob, offsets, first_word

    @staticmethod
    def append(blob: bytearray, texts: list[str]) -> np.ndarray:
        """Add a batch of headers to `blob` (grown in place, never copied whole); their byte sizes."""
        encoded = [t.encode() for t in texts]
        blob += b"".join(encoded)
        return np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))

    @classmethod
    def build(cls, blob: bytearray, sizes: list[np.ndarray]) -> Headers:
        """From a blob filled by `append` and the sizes it returned, in order."""
        return cls(blob, np.cumsum(np.concatenate([np.zeros(1, dtype=np.int64), *sizes])))

    def ids(self) -> Headers:
        """The same records' ids (first word of each header)."""
        return Headers(self.blob, self.offsets, first_word=True)

    def __len__(self) -> int:
        return int(self.offsets.size) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Headers: ...
    def __getitem__(self, i: int | slice) -> str | Headers:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("Headers: slices with a step are not supported")
            return Headers(self.blob, self.offsets[start : max(start, stop) + 1], self.first_word)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} records")
        i %= n
        return self._texts(i, i + 1)[0]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), 1 << 16):
            yield from self._texts(start, min(start + (1 << 16), len(self)))

    def _texts(self, start: int, stop: int) -> list[str]:
        """Items start..stop-1, decoded together."""
        ends = self.offsets[start : stop + 1]
        chunk = self.blob[ends[0] : ends[-1]]
        bounds = (ends - ends[0]).tolist()
        if chunk.isascii():  # one character per byte: cut the decoded text at the byte offsets
            text = chunk.decode()
            texts = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        else:
            texts = [chunk[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [(t.split(None, 1) or [""])[0] for t in texts] if self.first_word else texts


@dataclass
class FastaIndex:
    """What the first pass learned; rows are records in file order (duplicate ids allowed)."""

    source: str  # what the user passed, for messages ("proteins.fa", "<stdin>")
    path: Path  # the file the second pass re-reads (a temporary spool for stdin or a pipe)
    ids: Sequence[str]  # first word of each header
    descriptions: Sequence[str]  # full header line without '>'
    n_residues: np.ndarray  # int64 [N] residue tokens per record; 0 for skipped rows
    skipped: np.ndarray  # bool [N]
    skip_reasons: dict[int, str]  # row -> one-line reason
    seq_hash: np.ndarray  # uint64 [N] BLAKE2b-64 of the token ids; 0 for skipped rows
    sha256: str  # SHA-256 of the decompressed input bytes
    temporary: bool = False  # path is a spool that `cleanup` deletes

    def __len__(self) -> int:
        return len(self.ids)

    def cleanup(self) -> None:
        """Delete the stdin spool, if any (safe to call more than once)."""
        if self.temporary:
            self.path.unlink(missing_ok=True)


def scan_fasta(path: str | Path, alphabet: Alphabet, on_invalid: str = "error") -> FastaIndex:
    """Validate and index a FASTA file in one pass, before any model is loaded.

    Args:
        path: a FASTA file (plain or gzip) or "-" for stdin.
        alphabet: decides which characters are valid and how residues are counted.
        on_invalid: "error" raises on the first invalid or empty record; "skip" keeps its row,
            marked skipped, with a reason.

    Raises:
        FastaError: unreadable input, not FASTA, no records, a header without an id, or (with
            on_invalid="error") an invalid character or an empty record.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', not {on_invalid!r}")
    source, file, temporary = resolve_input(path)
    try:
        index = _scan(source, file, alphabet, on_invalid)
    except BaseException:
        if temporary:
            file.unlink(missing_ok=True)
        raise
    index.temporary = temporary
    return index


def _scan(source: str, file: Path, alphabet: Alphabet, on_invalid: str) -> FastaIndex:
    table = _byte_table(alphabet)
    header_blob = bytearray()  # headers, encoded a batch at a time
    header_sizes: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    bad: dict[int, tuple[int, str]] = {}  # row -> (position, reason); position 0 = header line
    seqs: list[str] = []
    batch_titles: list[str] = []
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
        header_sizes.append(Headers.append(header_blob, batch_titles))
        seqs.clear()
        batch_titles.clear()

    with reading(file, source) as (handle, digest):
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
    descriptions = Headers.build(header_blob, header_sizes)
    ids = descriptions.ids()
    if bad and on_invalid == "error":
        row, (pos, reason) = min(bad.items())
        _fail(file, source, row, pos, ids[row], reason)
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
    return FastaIndex(source, file, ids, descriptions, n_residues, skipped, reasons, seq_hash, sha)


def iter_records(index: FastaIndex) -> Iterator[tuple[int, str]]:
    """Second pass: (row, sequence) in file order, skipped rows left out.

    Raises:
        FastaError: the file cannot be read or no longer matches the index.
    """
    row = -1
    expected = iter(index.ids)  # decoded in bulk: one lookup per record would cost as much as the parse
    with reading(index.path, index.source) as (handle, _):
        for row, (title, seq) in enumerate(SimpleFastaParser(handle)):
            title = storable(title)  # as the scan stored it
            if (title.split(None, 1) or [""])[0] != next(expected, None):
                raise FastaError(
                    index.source, None, None, f"input changed since it was scanned (record {row + 1})"
                )
            if not index.skipped[row]:
                yield row, seq
    if row + 1 != len(index.ids):
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


def _fail(file: Path, source: str, row: int, pos: int, record: str | None, reason: str) -> NoReturn:
    line = locate_lines(file, {row: pos})[row]
    raise FastaError(source, line, record, reason)
