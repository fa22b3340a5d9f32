"""FLIP benchmark data: the task table, FASTA parsing, splits and labels (downloads: flip_fetch).

Files follow the FLIP FASTA server layout, `<root>/<folder>/<file>.fasta` (or `.fasta.gz`):

- per-sequence tasks: `>id TARGET=<value> SET=<train|test> VALIDATION=<True|False>` + sequence;
- per-residue tasks: `sequences.fasta` (`>id` + sequence) joined on id with a label file
  (`>id SET=.. VALIDATION=..` + one label character per residue), plus an optional 0/1 mask file.

Validation = `SET=train VALIDATION=True`; train = the other `SET=train` records; test = `SET=test`.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protembed.cache import default_cache_dir
from protembed.errors import FastaError, ProtembedError
from protembed.flip_fetch import FLIP_URL, Progress, fetch
from protembed.records import Record, read_records

FLOAT32_MAX = float(np.finfo(np.float32).max)  # regression targets are trained in float32
# A TARGET as written in FLIP's files (nan and inf are read, then refused as not finite)
NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|inf(?:inity)?|nan)", re.ASCII | re.IGNORECASE)
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

    targets: sequence-level labels, float64 (regression) or int64 class indices.
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


def parse_header(rec: Record) -> dict[str, str]:
    """The `KEY=VALUE` annotations after the record id (keys upper-cased, each at most once)."""
    attrs: dict[str, str] = {}
    key = rec.id.partition("=")[0].upper()
    if key in ("TARGET", "SET", "VALIDATION"):  # `> SET=train ...`: the id is missing
        raise rec.error(f"header without an id: it starts with the annotation {rec.id!r}")
    for item in rec.header.split()[1:]:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise rec.error(f"malformed annotation '{item}' (expected KEY=VALUE)")
        if key.upper() in attrs:
            raise rec.error(f"{key.upper()}= given twice")
        attrs[key.upper()] = value
    return attrs


def part_of(rec: Record, attrs: dict[str, str]) -> int:
    """Train, validation or test from the SET and VALIDATION annotations."""
    if "SET" not in attrs:
        raise rec.error("missing SET= annotation")
    s = attrs["SET"].lower()
    if s not in ("train", "test"):
        raise rec.error(f"SET must be train or test, got '{attrs['SET']}'")
    if "VALIDATION" not in attrs:  # FLIP's files give it on every record, test ones too
        raise rec.error("missing VALIDATION= annotation")
    v = attrs["VALIDATION"].lower()
    if v not in ("true", "false"):
        raise rec.error(f"VALIDATION must be True or False, got '{attrs['VALIDATION']}'")
    return TEST if s == "test" else VALIDATION if v == "true" else TRAIN


def read_sequence_task(task: Task, split: str, path: Path) -> Dataset:
    """A per-sequence task file: TARGET, SET and VALIDATION in every header."""
    ids, seqs, parts, targets, seen = [], [], [], [], set()
    index = {c: i for i, c in enumerate(task.classes)}
    for rec in read_records(path):
        attrs = parse_header(rec)
        rec.check_residues()
        if rec.id in seen:
            raise rec.error("duplicate id")
        seen.add(rec.id)
        if "TARGET" not in attrs:
            raise rec.error("missing TARGET= annotation")
        raw = attrs["TARGET"]
        if task.kind == "regression":
            if not NUMBER.fullmatch(raw):  # float() would also take 1_5, non-ASCII digits, spaces
                raise rec.error(f"TARGET '{raw}' is not a number")
            value = float(raw)
            if not math.isfinite(value):
                raise rec.error(f"TARGET '{raw}' is not a finite number")
            if abs(value) > FLOAT32_MAX:
                raise rec.error(f"TARGET '{raw}' is out of range (at most {FLOAT32_MAX:.1e} in magnitude)")
            targets.append(value)
        elif raw in index:
            targets.append(index[raw])
        else:
            raise rec.error(f"unknown class '{raw}' (expected one of {', '.join(index)})")
        ids.append(rec.id)
        seqs.append(rec.body)
        parts.append(part_of(rec, attrs))
    dtype = np.float64 if task.kind == "regression" else np.int64  # values as read; trained in float32
    return Dataset(
        task, split, ids, seqs, np.array(parts, dtype=np.int8), targets=np.array(targets, dtype=dtype)
    )


def read_residue_task(
    task: Task, split: str, seq_path: Path, label_path: Path, mask_path: Path | None
) -> Dataset:
    """A per-residue task: label records joined on id with the sequences (and the mask, if any)."""
    seqs: dict[str, str] = {}
    for rec in read_records(seq_path):
        parse_header(rec)
        rec.check_residues()
        if rec.id in seqs:
            raise rec.error("duplicate id")
        seqs[rec.id] = rec.body
    masks: dict[str, Record] = {}
    for rec in read_records(mask_path) if mask_path is not None else ():
        if rec.id in masks:
            raise rec.error("duplicate id")
        masks[rec.id] = rec
    table = np.full(256, -1, dtype=np.int64)
    for i, c in enumerate(task.classes):
        table[ord(c)] = i
    ids, parts, labels, seen = [], [], [], set()
    for rec in read_records(label_path):
        attrs, rid, body = parse_header(rec), rec.id, rec.body
        part = part_of(rec, attrs)  # first: a file that is not a split fails on its missing SET=
        if rid in seen:
            raise rec.error("duplicate id")
        seen.add(rid)
        if rid not in seqs:
            raise rec.error(f"no sequence with this id in {seq_path.name}")
        if len(body) != len(seqs[rid]):
            raise rec.error(f"{len(body)} labels for a sequence of {len(seqs[rid])} residues")
        lab = table[np.frombuffer(body.encode("latin-1", errors="replace"), dtype=np.uint8)]
        if (lab < 0).any():
            pos = int(np.flatnonzero(lab < 0)[0])
            expected = "".join(task.classes)
            raise rec.error(
                f"invalid label {body[pos]!r} at position {pos + 1} (expected one of {expected})", pos
            )
        if mask_path is not None:
            if rid not in masks:
                raise FastaError(str(mask_path), None, rid, "no mask record for this id")
            lab[_unresolved(masks[rid], len(body))] = IGNORE
        ids.append(rid)
        parts.append(part)
        labels.append(lab)
    return Dataset(task, split, ids, [seqs[i] for i in ids], np.array(parts, dtype=np.int8), labels=labels)


def _unresolved(mask: Record, n: int) -> np.ndarray:
    """Boolean array, True where the residue is NOT resolved (mask 0)."""
    bits = mask.body
    if len(bits) != n:
        raise mask.error(f"mask of {len(bits)} positions for a sequence of {n} residues")
    if bad := bits.strip("01"):
        pos = bits.index(bad[0])
        raise mask.error(f"mask must contain only 0 and 1, found {bad[0]!r} at position {pos + 1}", pos)
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("0")


# --- locating and downloading -------------------------------------------------------------------


def find_file(root: Path, folder: str, name: str, task: Task | None = None) -> Path:
    """`<root>/<folder>/<name>.fasta` or `.fasta.gz`; FlipError listing what is there otherwise
    (with `task`, `name` is a split: only split files are listed, and the task's own splits)."""
    paths = [root / folder / f"{name}{suffix}" for suffix in (".fasta", ".fasta.gz")]
    present = []
    for path in paths:
        try:
            if path.is_file():
                present.append(path)
        except OSError as exc:  # a folder on the way that cannot be searched
            raise FlipError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(present) == 2:  # which one is meant is not ours to guess: they may differ
        raise FlipError(f"{root / folder}: holds both {name}.fasta and {name}.fasta.gz; keep one of them")
    if present:
        return present[0]
    for path in paths:
        if why := _not_usable(path, folder=False):  # there, but not a file that can be read
            raise FlipError(f"{path}: {why}")
    if not root.is_dir():
        raise FlipError(f"--data-dir {root}: {_not_usable(root, folder=True) or 'no such folder'}")
    if why := _not_usable(root / folder, folder=True):
        raise FlipError(f"{root / folder}: {why}")
    there = sorted(p.name for p in (root / folder).glob("*.fasta*") if p.is_file())
    if task is not None:  # a split: the sequences and mask files are not candidates
        there = [f for f in there if f.split(".", 1)[0] not in _not_splits(task)]
        found = f"split files there: {', '.join(there) or 'none'}; FLIP's splits: {', '.join(task.splits)}"
        raise FlipError(f"no {name}.fasta[.gz] in {root / folder} ({found})")
    listing = f" (found: {', '.join(there)})" if there else ""
    raise FlipError(f"no {name}.fasta[.gz] in {root / folder}{listing}")


def _not_splits(task: Task) -> dict[str, str]:
    """The files beside a per-residue task's splits, by name, and what they hold (`mask` is the
    resolved mask's other name in some copies of FLIP's secondary-structure folder)."""
    if task.level != "residue":
        return {}
    masks = dict.fromkeys((task.mask, "mask"), "resolved-residue mask") if task.mask else {}
    return {"sequences": "sequences", **masks}


def _not_usable(path: Path, folder: bool) -> str | None:
    """Why `path`, which is not a file (`folder`: a folder) as wanted, cannot be used; None if
    nothing is there (or it is what was wanted)."""
    if not os.path.lexists(path):
        return None
    try:
        mode = path.stat().st_mode
    except OSError as exc:  # a link to nowhere, a loop of links
        if exc.errno == errno.ENOENT:
            return f"is a link to {os.readlink(path)}, which does not exist"
        return f"cannot read: {exc.strerror or exc}"
    if folder:
        return None if stat.S_ISDIR(mode) else "not a folder"
    return "is a folder" if stat.S_ISDIR(mode) else None if stat.S_ISREG(mode) else "not a regular file"


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
        given, split = split, split.removesuffix(".gz").removesuffix(".fasta")
        if not split or "/" in split or "\\" in split or split.startswith("."):
            raise FlipError(f"--split {given!r} is not a split name (e.g. {task.default_split})")
    split = split or task.default_split
    if split in _not_splits(task):
        raise FlipError(
            f"--split {split}: {split}.fasta holds {task.name}'s {_not_splits(task)[split]}, not a split"
            f" (choose from {', '.join(task.splits)})"
        )
    if data_dir is None and split not in task.splits:
        raise FlipError(f"unknown split '{split}' for {task.name} (choose from {', '.join(task.splits)})")

    def get(name: str, is_split: bool = False) -> Path:
        if data_dir is not None:
            return find_file(data_dir, task.folder, name, task if is_split else None)
        return fetch(task.folder, name, cache_dir or default_cache_dir(), base_url, progress)

    if task.level == "sequence":
        return read_sequence_task(task, split, get(split, is_split=True))
    sequences, labels = get("sequences"), get(split, is_split=True)  # asked for before the mask
    mask = get(task.mask) if task.mask else None
    return read_residue_task(task, split, sequences, labels, mask)
