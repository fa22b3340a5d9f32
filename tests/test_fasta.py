"""FASTA input: indexing pass, validation messages, second pass, hashes and duplicates."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from protembed import fasta
from protembed.alphabet import AMPLIFY, ESM2
from protembed.errors import FastaError, InvalidSequenceError
from protembed.fasta import FastaIndex, duplicate_groups, iter_records, scan_fasta
from protembed.headers import Headers
from protembed.pipeline import Work, plan_members, units_to_compute

BAD = Path(__file__).parent / "data" / "bad"

TEXT = "\n>sp|P1 first protein\nMKT AYI\r\nak*\n>p2\nMK<mask>T\n>p3 same tokens as p1\nmktayiak\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # messages name the relative path the test passes


def write(tmp_path: Path, text: str | bytes, name: str = "in.fasta") -> Path:
    (tmp_path / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return Path(name)


def test_index_fields(tmp_path: Path) -> None:
    index = scan_fasta(write(tmp_path, TEXT), ESM2)
    assert list(index.ids) == ["sp|P1", "p2", "p3"]
    assert list(index.descriptions) == ["sp|P1 first protein", "p2", "p3 same tokens as p1"]
    assert index.n_residues.tolist() == [8, 4, 8]  # spaces and trailing '*' dropped, <mask> is one
    assert index.n_residues.dtype == np.int64 and index.seq_hash.dtype == np.uint64
    assert not index.skipped.any() and index.skip_reasons == {}
    assert index.seq_hash[0] == index.seq_hash[2] != index.seq_hash[1]
    assert list(iter_records(index)) == [(0, "MKTAYIak*"), (1, "MK<mask>T"), (2, "mktayiak")]
    assert len(index.sha256) == 64 and not index.temporary


def test_gzip_by_magic_and_same_hash(tmp_path: Path) -> None:
    plain = scan_fasta(write(tmp_path, TEXT), ESM2)
    packed = scan_fasta(write(tmp_path, gzip.compress(TEXT.encode()), "named_plain.fa"), ESM2)
    assert list(packed.ids) == list(plain.ids) and packed.sha256 == plain.sha256
    assert np.array_equal(packed.seq_hash, plain.seq_hash)
    assert [s for _, s in iter_records(packed)] == [s for _, s in iter_records(plain)]


def test_stdin_is_spooled_and_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(gzip.compress(TEXT.encode()))))
    index = scan_fasta("-", ESM2)
    assert index.source == "<stdin>" and index.temporary and index.path.exists()
    assert index.sha256 == scan_fasta(write(tmp_path, TEXT), ESM2).sha256
    assert [row for row, _ in iter_records(index)] == [0, 1, 2]
    index.cleanup()
    assert not index.path.exists()


def test_named_pipe_is_spooled(tmp_path: Path) -> None:
    """A FIFO (what `<(zcat x.gz)` gives) cannot be read twice: it is spooled like stdin."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(gzip.compress(TEXT.encode())))
    writer.start()
    index = scan_fasta(fifo, ESM2)
    writer.join()
    assert index.source == str(fifo) and index.temporary and index.path != fifo
    assert index.sha256 == scan_fasta(write(tmp_path, TEXT), ESM2).sha256
    assert [row for row, _ in iter_records(index)] == [0, 1, 2]
    index.cleanup()
    assert not index.path.exists()


def test_stdin_spool_removed_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b">a\nMK1\n")))
    spooled: list[Path] = []
    real = fasta.resolve_input

    def resolve(path: str | Path) -> tuple[str, Path, bool]:
        found = real(path)
        spooled.append(found[1])
        return found

    monkeypatch.setattr(fasta, "resolve_input", resolve)
    with pytest.raises(FastaError, match=r"^<stdin>:2: record 'a': invalid residue '1' at position 3$"):
        scan_fasta("-", ESM2)
    assert spooled and not spooled[0].exists()


BAD_CASES = {
    "empty_file.fasta": ("empty_file.fasta: empty file: no FASTA records", False),
    "not_fasta.fasta": (
        "not_fasta.fasta:1: not FASTA: expected a '>' header line, found 'ID   HBA_HUMAN   ",
        False,
    ),
    "empty_record.fasta": ("empty_record.fasta:5: record 'sp|EMPTY1': empty sequence", True),
    "invalid_residue.fasta": (
        "invalid_residue.fasta:7: record 'sp|P68871|HBB_HUMAN': invalid residue '8' at position 65",
        True,
    ),
    "stop_inside_sequence.fasta": (
        "stop_inside_sequence.fasta:2: record 'orf1': invalid residue '*' at position 31",
        True,
    ),
    "tab_in_sequence.fasta": (
        "tab_in_sequence.fasta:2: record 'pasted_from_a_table': invalid residue '\\t' at position 11",
        True,
    ),
    "header_without_id.fasta": ("header_without_id.fasta:5: header without an id", True),
    "not_utf8.fasta": ("not_utf8.fasta:5: record 'sp|X1': byte 0xe9 in the header is not UTF-8 text", True),
    "truncated_gzip.fasta": ("truncated_gzip.fasta: corrupt gzip input: Compressed file ended", False),
    "bzip2_compressed.fasta": ("bzip2_compressed.fasta: not FASTA: input is bzip2-compressed", False),
}


def test_every_bad_fixture_has_a_case() -> None:
    assert sorted(p.name for p in BAD.glob("*.fasta")) == sorted(BAD_CASES)


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_fixture(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)  # messages name the path as given
    message, skippable = BAD_CASES[name]
    with pytest.raises(FastaError) as err:
        scan_fasta(name, ESM2)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(FastaError) as without_headers:  # a torchrun rank's scan names the record too
        scan_fasta(name, ESM2, headers=False)
    assert str(without_headers.value) == str(err.value)
    if not skippable:
        with pytest.raises(FastaError):
            scan_fasta(name, ESM2, on_invalid="skip")
        return
    index = scan_fasta(name, ESM2, on_invalid="skip")
    (row,) = np.flatnonzero(index.skipped).tolist()
    where, *record, reason = message.split(": ", 2)
    assert record == [f"record '{index.ids[row]}'"] or (record == [] and index.ids[row] == "")
    assert index.skip_reasons == {row: f"{where}: {reason}"}
    assert index.n_residues[row] == 0 and index.seq_hash[row] == 0
    assert [r for r, _ in iter_records(index)] == [r for r in range(len(index)) if r != row]


def test_skip_keeps_rows_in_place(tmp_path: Path) -> None:
    text = ">a\nMK\n>b\nMJK\n>c\n>d\nM-\n>a\nQQ\n"  # J is <unk>; c is empty; '-' is invalid
    index = scan_fasta(write(tmp_path, text), ESM2, on_invalid="skip")
    assert list(index.ids) == ["a", "b", "c", "d", "a"]
    assert index.skipped.tolist() == [False, False, True, True, False]
    assert index.skip_reasons == {
        2: "in.fasta:5: empty sequence",
        3: "in.fasta:7: invalid residue '-' at position 2",
    }
    assert index.n_residues.tolist() == [2, 3, 0, 0, 2]
    assert [row for row, _ in iter_records(index)] == [0, 1, 4]


def test_error_in_a_later_batch_names_the_right_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fasta, "_BATCH_RECORDS", 7)
    lines = [f">r{i}\nMKTA\nYIAK" for i in range(40)]
    lines[31] = ">r31\nMKTA\nYI#K"
    path = write(tmp_path, "\n\n" + "\n".join(lines) + "\n")
    for headers in (True, False):
        with pytest.raises(
            FastaError, match=r"^in.fasta:98: record 'r31': invalid residue '#' at position 7$"
        ):
            scan_fasta(path, ESM2, headers=headers)
    index = scan_fasta(path, ESM2, on_invalid="skip")
    assert np.flatnonzero(index.skipped).tolist() == [31] and len(index) == 40


PARTS_TEXT = ">a one\nMK\n>b\nMJK\n>c\n>d two\nM-\n>a\nQQ\n>e\nMK\n>f\nWWW\n"  # c, d skipped


@pytest.mark.parametrize(("start", "stop"), [(0, 7), (0, 1), (1, 4), (2, 4), (3, 3), (4, 7), (6, 7)])
def test_a_part_is_its_rows_of_the_whole_index(tmp_path: Path, start: int, stop: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """What a torchrun rank keeps: its rows, numbered from 0, with their headers read again."""
    monkeypatch.setattr(fasta, "_BATCH_RECORDS", 2)  # headers gathered over several batches
    path = write(tmp_path, PARTS_TEXT)
    whole = scan_fasta(path, ESM2, on_invalid="skip")
    bare = scan_fasta(path, ESM2, on_invalid="skip", headers=False)
    assert len(bare) == 7 and len(bare.ids) == len(bare.descriptions) == 0
    assert np.array_equal(bare.n_residues, whole.n_residues) and bare.skip_reasons == whole.skip_reasons
    part = fasta.index_part(bare, start, stop)
    rows = slice(start, stop)
    assert (part.first_row, part.file_rows, len(part)) == (start, 7, stop - start)
    assert (
        list(part.ids) == list(whole.ids)[rows] and list(part.descriptions) == list(whole.descriptions)[rows]
    )
    for name in ("n_residues", "skipped", "seq_hash"):
        assert np.array_equal(getattr(part, name), getattr(whole, name)[rows]), name
    assert part.skip_reasons == {r - start: why for r, why in whole.skip_reasons.items() if start <= r < stop}
    assert list(iter_records(part)) == [(r - start, s) for r, s in iter_records(whole) if start <= r < stop]


def stamped(index: FastaIndex) -> FastaIndex:
    """`index` taking the file as it is now: what a pass that opened it before a change sees."""
    info = os.stat(index.path)
    return replace(index, stamp=(info.st_size, info.st_mtime_ns))


def test_a_part_notices_a_changed_file(tmp_path: Path) -> None:
    path = write(tmp_path, PARTS_TEXT)
    bare = scan_fasta(path, ESM2, on_invalid="skip", headers=False)
    early, last = fasta.index_part(bare, 0, 2), fasta.index_part(bare, 4, 7)
    path.write_text(PARTS_TEXT + ">g\nMK\n")  # a record added after the scan
    for index in (early, last):  # on opening: the file's size and time are not the scan's
        with pytest.raises(FastaError, match=r"input changed since it was scanned \(modified or replaced\)$"):
            list(iter_records(index))
    with pytest.raises(FastaError, match=r"\(modified or replaced\)$"):
        fasta.index_part(bare, 4, 7)
    # changes after a pass opened the file: seen where they meet the records it reads
    assert [r for r, _ in iter_records(stamped(early))] == [0, 1]  # not this part's business
    with pytest.raises(FastaError, match=r"input changed since it was scanned \(record 8\)"):
        list(iter_records(stamped(last)))  # the last part reads to the end
    path.write_text(PARTS_TEXT.split(">f")[0])
    with pytest.raises(FastaError, match=r"input changed since it was scanned \(fewer records\)"):
        list(iter_records(stamped(last)))
    with pytest.raises(FastaError, match=r"input changed since it was scanned \(fewer records\)"):
        fasta.index_part(stamped(bare), 4, 7)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FastaError, match=r"^nope.fa: cannot read input: No such file or directory$"):
        scan_fasta("nope.fa", ESM2)
    with pytest.raises(FastaError, match="cannot read input: Is a directory"):
        scan_fasta(tmp_path, ESM2)


def test_other_text_problems(tmp_path: Path) -> None:
    cases = {
        "\n\n  \n": "in.fasta: empty file: no FASTA records",
        ">a\nMKÄT\n": "in.fasta:2: record 'a': invalid residue 'Ä' at position 3",
        ">a\nMK\u4e00T\n": "in.fasta:2: record 'a': invalid residue '\u4e00' at position 3",
        ">a\nMK<mask\n": "in.fasta:2: record 'a': invalid residue '<' at position 3",
        ">a\nMKT**\n": "in.fasta:2: record 'a': invalid residue '*' at position 4",
        ">a\n*\n": "in.fasta:1: record 'a': empty sequence",
    }
    for text, message in cases.items():
        with pytest.raises(FastaError) as err:
            scan_fasta(write(tmp_path, text), ESM2)
        assert str(err.value) == message


def test_validation_matches_the_alphabet(tmp_path: Path) -> None:
    """The vectorised batch check agrees with Alphabet.residue_ids, record by record."""
    rng = np.random.default_rng(0)
    pieces = list("ACDEFGHIKLMNPQRSTVWYXBUZOJacdxy.-") + ["<mask>", "<MASK>", "1", "_", "é"]
    weights = np.array([30.0] * 33 + [1, 1, 0.2, 0.2, 0.2])
    for alphabet in (ESM2, AMPLIFY):
        seqs = []
        for _ in range(300):
            n = int(rng.integers(1, 40))
            seq = "".join(rng.choice(pieces, n, p=weights / weights.sum()))
            seqs.append(seq + ("*" if rng.random() < 0.2 else ""))
        text = "".join(f">s{i}\n{seq}\n" for i, seq in enumerate(seqs))
        index = scan_fasta(write(tmp_path, text), alphabet, on_invalid="skip")
        for i, seq in enumerate(seqs):
            try:
                ids = alphabet.residue_ids(seq)
            except InvalidSequenceError as exc:
                assert index.skipped[i]
                assert index.skip_reasons[i].endswith(
                    f"invalid residue {exc.char!r} at position {exc.position}"
                )
                continue
            assert index.skipped[i] == (ids.size == 0)
            assert index.n_residues[i] == ids.size
            if ids.size:
                assert index.seq_hash[i] == int.from_bytes(
                    fasta._blake(ids.astype(np.uint8).tobytes()), "little"
                )


def test_hash_follows_tokens_not_text(tmp_path: Path) -> None:
    text = ">a\nMKTJ\n>b\nmktx*\n>c\nMKTX\n"  # AMPLIFY: J and X are both <unk>; ESM-2 has an X token
    amp = scan_fasta(write(tmp_path, text), AMPLIFY)
    esm = scan_fasta(write(tmp_path, text), ESM2)
    assert amp.seq_hash[0] == amp.seq_hash[1] == amp.seq_hash[2]
    assert esm.seq_hash[0] != esm.seq_hash[1] == esm.seq_hash[2]


def test_duplicate_groups() -> None:
    seq_hash = np.array([5, 7, 5, 9, 7, 5], dtype=np.uint64)
    skipped = np.array([False, False, False, True, False, False])
    assert duplicate_groups(seq_hash, skipped).tolist() == [0, 1, 0, -1, 1, 0]
    skipped[0] = True
    assert duplicate_groups(seq_hash, skipped).tolist() == [-1, 1, 2, -1, 1, 2]
    assert duplicate_groups(seq_hash, np.ones(6, dtype=bool)).tolist() == [-1] * 6


def test_second_pass_notices_a_changed_file(tmp_path: Path) -> None:
    path = write(tmp_path, TEXT)
    index = scan_fasta(path, ESM2)
    path.write_text(TEXT.replace(">p2", ">other"))
    with pytest.raises(FastaError, match=r"input changed since it was scanned \(modified or replaced\)$"):
        list(iter_records(index))
    (tmp_path / "new.fasta").write_text(TEXT)  # the same bytes in another file, written later
    later = os.stat(path).st_mtime_ns + 10**9
    os.utime(tmp_path / "new.fasta", ns=(later, later))
    os.replace(tmp_path / "new.fasta", path)
    with pytest.raises(FastaError, match=r"\(modified or replaced\)$"):
        list(iter_records(index))
    # changes after the pass opened the file: seen where they meet the records it reads
    path.write_text(TEXT.replace(">p2", ">other"))
    with pytest.raises(FastaError, match=r"input changed since it was scanned \(record 2\)"):
        list(iter_records(stamped(index)))
    path.write_text(TEXT + ">extra\nMK\n")
    with pytest.raises(FastaError, match=r"input changed since it was scanned \(record 4\)"):
        list(iter_records(stamped(index)))
    path.write_text(TEXT.split(">p3")[0])
    with pytest.raises(FastaError, match=r"input changed since it was scanned \(fewer records\)"):
        list(iter_records(stamped(index)))
    n = len(index)

    def units(index: FastaIndex) -> list:
        work = Work(index, ESM2, plan_members(np.arange(n), np.arange(n)), np.ones(n, dtype=bool),
                    index.n_residues, 1022, False, np.zeros(n, dtype=np.int64), 0)  # fmt: skip
        return list(units_to_compute(work, 4096))

    # a residue the scan never saw (not an invalid residue: --on-invalid skip could not help), longer,
    # the same length, another row's length
    for edit in ("MK<mask>7", "MK<mask>TA", "MK<mask>A", "MK\nAAAAAAAA"):
        path.write_text(TEXT.replace("MK<mask>T", edit))
        with pytest.raises(FastaError, match=r"input changed since it was scanned \(record 2\)"):
            units(stamped(index))
    path.write_text(TEXT.replace("MK<mask>T", "mk<MASK>t"))  # case carries no meaning: the same tokens
    assert sorted(int(r) for reps, _, _ in units(stamped(index)) for r in reps) == [0, 1, 2]


def test_sha256_is_stable_and_content_based(tmp_path: Path) -> None:
    a = scan_fasta(write(tmp_path, TEXT, "a.fa"), ESM2)
    b = scan_fasta(write(tmp_path, TEXT, "b.fa"), ESM2)
    c = scan_fasta(write(tmp_path, TEXT + "\n", "c.fa"), ESM2)
    assert a.sha256 == b.sha256 != c.sha256


def test_non_utf8_byte_in_a_sequence_names_record_and_position(tmp_path: Path) -> None:
    path = tmp_path / "latin1.fasta"
    path.write_bytes(b">a\nMKT\n>b some protein\nMK\nTL\xe9AYI\n>c\nMS\n")
    with pytest.raises(FastaError) as err:
        scan_fasta(path, ESM2)
    assert str(err.value) == f"{path}:5: record 'b': byte 0xe9 at position 5 is not UTF-8 text"
    index = scan_fasta(path, ESM2, on_invalid="skip")
    assert index.skipped.tolist() == [False, True, False]
    assert index.skip_reasons == {1: f"{path}:5: byte 0xe9 at position 5 is not UTF-8 text"}
    assert list(iter_records(index)) == [(0, "MKT"), (2, "MS")]


def test_non_utf8_bytes_in_an_id_are_stored_as_replacement_characters(tmp_path: Path) -> None:
    path = tmp_path / "latin1_id.fasta"
    path.write_bytes(b">caf\xe9 x\nMKT\n>d\nMS\n")
    index = scan_fasta(path, ESM2, on_invalid="skip")
    assert list(index.ids) == ["caf\ufffd", "d"] and index.descriptions[0] == "caf\ufffd x"
    assert index.skip_reasons == {0: f"{path}:1: byte 0xe9 in the header is not UTF-8 text"}
    assert list(iter_records(index)) == [(1, "MS")]


def test_binary_input_is_not_fasta(tmp_path: Path) -> None:
    path = tmp_path / "image.fasta"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(FastaError) as err:
        scan_fasta(path, ESM2)
    assert str(err.value).startswith(f"{path}:1: not FASTA: expected a '>' header line, found '\ufffdPNG'")


def test_spools_of_killed_runs_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import os; print(os.getpid())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead = tmp_path / f"protembed-stdin-{int(done.stdout)}-abc.fasta"  # that process has exited
    alive = tmp_path / f"protembed-stdin-{os.getpid()}-def.fasta"
    for spool in (dead, alive):
        spool.write_text(">a\nMKT\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b">x\nMSEQ\n")))
    index = scan_fasta("-", ESM2)
    try:
        assert not dead.exists() and alive.exists()
        assert index.path.parent == tmp_path and index.path.name.startswith(f"protembed-stdin-{os.getpid()}-")
    finally:
        index.cleanup()


def test_headers_are_compact_and_read_like_lists() -> None:
    titles = [["sp|P1 first protein", "", "  lead  space"], ["caf\u00e9 \u00fcber", "p5"]]
    blob = bytearray()
    desc = Headers.build(blob, [Headers.append(blob, chunk) for chunk in titles])
    ids = desc.ids()
    flat = [t for chunk in titles for t in chunk]
    assert len(desc) == 5 and list(desc) == flat and desc[-1] == "p5" and desc[3] == "caf\u00e9 \u00fcber"
    assert list(ids) == ["sp|P1", "", "lead", "caf\u00e9", "p5"]
    view = ids[1:4]  # a view on the same blob
    assert isinstance(view, Headers) and view.blob is desc.blob and list(view) == ["", "lead", "caf\u00e9"]
    assert list(desc[3:]) == flat[3:] and list(desc[4:2]) == []
    with pytest.raises(IndexError):
        desc[5]
    assert len(desc.blob) == sum(len(t.encode()) for t in flat)
