"""The whole-record FASTA reader of FLIP files and `predict` input: splitting, line numbers, defects."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from protembed.errors import FastaError
from protembed.records import read_records


def _write(tmp_path: Path, data: bytes, name: str = "in.fa") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_multiline_bodies_and_whitespace(tmp_path: Path) -> None:
    path = _write(tmp_path, b"\n>a first one\r\nMKT AY\r\n\r\nIAK\n>b\n  MK V \t\n")
    recs = list(read_records(path))
    assert [(r.id, r.header, r.body, r.line) for r in recs] == [
        ("a", "a first one", "MKTAYIAK", 2),
        ("b", "b", "MKV", 6),
    ]
    assert [recs[0].line_at(p) for p in (0, 4, 5, 7)] == [3, 3, 5, 5]


def test_gzip_is_recognised_by_its_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path, gzip.compress(b">a\nMKV\n"), "plain-name.fa")
    assert [r.body for r in read_records(path)] == ["MKV"]


def test_only_spaces_are_dropped_inside_a_line(tmp_path: Path) -> None:
    """As in `embed` (Biopython): a tab or other whitespace inside a sequence line is a character."""
    (rec,) = read_records(_write(tmp_path, b">a\nMK\tV\n"))
    with pytest.raises(FastaError, match=r"record 'a': invalid residue '\\t' at position 3"):
        rec.check_residues()


def test_error_points_at_the_line_of_the_character(tmp_path: Path) -> None:
    path = _write(tmp_path, b">a\nMKTAYIAKQR\nQISFVKS1FS\n")
    (rec,) = read_records(path)
    with pytest.raises(FastaError, match=r"in.fa:3: record 'a': invalid residue '1' at position 18$"):
        rec.check_residues()
    with pytest.raises(FastaError, match=r"in.fa:1: record 'a': something about the header$"):
        raise rec.error("something about the header")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"in.fa: no FASTA records"),
        (b"\n\n", r"in.fa: no FASTA records"),
        (b"MKV\n>a\nMKV\n", r"in.fa:1: text before the first '>' header"),
        (b">a\nMKV\n>\nMKV\n", r"in.fa:3: record '': header without an id"),
        (b">a\nMKV\n>b desc\n\n>c\nM\n", r"in.fa:3: record 'b': empty record"),
        (b">a\nMK\nV\xe9K\n", r"in.fa:3: record 'a': byte 0xe9 at position 4 is not UTF-8 text"),
        (b">a\x00b\nMKV\n", r"in.fa:1: record 'a\x00b': NUL byte in the header"),
        (b">a\xff\nMKV\n", "in.fa:1: record 'a\ufffd': byte 0xff in the header is not UTF-8 text"),
        (b"BZh91AY&SY", r"in.fa: not FASTA: input is bzip2-compressed"),
        (b"\x1f\x8b\x08\x00garbage", r"in.fa: corrupt gzip input"),
    ],
)
def test_defects(tmp_path: Path, data: bytes, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(FastaError, match=message) as info:
        list(read_records(path))
    assert "\n" not in str(info.value)


def test_unreadable(tmp_path: Path) -> None:
    with pytest.raises(FastaError, match=r"missing.fa: cannot read: No such file or directory"):
        list(read_records(tmp_path / "missing.fa"))
    with pytest.raises(FastaError, match=r"cannot read: Is a directory"):
        list(read_records(tmp_path))
