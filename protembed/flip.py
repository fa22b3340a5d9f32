"""FLIP benchmark data: the task table, FASTA parsing, splits and labels (downloads: flip_fetch).

Files follow the FLIP FASTA server layout, `<root>/<folder>/<file>.fasta` (or `.fasta.gz`):

- per-sequence tasks: `>id TARGET=<value> SET=<train|test> VALIDATION=<True|False>` + sequence;
- per-residue tasks: `sequences.fasta` (`>id` + sequence) joined on id with a label file
  (`>id SET=.. VALIDATION=..` + one label character per residue), plus an optional 0/1 mask file.

Validation = `SET=train VALIDATION=True`; train = the other `SET=train` records; test = `SET=test`.
"""

from __future__ import annotations

import gzip
import io
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from protembed.cache import default_cache_dir
from protembed.errors import FastaError, ProtembedError
from protembed.fasta import undecoded_byte
from protembed.flip_fetch import FLIP_URL, Progress, fetch

IGNORE = -100  # label of residues without a usable label (unresolved); skipped by loss and metrics
PARTS = ("train", "validation", "test")
TRAIN, VALIDATION, TEST = 0, 1, 2


class FlipError(ProtembedError):
    """An unknown FLIP task or split, or a data folder without the files a task needs."""


@dataclass(frozen=True)
class Task:
    """One FLIP task: where its files live, what is predicted and how labels are spelled."""

    name: str
    folder: str
    level: str  # "sequence" | "residue"
    kind: str  # "regression" | "classification"
    default_split: str
    splits: tuple[str, ...]
    classes: tuple[str, ...] = ()  # label spellings in the files, in class-index order
    mask: str | None = None  # per-residue 0/1 file; 0 = unresolved, excluded from loss and accuracy
    unit: str = ""

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1


SCL_CLASSES = (
    "Cytoplasm", "Nucleus", "Cell_membrane", "Mitochondrion", "Endoplasmic_reticulum",
    "Lysosome/Vacuole", "Golgi_apparatus", "Peroxisome", "Extracellular", "Plastid",
)  # fmt: skip

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("flip-meltome", "meltome", "sequence", "regression", "mixed_split",
             ("mixed_split", "human", "human_cell"), unit="deg C"),
        Task("flip-gb1", "gb1", "sequence", "regression", "two_vs_rest",
             ("one_vs_rest", "two_vs_rest", "three_vs_rest", "low_vs_high", "sampled")),
        Task("flip-secondary-structure", "secondary_structure", "residue", "classification", "sampled",
             ("sampled",), classes=("C", "E", "H"), mask="resolved"),
        Task("flip-conservation", "conservation", "residue", "classification", "sampled",
             ("sampled",), classes=tuple("123456789")),
        Task("flip-scl", "scl", "sequence", "classification", "mixed_soft",
             ("mixed_soft", "mixed_hard", "human_soft", "human_hard", "balanced"), classes=SCL_CLASSES),
        Task("flip-bind", "bind", "residue", "classification", "from_publication",
             ("from_publication", "one_vs_many", "two_vs_many", "one_vs_sm", "one_vs_mn", "one_vs_sn"),
             classes=tuple("01234567")),
    )
}  # fmt: skip
ALIASES = {"flip-ss3": "flip-secondary-structure"}


@dataclass
class Dataset:
    """A task's records in file order. `part` is 0 train, 1 validation, 2 test.

    targets: sequence-level labels, float32 (regression) or int64 class indices.
    labels: residue-level labels, int64 class index per residue, IGNORE where masked.
    """

    task: Task
    split: str
    ids: list[str]
    seqs: list[str]
    part: np.ndarray
    targets: np.ndarray | None = None
    labels: list[np.ndarray] | None = None

    def counts(self) -> dict[str, int]:
        return {name: int((self.part == i).sum()) for i, name in enumerate(PARTS)}


def get_task(name: str) -> Task:
    """A task by name or alias (`flip-ss3`)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise FlipError(f"unknown task '{name}' (choose from {', '.join([*TASKS, *ALIASES])})")
    return TASKS[key]


# --- reading ------------------------------------------------------------------------------------


def read_fasta(path: Path) -> Iterator[tuple[int, str, str]]:
    """(header line number, header without '>', body) per record; plain or gzipped, multi-line bodies.

    A byte that is not UTF-8 text is reported with its record and position.
    """
    header: str | None = None
    body: list[str] = []
    start = 0
    try:
        with _open_text(path) as fh:
            for n, raw in enumerate(fh, 1):
                line = raw.strip()
                if line.startswith(">"):
                    if header is not None:
                        yield start, header, _body(path, start, header, body)
                    header, body, start = line[1:].strip(), [], n
                elif line:
                    if header is None:
                        raise FastaError(str(path), n, None, "text before the first '>' header")
                    body.append(line)
    except (OSError, EOFError) as exc:
        raise FastaError(str(path), None, None, f"cannot read: {exc}") from None
    if header is None:
        raise FastaError(str(path), None, None, "no FASTA records")
    yield start, header, _body(path, start, header, body)


def _open_text(path: Path) -> TextIO:
    """A UTF-8 text stream (undecodable bytes escaped) of a plain or gzipped file, or of stdin for `-`."""
    if str(path) == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def _body(path: Path, line: int, header: str, body: list[str]) -> str:
    rid = header.split()[0] if header.split() else ""
    if found := undecoded_byte(header):
        rid = rid.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # printable
        raise FastaError(str(path), line, rid, f"byte 0x{found[1]:02x} in the header is not UTF-8 text")
    if not body:
        raise FastaError(str(path), line, rid, "empty record")
    seq = "".join(body)
    if found := undecoded_byte(seq):
        raise FastaError(
            str(path), line, rid, f"byte 0x{found[1]:02x} at position {found[0] + 1} is not UTF-8 text"
        )
    return seq


def parse_header(path: Path, line: int, header: str) -> tuple[str, dict[str, str]]:
    """Record id and its `KEY=VALUE` annotations."""
    fields = header.split()
    if not fields:
        raise FastaError(str(path), line, None, "header without an id")
    attrs: dict[str, str] = {}
    for item in fields[1:]:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise FastaError(
                str(path), line, fields[0], f"malformed annotation '{item}' (expected KEY=VALUE)"
            )
        attrs[key.upper()] = value
    return fields[0], attrs


def part_of(path: Path, line: int, rid: str, attrs: dict[str, str]) -> int:
    """Train, validation or test from the SET and VALIDATION annotations."""
    s = attrs.get("SET", "").lower()
    v = attrs.get("VALIDATION", "False").lower()
    if s not in ("train", "test"):
        raise FastaError(str(path), line, rid, f"SET must be train or test, got '{attrs.get('SET', '')}'")
    if v not in ("true", "false"):
        raise FastaError(
            str(path), line, rid, f"VALIDATION must be True or False, got '{attrs['VALIDATION']}'"
        )
    return TEST if s == "test" else VALIDATION if v == "true" else TRAIN


def check_sequence(path: Path, line: int, rid: str, seq: str) -> None:
    """Sequences are letters only (ambiguity codes allowed; the encoders map them to <unk>)."""
    if not seq.isalpha() or not seq.isascii():
        pos = next(i for i, c in enumerate(seq) if not (c.isascii() and c.isalpha()))
        raise FastaError(str(path), line, rid, f"invalid residue {seq[pos]!r} at position {pos + 1}")


def read_sequence_task(task: Task, split: str, path: Path) -> Dataset:
    """A per-sequence task file: TARGET, SET and VALIDATION in every header."""
    ids, seqs, parts, targets = [], [], [], []
    index = {c: i for i, c in enumerate(task.classes)}
    for line, header, body in read_fasta(path):
        rid, attrs = parse_header(path, line, header)
        check_sequence(path, line, rid, body)
        if "TARGET" not in attrs:
            raise FastaError(str(path), line, rid, "missing TARGET= annotation")
        raw = attrs["TARGET"]
        if task.kind == "regression":
            try:
                value = float(raw)
            except ValueError:
                raise FastaError(str(path), line, rid, f"TARGET '{raw}' is not a number") from None
            if not math.isfinite(value):
                raise FastaError(str(path), line, rid, f"TARGET '{raw}' is not a finite number")
            targets.append(value)
        elif raw in index:
            targets.append(index[raw])
        else:
            raise FastaError(
                str(path), line, rid, f"unknown class '{raw}' (expected one of {', '.join(index)})"
            )
        ids.append(rid)
        seqs.append(body)
        parts.append(part_of(path, line, rid, attrs))
    dtype = np.float32 if task.kind == "regression" else np.int64
    return Dataset(
        task, split, ids, seqs, np.array(parts, dtype=np.int8), targets=np.array(targets, dtype=dtype)
    )


def read_residue_task(
    task: Task, split: str, seq_path: Path, label_path: Path, mask_path: Path | None
) -> Dataset:
    """A per-residue task: label records joined on id with the sequences (and the mask, if any)."""
    seqs: dict[str, str] = {}
    for line, header, body in read_fasta(seq_path):
        rid, _ = parse_header(seq_path, line, header)
        check_sequence(seq_path, line, rid, body)
        if rid in seqs:
            raise FastaError(str(seq_path), line, rid, "duplicate id")
        seqs[rid] = body
    masks: dict[str, tuple[int, str]] = {}
    if mask_path is not None:
        masks = {parse_header(mask_path, ln, h)[0]: (ln, b) for ln, h, b in read_fasta(mask_path)}
    table = np.full(256, -1, dtype=np.int64)
    for i, c in enumerate(task.classes):
        table[ord(c)] = i
    ids, parts, labels, seen = [], [], [], set()
    for line, header, body in read_fasta(label_path):
        rid, attrs = parse_header(label_path, line, header)
        if rid in seen:
            raise FastaError(str(label_path), line, rid, "duplicate id")
        seen.add(rid)
        if rid not in seqs:
            raise FastaError(str(label_path), line, rid, f"no sequence with this id in {seq_path.name}")
        if len(body) != len(seqs[rid]):
            raise FastaError(
                str(label_path), line, rid, f"{len(body)} labels for a sequence of {len(seqs[rid])} residues"
            )
        lab = table[np.frombuffer(body.encode("latin-1", errors="replace"), dtype=np.uint8)]
        if (lab < 0).any():
            pos = int(np.flatnonzero(lab < 0)[0])
            raise FastaError(
                str(label_path),
                line,
                rid,
                f"invalid label {body[pos]!r} at position {pos + 1} (expected one of "
                f"{''.join(task.classes)})",
            )
        if mask_path is not None:
            lab[_mask(mask_path, rid, masks, len(body))] = IGNORE
        ids.append(rid)
        parts.append(part_of(label_path, line, rid, attrs))
        labels.append(lab)
    return Dataset(task, split, ids, [seqs[i] for i in ids], np.array(parts, dtype=np.int8), labels=labels)


def _mask(path: Path, rid: str, masks: dict[str, tuple[int, str]], n: int) -> np.ndarray:
    """Boolean array, True where the residue is NOT resolved."""
    if rid not in masks:
        raise FastaError(str(path), None, rid, "no mask record for this id")
    line, bits = masks[rid]
    if len(bits) != n:
        raise FastaError(
            str(path), line, rid, f"mask of {len(bits)} positions for a sequence of {n} residues"
        )
    if set(bits) - {"0", "1"}:
        raise FastaError(str(path), line, rid, "mask must contain only 0 and 1")
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("0")


# --- locating and downloading -------------------------------------------------------------------


def find_file(root: Path, folder: str, name: str) -> Path:
    """`<root>/<folder>/<name>.fasta` or `.fasta.gz`; FlipError listing what is there otherwise."""
    for suffix in (".fasta", ".fasta.gz"):
        path = root / folder / f"{name}{suffix}"
        if path.is_file():
            return path
    there = sorted(p.name for p in (root / folder).glob("*.fasta*")) if (root / folder).is_dir() else []
    listing = f" (found: {', '.join(there)})" if there else ""
    raise FlipError(f"no {name}.fasta[.gz] in {root / folder}{listing}")


def load_task(
    task: Task,
    split: str | None = None,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    base_url: str = FLIP_URL,
    progress: Progress | None = None,
) -> Dataset:
    """Parse a task's split from `data_dir`, or from the FLIP server via the cache."""
    if split is not None:
        split = split.removesuffix(".gz").removesuffix(".fasta")
        if not split or "/" in split or "\\" in split or split.startswith("."):
            raise FlipError(f"--split {split!r} is not a split name (e.g. {task.default_split})")
    split = split or task.default_split
    if data_dir is None and split not in task.splits:
        raise FlipError(f"unknown split '{split}' for {task.name} (choose from {', '.join(task.splits)})")

    def get(name: str) -> Path:
        if data_dir is not None:
            return find_file(data_dir, task.folder, name)
        return fetch(task.folder, name, cache_dir or default_cache_dir(), base_url, progress)

    if task.level == "sequence":
        return read_sequence_task(task, split, get(split))
    mask = get(task.mask) if task.mask else None
    return read_residue_task(task, split, get("sequences"), get(split), mask)
