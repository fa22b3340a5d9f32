"""FLIP data: tasks, header and label parsing, joins and masks, malformed files, the checked downloader."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from protembed.errors import FastaError, HubError
from protembed.flip import (
    IGNORE,
    TASKS,
    FlipError,
    find_file,
    get_task,
    load_task,
    read_residue_task,
    read_sequence_task,
)
from protembed.flip_fetch import PINS, Pin, check_pin, fetch
from tests.flip_server import FlipServer
from tests.helpers import SHARED

FLIP = SHARED / "data" / "flip"
TINY, LAYOUT = FLIP / "tiny", FLIP / "fasta_layout"
TINY_SPLITS = {
    "flip-meltome": "SYNTHETIC_mixed_split",
    "flip-gb1": "two_vs_rest",
    "flip-secondary-structure": "sampled",
    "flip-conservation": "sampled",
    "flip-scl": "SYNTHETIC_mixed_soft",
    "flip-bind": "from_publication",
}


def test_task_table_and_alias() -> None:
    assert get_task("flip-ss3") is TASKS["flip-secondary-structure"]
    assert get_task("FLIP-GB1").default_split == "two_vs_rest"
    assert {t.default_split for t in TASKS.values()} >= {
        "mixed_split",
        "two_vs_rest",
        "sampled",
        "mixed_soft",
    }
    with pytest.raises(FlipError, match="unknown task 'flip-aav'"):
        get_task("flip-aav")


@pytest.mark.parametrize("task", sorted(TINY_SPLITS))
def test_tiny_counts_match_expected(task: str) -> None:
    spec = get_task(task)
    data = load_task(spec, TINY_SPLITS[task], data_dir=TINY)
    expected = json.loads((TINY / "expected_counts.json").read_text())[f"{spec.folder}/{TINY_SPLITS[task]}"]
    assert data.counts() == {
        "train": expected["train"],
        "validation": expected["val"],
        "test": expected["test"],
    }
    assert len(data.ids) == len(data.seqs) == len(data.part)


def test_sequence_targets_parsed() -> None:
    gb1 = load_task(get_task("flip-gb1"), "two_vs_rest", data_dir=TINY)
    assert gb1.ids[:2] == ["Sequence0", "Sequence1"]
    assert gb1.targets is not None and gb1.targets.dtype == np.float64
    assert gb1.targets[1] == 1.4459050863  # as written in the file
    scl = load_task(get_task("flip-scl"), "SYNTHETIC_mixed_soft", data_dir=TINY)
    assert scl.targets is not None and scl.targets.dtype == np.int64
    assert [scl.task.classes[int(t)] for t in scl.targets[:3]] == [
        "Extracellular",
        "Cytoplasm",
        "Mitochondrion",
    ]


def test_residue_labels_and_resolved_mask() -> None:
    ss = load_task(get_task("flip-ss3"), data_dir=TINY)
    assert ss.labels is not None and ss.ids[0] == "2a6h-E"
    first = ss.labels[0]
    assert len(first) == len(ss.seqs[0])
    mask = (TINY / "secondary_structure" / "resolved.fasta").read_text().split("\n")[1]
    unresolved = np.array([c == "0" for c in mask])
    assert (first[unresolved] == IGNORE).all() and (first[~unresolved] >= 0).all()
    assert "".join("CEH"[v] for v in first[1:6]) == "CCCCH" and first[0] == IGNORE
    cons = load_task(get_task("flip-conservation"), data_dir=TINY)
    assert cons.labels is not None and int(cons.labels[0][0]) == 6 - 1  # '6' is class index 5


def test_gzipped_layout_counts() -> None:
    data = load_task(get_task("flip-gb1"), "two_vs_rest", data_dir=LAYOUT)
    assert data.counts() == {"train": 381, "validation": 43, "test": 8309}
    assert {len(s) for s in data.seqs} == {265}


def test_pins_match_shared_copies() -> None:
    for key, pin in PINS.items():
        path = LAYOUT / f"{key}.fasta.gz"
        if pin.sha256 is None:
            assert not path.exists()
            continue
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == pin.sha256, key


def test_unknown_split_and_missing_file() -> None:
    with pytest.raises(FlipError, match="unknown split 'nope' for flip-gb1"):
        load_task(get_task("flip-gb1"), "nope")
    with pytest.raises(
        FlipError, match=r"no nope.fasta\[.gz\] in .*gb1 \(found: sampled.fasta, two_vs_rest.fasta\)"
    ):
        find_file(TINY, "gb1", "nope")
    with pytest.raises(FlipError, match=r"--data-dir /nonexistent: no such folder"):
        find_file(Path("/nonexistent"), "gb1", "two_vs_rest")


def test_split_names_the_files_that_are_splits(tmp_path: Path) -> None:
    """A per-residue task's sequences and mask files are refused as --split by name, and a missing
    split lists only split files (and FLIP's split names), in both modes."""
    ss3 = get_task("flip-ss3")
    for data_dir in (None, TINY):
        with pytest.raises(
            FlipError, match=r"--split resolved: resolved.fasta holds .*resolved-residue mask"
        ):
            load_task(ss3, "resolved", data_dir=data_dir)
        with pytest.raises(
            FlipError, match=r"--split sequences: sequences.fasta holds .*sequences, not a split"
        ):
            load_task(ss3, "sequences.fasta", data_dir=data_dir)
        with pytest.raises(FlipError, match=r"--split mask: mask.fasta holds .*resolved-residue mask"):
            load_task(ss3, "mask", data_dir=data_dir)
    found = r"split files there: sampled.fasta; FLIP's splits: sampled"
    with pytest.raises(FlipError, match=rf"no nope.fasta\[.gz\] in .*secondary_structure \({found}\)"):
        load_task(ss3, "nope", data_dir=TINY)
    with pytest.raises(
        FlipError, match=r"\(split files there: sampled.fasta, two_vs_rest.fasta; FLIP's splits: one_vs"
    ):
        load_task(get_task("flip-gb1"), "nope", data_dir=TINY)
    (tmp_path / "empty" / "secondary_structure").mkdir(parents=True)  # the sequences are asked for first
    with pytest.raises(FlipError, match=r"^no sequences.fasta\[.gz\] in .*secondary_structure$"):
        load_task(ss3, None, data_dir=tmp_path / "empty")
    # a file that is not a split fails on its first record's missing SET=, not on its labels
    (tmp_path / "secondary_structure").mkdir()
    for name in ("sequences", "resolved"):
        shutil.copy(TINY / "secondary_structure" / f"{name}.fasta", tmp_path / "secondary_structure")
    shutil.copy(TINY / "secondary_structure" / "mask.fasta", tmp_path / "secondary_structure" / "mine.fasta")
    with pytest.raises(FastaError, match=r"mine.fasta:1: .*missing SET= annotation"):
        load_task(ss3, "mine", data_dir=tmp_path)


def test_data_files_that_are_there_but_cannot_be_read(tmp_path: Path) -> None:
    """Not reported as missing: a folder, a link to nowhere or a loop of links in a file's place, a
    file in a dataset folder's place, a loop as --data-dir."""
    wanted = tmp_path / "gb1" / "two_vs_rest.fasta"
    wanted.mkdir(parents=True)
    with pytest.raises(FlipError, match=rf"^{wanted}: is a folder$"):
        find_file(tmp_path, "gb1", "two_vs_rest")
    wanted.rmdir()
    wanted.symlink_to(tmp_path / "gone.fasta")
    with pytest.raises(
        FlipError, match=rf"^{wanted}: is a link to {tmp_path / 'gone.fasta'}, which does not"
    ):
        find_file(tmp_path, "gb1", "two_vs_rest")
    wanted.unlink()
    wanted.symlink_to(wanted)
    with pytest.raises(FlipError, match=rf"^{wanted}: cannot read: Too many levels of symbolic links$"):
        find_file(tmp_path, "gb1", "two_vs_rest")
    wanted.unlink()
    wanted.write_text(">a TARGET=1 SET=train\nMKV\n")
    (tmp_path / "gb1" / "two_vs_rest.fasta.gz").write_bytes(gzip.compress(b">a TARGET=2 SET=train\nMKV\n"))
    with pytest.raises(FlipError, match=r"holds both two_vs_rest.fasta and two_vs_rest.fasta.gz; keep one"):
        find_file(tmp_path, "gb1", "two_vs_rest")
    for left in (tmp_path / "gb1").iterdir():
        left.unlink()
    (tmp_path / "gb1").rmdir()
    (tmp_path / "gb1").write_text("")
    with pytest.raises(FlipError, match=rf"^{tmp_path / 'gb1'}: not a folder$"):
        find_file(tmp_path, "gb1", "two_vs_rest")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(
        FlipError, match=rf"^--data-dir {loop}: cannot read: Too many levels of symbolic links$"
    ):
        find_file(loop, "gb1", "two_vs_rest")


# --- malformed files: one defect each, one-line messages with path:line -------------------------

SEQ_OK = ">s1 TARGET=1.5 SET=train VALIDATION=False\nMKV\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MKV\n" + SEQ_OK, r"bad.fasta:1: text before the first '>' header"),
        (">s1 SET=train VALIDATION=False\nMKV\n", r"bad.fasta:1: record 's1': missing TARGET= annotation"),
        (">s1 TARGET=x SET=train\nMKV\n", r"record 's1': TARGET 'x' is not a number"),
        (">s1 TARGET=1 SET=dev\nMKV\n", r"record 's1': SET must be train or test, got 'dev'"),
        (">s1 TARGET=1 SET=train VALIDATION=maybe\nMKV\n", r"VALIDATION must be True or False, got 'maybe'"),
        (">s1 TARGET=1 SET=train oops\nMKV\n", r"malformed annotation 'oops' \(expected KEY=VALUE\)"),
        (">s1 TARGET=1 SET=train target=2\nMKV\n", r"bad.fasta:1: record 's1': TARGET= given twice"),
        (SEQ_OK + ">s2 TARGET=1 SET=test\n", r"bad.fasta:3: record 's2': empty record"),
        (">s1 TARGET=1 SET=test\nMK1V\n", r"record 's1': invalid residue '1' at position 3"),
        (">s1 TARGET=1e39 SET=test\nMKV\n", r"record 's1': TARGET '1e39' is out of range \(at most 3.4e\+38"),
        (SEQ_OK + ">s1 TARGET=2 SET=test\nMKV\n", r"bad.fasta:3: record 's1': duplicate id"),
        ("", r"no FASTA records"),
        (">s1 TARGET=1 SET=train\nMKV\n", r"bad.fasta:1: record 's1': missing VALIDATION= annotation"),
        (">s1 TARGET=1 VALIDATON=True SET=train\nMKV\n", r"record 's1': missing VALIDATION= annotation"),
        (
            "> TARGET=1 SET=train VALIDATION=False\nMKV\n",
            r"bad.fasta:1: record 'TARGET=1': header without an id",
        ),
        (">s1 TARGET=1_5 SET=train VALIDATION=False\nMKV\n", r"record 's1': TARGET '1_5' is not a number"),
        (
            ">s1 TARGET=\u0663 SET=train VALIDATION=False\nMKV\n",
            "record 's1': TARGET '\u0663' is not a number",
        ),
        (
            ">s1 TARGET=nan SET=train VALIDATION=False\nMKV\n",
            r"record 's1': TARGET 'nan' is not a finite number",
        ),
        (
            SEQ_OK + " >s2 TARGET=1 SET=test VALIDATION=False\nMKV\n",
            r"bad.fasta:3: record 's1': '>' at column 2: a header must start at the beginning of its line",
        ),
    ],
)
def test_malformed_sequence_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.fasta"
    path.write_text(text)
    with pytest.raises(FastaError, match=message) as info:
        read_sequence_task(get_task("flip-gb1"), "x", path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_bytes_that_are_not_utf8(tmp_path: Path, gz: bool) -> None:
    """Reported with record and position (header or sequence), like `embed` reports them."""
    path = tmp_path / ("bad.fasta.gz" if gz else "bad.fasta")

    def write(data: bytes) -> None:
        path.write_bytes(gzip.compress(data) if gz else data)

    write(SEQ_OK.encode() + b">s2 TARGET=1 SET=test\nMK\xe9V\n")
    with pytest.raises(FastaError, match=r"bad.fasta(.gz)?:4: record 's2': byte 0xe9 at position 3 is not"):
        read_sequence_task(get_task("flip-gb1"), "x", path)
    write(b">s\xff2 TARGET=1 SET=test\nMKV\n")
    with pytest.raises(FastaError, match="record 's\ufffd2': byte 0xff in the header is not UTF-8 text"):
        read_sequence_task(get_task("flip-gb1"), "x", path)
    write(b"\xef\xbb\xbf" + SEQ_OK.encode())  # a UTF-8 byte-order mark is not an error
    assert read_sequence_task(get_task("flip-gb1"), "x", path).ids == ["s1"]


def test_unknown_class(tmp_path: Path) -> None:
    path = tmp_path / "scl.fasta"
    path.write_text(">s1 TARGET=Cell membrane SET=train\nMKV\n")  # the FASTA spelling uses underscores
    with pytest.raises(FastaError, match="malformed annotation 'membrane'"):
        read_sequence_task(get_task("flip-scl"), "x", path)
    path.write_text(">s1 TARGET=Moon SET=train\nMKV\n")
    with pytest.raises(FastaError, match="unknown class 'Moon' \\(expected one of Cytoplasm, Nucleus"):
        read_sequence_task(get_task("flip-scl"), "x", path)


@pytest.mark.parametrize(
    ("labels", "mask", "message"),
    [
        (
            ">a SET=train VALIDATION=False\nCCH\n",
            None,
            r"labels.fasta:1: record 'a': 3 labels for a sequence of 4 residues",
        ),
        (
            ">a SET=train VALIDATION=False\nCCXH\n",
            None,
            r"record 'a': invalid label 'X' at position 3 \(expected one of CEH\)",
        ),
        (
            ">zz SET=test VALIDATION=False\nCCHH\n",
            None,
            r"record 'zz': no sequence with this id in sequences.fasta",
        ),
        (
            ">a SET=train VALIDATION=False\nCCHH\n>a SET=test VALIDATION=False\nCCHH\n",
            None,
            r"labels.fasta:3: record 'a': duplicate id",
        ),
        (
            ">a SET=train VALIDATION=False\nCCHH\n",
            ">a\n011\n",
            r"mask.fasta:1: record 'a': mask of 3 positions for a sequence of 4",
        ),
        (
            ">a SET=train VALIDATION=False\nCCHH\n",
            ">a\n01\n21\n",
            r"mask.fasta:3: record 'a': mask .* found '2' at position 3",
        ),
        (
            ">a SET=train VALIDATION=False\nCCHH\n",
            ">b\n0111\n",
            r"mask.fasta: record 'a': no mask record for this id",
        ),
        (
            ">a SET=train VALIDATION=False\nCCHH\n",
            ">a\n0111\n>a\n1111\n",
            r"mask.fasta:3: record 'a': duplicate id",
        ),
    ],
)
def test_malformed_residue_files(tmp_path: Path, labels: str, mask: str | None, message: str) -> None:
    (tmp_path / "sequences.fasta").write_text(">a\nMKVL\n>b\nMKVL\n")
    (tmp_path / "labels.fasta").write_text(labels)
    mask_path = None
    if mask is not None:
        mask_path = tmp_path / "mask.fasta"
        mask_path.write_text(mask)
    with pytest.raises(FastaError, match=message):
        read_residue_task(
            get_task("flip-ss3"), "x", tmp_path / "sequences.fasta", tmp_path / "labels.fasta", mask_path
        )


def test_sequences_without_labels_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "sequences.fasta").write_text(">a\nMKVL\n>b\nMK\n>c\nMKV\n")
    (tmp_path / "labels.fasta").write_text(
        ">c SET=test VALIDATION=False\n111\n>a SET=train VALIDATION=True\n9999\n"
    )
    data = read_residue_task(
        get_task("flip-conservation"), "x", tmp_path / "sequences.fasta", tmp_path / "labels.fasta", None
    )
    assert data.ids == ["c", "a"] and data.seqs == ["MKV", "MKVL"]
    assert data.part.tolist() == [2, 1]
    assert data.labels is not None and data.labels[1].tolist() == [8, 8, 8, 8]


# --- downloader against a local server ----------------------------------------------------------


def test_download_checks_and_caches(flip_server: FlipServer, tmp_path: Path) -> None:
    seen: list[tuple[str, int, int | None]] = []
    path = fetch("gb1", "two_vs_rest", tmp_path, flip_server.url, lambda *a: seen.append(a))
    assert path == tmp_path / "flip" / "gb1" / "two_vs_rest.fasta"
    assert seen and seen[-1] == ("gb1/two_vs_rest", path.stat().st_size, path.stat().st_size)
    n = len(flip_server.requests)
    again = load_task(get_task("flip-gb1"), cache_dir=tmp_path, base_url=flip_server.url)
    assert len(flip_server.requests) == n  # served from the cache
    assert again.counts() == {"train": 381, "validation": 43, "test": 8309}


def test_download_residue_task(flip_server: FlipServer, tmp_path: Path) -> None:
    data = load_task(get_task("flip-bind"), cache_dir=tmp_path, base_url=flip_server.url)
    assert data.counts() == {"train": 954, "validation": 106, "test": 300}
    assert sorted(p.name for p in (tmp_path / "flip" / "bind").glob("[!.]*")) == [
        "from_publication.fasta",
        "sequences.fasta",
    ]


def test_download_rejects_tampered_file(flip_server: FlipServer, tmp_path: Path) -> None:
    flip_server.tamper = True
    try:
        with pytest.raises(HubError, match=r"gb1/sampled.fasta: sha256 .* does not match the pinned"):
            fetch("gb1", "sampled", tmp_path, flip_server.url)
    finally:
        flip_server.tamper = False
    left = [p.name for p in (tmp_path / "flip" / "gb1").iterdir()]
    assert left == [".sampled.fasta.lock"]  # nothing half-written is left; the lock file stays


def test_download_errors(flip_server: FlipServer, tmp_path: Path) -> None:
    with pytest.raises(HubError, match="gb1/nope.fasta is not a pinned FLIP file"):
        fetch("gb1", "nope", tmp_path, flip_server.url)
    with pytest.raises(HubError, match="cannot download .*meltome/mixed_split.fasta"):
        fetch("meltome", "mixed_split", tmp_path, flip_server.url)  # not in fasta_layout: 404


def test_cli_downloads_once(flip_server: FlipServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from protembed.cli import app

    monkeypatch.setenv("PROTEMBED_FLIP_URL", flip_server.url)
    args = ["finetune", "flip-gb1", "--features", "onehot", "--head", "ridge", "--cache-dir", str(tmp_path)]
    before = len(flip_server.requests)
    for _ in range(2):
        result = CliRunner().invoke(app, [*args, "--json", "-q"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["counts"] == {"train": 381, "validation": 43, "test": 8309}
    assert flip_server.requests[before:] == ["/public/FLIP/fasta/gb1/two_vs_rest.fasta"]


def test_concurrent_downloads_take_turns(flip_server: FlipServer, tmp_path: Path) -> None:
    """Two runs needing the same file at once: one downloads it, the other waits and reuses it."""
    before, flip_server.delay = len(flip_server.requests), 0.5
    try:
        with ThreadPoolExecutor(2) as pool:
            paths = list(pool.map(lambda _: fetch("gb1", "two_vs_rest", tmp_path, flip_server.url), range(2)))
    finally:
        flip_server.delay = 0.0
    assert paths[0] == paths[1] and paths[0].is_file()
    assert len(flip_server.requests) == before + 1
    names = sorted(p.name for p in paths[0].parent.iterdir())
    assert names == [".two_vs_rest.fasta.lock", "two_vs_rest.fasta"]


def test_damaged_cached_file_is_fetched_again(flip_server: FlipServer, tmp_path: Path) -> None:
    path = fetch("gb1", "two_vs_rest", tmp_path, flip_server.url)
    good, before = path.read_bytes(), len(flip_server.requests)
    path.write_bytes(good[: len(good) // 2])  # cut short on disk after it was checked
    assert fetch("gb1", "two_vs_rest", tmp_path, flip_server.url).read_bytes() == good
    assert len(flip_server.requests) == before + 1


def test_read_only_cache_with_the_file_is_used(
    flip_server: FlipServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared cache that someone else filled: checked and read, with no lock file to create."""
    path = fetch("gb1", "two_vs_rest", tmp_path, flip_server.url)
    (path.parent / ".two_vs_rest.fasta.lock").unlink()
    before = len(flip_server.requests)
    monkeypatch.setattr("protembed.cache.writable", lambda _: False)  # as for a non-root user
    assert fetch("gb1", "two_vs_rest", tmp_path, flip_server.url) == path
    assert len(flip_server.requests) == before and not (path.parent / ".two_vs_rest.fasta.lock").exists()
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(
        HubError, match=r"two_vs_rest.fasta \(in a read-only cache\): sha256 .* does not match"
    ):
        fetch("gb1", "two_vs_rest", tmp_path, flip_server.url)


def test_download_cut_short_without_a_length_is_refused(
    flip_server: FlipServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file pinned by counts alone (meltome, scl), from a server that sends no Content-Length."""
    monkeypatch.setitem(PINS, "gb1/two_vs_rest", Pin(None, PINS["gb1/two_vs_rest"].counts))
    flip_server.cut = 20  # inside the last sequence: every header arrived, so the counts match
    try:
        with pytest.raises(HubError, match=r"two_vs_rest.fasta: the file ends inside a record"):
            fetch("gb1", "two_vs_rest", tmp_path, flip_server.url)
        assert not (tmp_path / "flip" / "gb1" / "two_vs_rest.fasta").exists()
        flip_server.cut = 0  # the whole file, still without a length: its final line break shows the end
        assert fetch("gb1", "two_vs_rest", tmp_path, flip_server.url).is_file()
    finally:
        flip_server.cut = None


def test_record_counts_checked(tmp_path: Path) -> None:
    path = tmp_path / "m.fasta"
    path.write_text(">a TARGET=1 SET=train VALIDATION=False\nMK\n>b TARGET=2 SET=test VALIDATION=False\nMK\n")
    check_pin(path, Pin(None, (1, 0, 1)), "", "u")
    with pytest.raises(HubError, match=r"u: record counts \(1, 0, 1\) do not match the pinned \(1, 1, 1\)"):
        check_pin(path, Pin(None, (1, 1, 1)), "", "u")
    with pytest.raises(HubError, match=r"record counts \(2,\) do not match the pinned \(3,\)"):
        check_pin(path, Pin(None, (3,)), "", "u")
    path.write_text(">a TARGET=1 SET=train VALIDATION=False\nMK\n>b TARGET=2 SET=test VALIDATION=False\n")
    with pytest.raises(HubError, match="u: the file ends inside a record"):
        check_pin(path, Pin(None, (1, 0, 1)), "", "u")  # its last line is a header
    path.write_text(">a TARGET=1 SET=train VALIDATION=False\nMK\n>b TARGET=2 SET=test VALIDATION=False\nM")
    check_pin(path, Pin(None, (1, 0, 1)), "", "u")  # the length matched: the end arrived
    with pytest.raises(HubError, match="u: the file ends inside a record"):
        check_pin(path, Pin(None, (1, 0, 1)), "", "u", length_known=False)
