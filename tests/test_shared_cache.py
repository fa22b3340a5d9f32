"""A read-only, shared cache (filled by someone else) is only read: FLIP files and features found there
serve `finetune` and `predict`; what it lacks is a one-line error naming it; nothing in it changes.

Tests run as root here, which writes anywhere, so "read-only" is what `protembed.cache.writable` says
for paths in the shared cache; every test also checks that no file in it was created or changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.test_finetune import ESM2, run_cli
from tests.test_flip import TINY, TINY_SPLITS, _Server

WRITERS = ("protembed.cache.writable",)


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: (size, modification time)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Folders under `root` count as not writable from now on."""

    def writable(path: Path) -> bool:
        return not Path(path).resolve().is_relative_to(root.resolve())

    for name in WRITERS:
        monkeypatch.setattr(name, writable)


def finetune(cache: Path, *extra: object) -> Any:
    split = ["--split", TINY_SPLITS["flip-gb1"]]
    return run_cli("finetune", "flip-gb1", *split, "--cache-dir", cache, "--json", "-q", *extra)


def test_finetune_reads_a_read_only_cache(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    monkeypatch.setenv("PROTEMBED_FLIP_URL", server.url)
    model = ["--model", ESM2, "--device", "cpu", "--head", "ridge"]
    onehot = ["--features", "onehot", "--head", "ridge", "--split", "two_vs_rest"]
    filled = finetune(shared, *model, "--data-dir", TINY)  # the owner fills the cache
    assert filled.exit_code == 0, filled.output
    r = run_cli("finetune", "flip-gb1", *onehot, "--cache-dir", shared, "-q")  # and downloads a file
    assert r.exit_code == 0, r.output
    before, requests = snapshot(shared), len(server.requests)
    read_only(monkeypatch, shared)

    again = finetune(shared, *model, "--data-dir", TINY)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["metrics"] == json.loads(filled.stdout)["metrics"]
    r = run_cli("finetune", "flip-gb1", *onehot, "--cache-dir", shared, "-q")
    assert r.exit_code == 0 and len(server.requests) == requests, r.output

    r = finetune(shared, *model, "--data-dir", TINY, "--layer", "1")  # never computed
    assert r.exit_code == 1, r.output
    assert "layer1/pooled: the feature cache is read-only and lacks 96 of" in r.output  # 64+16+16 records
    other = ["--features", "onehot", "--split", "one_vs_rest"]
    r = run_cli("finetune", "flip-gb1", *other, "--cache-dir", shared)
    missing = "one_vs_rest.fasta: not in the read-only cache; pass a --cache-dir you can write to"
    assert r.exit_code == 1 and missing in r.output.replace("\n", ""), r.output  # not downloaded
    assert snapshot(shared) == before


def test_predict_reads_a_read_only_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared, head = tmp_path / "shared", tmp_path / "head"
    r = finetune(shared, "--model", ESM2, "--device", "cpu", "--data-dir", TINY, "--epochs", "1", "-o", head)
    assert r.exit_code == 0, r.output
    known, new = tmp_path / "known.fasta", tmp_path / "new.fasta"
    known.write_text(">a\nMKTAYIAKQR\n")
    new.write_text(">a\nMKTAYIAKQR\n>b\nGGGHHHKV\n")
    first = run_cli("predict", head, known, "--cache-dir", shared, "--device", "cpu", "-q")
    assert first.exit_code == 0, first.output
    before = snapshot(shared)
    read_only(monkeypatch, shared)

    r = run_cli("predict", head, known, "--cache-dir", shared, "--device", "cpu", "-q")
    assert r.exit_code == 0 and r.stdout == first.stdout, r.output
    r = run_cli("predict", head, new, "--cache-dir", shared, "--device", "cpu", "-q")
    assert r.exit_code == 1, r.output
    assert "the feature cache is read-only and lacks 1 of these sequences" in r.output
    assert "pass a --cache-dir you can write to" in r.output
    r = run_cli("predict", head, new, "--cache-dir", shared, "--device", "cpu", "--no-cache", "-q")
    assert r.exit_code == 1 and f"{shared}: cannot write to cache folder" in r.output, r.output
    assert snapshot(shared) == before


def test_damaged_part_in_a_read_only_cache_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage is named, not repaired: a part that is no HDF5 file is left out (its sequences are then
    missing); one with bad data is an error."""
    shared = tmp_path / "shared"
    model = ["--model", ESM2, "--device", "cpu", "--head", "ridge", "--data-dir", TINY]
    assert finetune(shared, *model).exit_code == 0
    (part,) = shared.glob("features/*/layer*/pooled/part-*.h5")
    good = part.read_bytes()
    read_only(monkeypatch, shared)
    with h5py.File(part, "r+") as h5:  # a readable file whose data is no longer numbers
        h5["mean"][1] = np.nan
    before = snapshot(shared)
    r = finetune(shared, *model)
    assert r.exit_code == 1, r.output
    expected = f"{part}: damaged (values that are not finite numbers), in a read-only feature cache"
    assert expected in r.output.replace("\n", ""), r.output
    assert snapshot(shared) == before
    part.write_bytes(good[:4096])  # cut short
    before = snapshot(shared)
    r = finetune(shared, *model)
    assert r.exit_code == 1, r.output
    assert f"feature cache: ignoring {part.name} (not a readable HDF5 file" in r.output
    assert "the feature cache is read-only and lacks 96 of these sequences" in r.output
    assert snapshot(shared) == before
