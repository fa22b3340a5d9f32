"""A read-only, shared cache (filled by someone else) is only read: FLIP files and features found there
serve `finetune` and `predict`; what it lacks is a one-line error naming it; nothing in it changes.

Tests run as root here, which writes anywhere, so "read-only" is what `protembed.cache.writable` says
for paths in the shared cache; every test also checks that no file in it was created or changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from protembed.embed_setup import locate_model
from protembed.errors import HubError
from protembed.feature_cache import model_features, model_folder
from protembed.flip_fetch import fetch
from tests.flip_server import FlipServer
from tests.test_finetune import ESM2, run_cli
from tests.test_flip import TINY, TINY_SPLITS

WRITERS = ("protembed.cache.writable",)


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
    flip_server: FlipServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    monkeypatch.setenv("PROTEMBED_FLIP_URL", flip_server.url)
    model = ["--model", ESM2, "--device", "cpu", "--head", "ridge"]
    onehot = ["--features", "onehot", "--head", "ridge", "--split", "two_vs_rest"]
    filled = finetune(shared, *model, "--data-dir", TINY)  # the owner fills the cache
    assert filled.exit_code == 0, filled.output
    r = run_cli("finetune", "flip-gb1", *onehot, "--cache-dir", shared, "-q")  # and downloads a file
    assert r.exit_code == 0, r.output
    before, requests = snapshot(shared), len(flip_server.requests)
    read_only(monkeypatch, shared)

    again = finetune(shared, *model, "--data-dir", TINY)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["metrics"] == json.loads(filled.stdout)["metrics"]
    r = run_cli("finetune", "flip-gb1", *onehot, "--cache-dir", shared, "-q")
    assert r.exit_code == 0 and len(flip_server.requests) == requests, r.output

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


@pytest.mark.parametrize("left", ["unreadable", "unfinished"])
def test_another_users_part_is_left_alone(
    left: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """In a cache folder shared for writing, a part this user cannot read (a colleague's, made with
    umask 077), or an unfinished one it cannot resume, is not damage: it stays, and the sequences go
    into a part of this user's own."""
    ref = locate_model(str(ESM2))
    seqs = ["MKTAYIAKQR", "MSEQ"]
    good = model_features(seqs, ref, 3, False, tmp_path)
    (part,) = (model_folder(tmp_path, ref, 3, "float32") / "pooled").glob("part-*.h5")
    if left == "unfinished":
        with h5py.File(part, "r+") as h5:
            h5.attrs["complete"] = False
    before = snapshot(part.parent)
    real_access = os.access
    denied = os.R_OK if left == "unreadable" else os.W_OK

    def access(path: Any, mode: int, **kw: Any) -> bool:
        return not (Path(path) == part and mode & denied) and real_access(path, mode, **kw)

    monkeypatch.setattr("protembed.feature_cache.os.access", access)
    capfd.readouterr()
    again = model_features(seqs, ref, 3, False, tmp_path)
    assert again.pooled is not None and good.pooled is not None
    np.testing.assert_array_equal(again.pooled, good.pooled)
    assert (left == "unreadable") == (f"ignoring {part.name} (permission denied)" in capfd.readouterr().err)
    now = snapshot(part.parent)
    assert now[part.name] == before[part.name]  # untouched
    assert sorted(set(now) - set(before)) == [f"{part.stem}-u{os.geteuid()}.h5"]


def test_unreadable_flip_file_is_named_not_replaced(
    flip_server: FlipServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached FLIP file this user cannot read is someone else's: an error naming it, not damage."""
    path = fetch("gb1", "two_vs_rest", tmp_path, flip_server.url)
    good, requests = path.read_bytes(), len(flip_server.requests)

    def denied(p: Path) -> str:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr("protembed.flip_fetch.file_sha256", denied)
    for writable in (True, False):  # a shared cache open for writing, and a read-only one
        monkeypatch.setattr("protembed.cache.writable", lambda _, w=writable: w)
        unreadable = r"two_vs_rest.fasta: cannot read the cached file: Permission denied$"
        with pytest.raises(HubError, match=unreadable):
            fetch("gb1", "two_vs_rest", tmp_path, flip_server.url)
    assert path.read_bytes() == good and len(flip_server.requests) == requests


def test_overwrite_of_another_users_head_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saved head in a shared folder whose files a colleague owns: refused before training, with
    the colleague's head left whole (not half replaced)."""
    out = tmp_path / "head"
    base = ["--features", "onehot", "--head", "ridge", "--data-dir", TINY, "-o", out]
    assert finetune(tmp_path / "cache", *base).exit_code == 0
    weights = out / "head.safetensors"
    os.chown(weights, 65534, 65534)
    before = snapshot(out)
    real_access = os.access
    monkeypatch.setattr(
        "protembed.saved_head.os.access",
        lambda p, mode, **kw: Path(p) != weights and real_access(p, mode, **kw),
    )
    r = finetune(tmp_path / "cache", *base, "--overwrite")
    assert r.exit_code == 1, r.output
    assert f"{weights}: cannot write output: permission denied (another user's file)" in r.output
    assert snapshot(out) == before
