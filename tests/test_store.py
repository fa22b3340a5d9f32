"""HDF5 output: layout, resume, locking, crash safety (kill -9) and the reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from protembed import signals
from protembed.errors import OutputCompleteError, OutputExistsError, ResumeMismatchError, StoreError
from protembed.export import compressed_copy
from protembed.reader import open_embeddings
from protembed.store import EmbeddingWriter

ROOT = Path(__file__).resolve().parents[1]
N, K, D = 40, 2, 8
SKIPPED = {5: "x.fa:12: invalid residue '1' at position 3", 17: "x.fa:40: empty sequence"}
IDS = [f"sp|P{i:03d}" for i in range(N)]
IDS[7] = IDS[3]  # duplicate ids are fine: rows are positional
LENGTHS = np.where(np.isin(np.arange(N), list(SKIPPED)), 0, 1 + np.arange(N) * 7 % 13)


def attrs(**change: Any) -> dict[str, Any]:
    base = {
        "model": "esm2-tiny",
        "model_source": "tests/fixture",
        "model_revision": "abc123",
        "layers": [1, 3],
        "pooling": "mean,cls",
        "compute_dtype": "float32",
        "max_length": 1022,
        "long_policy": "truncate",
        "input_sha256": "0" * 64,
        "backend": "eager",
    }
    return {**base, **change}


def open_writer(
    path: Path,
    *,
    n_layers: int = K,
    per_residue: bool = True,
    overwrite: bool = False,
    compression: str | None = None,
    store_dtype: str = "float16",
    **kw: Any,
) -> EmbeddingWriter:
    skipped = np.isin(np.arange(N), list(SKIPPED))
    return EmbeddingWriter.open(
        path,
        attrs=kw.pop("attrs", attrs()),
        ids=IDS,
        descriptions=[f"{i} protéine {j}" for j, i in enumerate(IDS)],
        lengths=LENGTHS,
        truncated=np.arange(N) % 11 == 0,
        skipped=skipped,
        skip_reasons=SKIPPED,
        n_layers=n_layers,
        d_model=D,
        poolings=["mean", "cls"],
        per_residue=per_residue,
        store_dtype=store_dtype,
        compression=compression,
        overwrite=overwrite,
        **kw,
    )


def fake(rows: np.ndarray, n_layers: int = K) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Deterministic embeddings: every value encodes its row, layer and position."""
    rows = np.asarray(rows)
    base = rows[:, None, None] + 0.25 * np.arange(n_layers)[None, :, None] + np.zeros((1, 1, D))
    pooled = {"mean": base.astype(np.float32), "cls": (-base).astype(np.float32)}
    residues = [
        (base[j] + 0.001 * np.arange(LENGTHS[r])[:, None, None]).astype(np.float32)
        for j, r in enumerate(rows)
    ]
    return pooled, residues


def write_complete(path: Path) -> Path:
    """An uninterrupted run's file, to compare resumed ones against."""
    writer = open_writer(path)
    write_all(writer, writer.pending)
    writer.close(complete=True)
    return path


def write_all(writer: EmbeddingWriter, rows: np.ndarray, batch: int = 3, n_layers: int = K) -> None:
    for a in range(0, len(rows), batch):
        part = rows[a : a + batch]
        pooled, residues = fake(part, n_layers)
        writer.write(part, pooled, residues)


def assert_same_file(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
        assert set(x) == set(y)
        for name in x:
            assert np.array_equal(x[name][...], y[name][...], equal_nan=x[name].dtype.kind == "f"), name
        assert {k for k in x.attrs} == {k for k in y.attrs}
        for key in x.attrs:
            if key != "created":
                assert np.array_equal(x.attrs[key], y.attrs[key]), key


def test_roundtrip_layout_and_reader(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    writer = open_writer(path, flush_bytes=1 << 10)  # many small flushes
    assert writer.pending.tolist() == [r for r in range(N) if r not in SKIPPED]
    rows = np.random.default_rng(1).permutation(writer.pending)
    write_all(writer, rows)
    writer.close(complete=True)
    assert not (tmp_path / "out.h5.lock").exists()

    with h5py.File(path, "r") as h5:
        assert h5.attrs["format"] == "protembed-embeddings" and h5.attrs["format_version"] == 1
        assert h5.attrs["complete"] and h5.attrs["per_residue"] and h5.attrs["n_sequences"] == N
        assert list(h5.attrs["layers"]) == [1, 3] and h5.attrs["store_dtype"] == "float16"
        assert h5["mean"].shape == (N, K, D) and h5["mean"].dtype == np.float16
        assert h5["lengths"].dtype == np.int32 and h5["offsets"].dtype == np.int64
        assert h5["offsets"][-1] == h5["residues"].shape[0] == LENGTHS.sum()
        assert h5["written"][...].tolist() == [r not in SKIPPED for r in range(N)]
        assert h5["skip_reasons"].asstr()[5] == SKIPPED[5] and h5["skip_reasons"].asstr()[0] == ""
        assert h5["ids"].asstr()[...].tolist() == IDS

    with open_embeddings(path) as emb:
        assert len(emb) == N and emb.ids == IDS and emb.descriptions[1] == f"{IDS[1]} protéine 1"
        assert emb.index(IDS[3]) == 3 and emb.layers == [1, 3]
        pooled, residues = fake(np.arange(N))
        mean = emb.pooled("mean")
        keep = ~np.isin(np.arange(N), list(SKIPPED))
        assert np.allclose(mean[keep], pooled["mean"][keep], atol=1e-2) and np.isnan(mean[5]).all()
        assert np.allclose(emb.pooled("cls", layer=3)[keep], pooled["cls"][keep, 1], atol=1e-2)
        assert np.allclose(emb.residues(IDS[9]), residues[9], atol=1e-2)
        assert np.allclose(emb.residues(9, layer=1), residues[9][:, 0], atol=1e-2)
        assert emb.residues(5).shape == (0, K, D)
        with pytest.raises(StoreError, match=r"layer 2 is not stored \(stored layers: \[1, 3\]\)"):
            emb.pooled("mean", layer=2)
        with pytest.raises(StoreError, match=r"layer 'final' is not a layer number \(stored layers"):
            emb.residues(9, layer="final")  # type: ignore[arg-type]
        with pytest.raises(StoreError, match="no record with id 'nope'"):
            emb.index("nope")
        with pytest.raises(StoreError, match="no 'max' embeddings"):
            emb.pooled("max")
        block, offsets = emb.residue_block(8, 10, layer=3)
        assert np.array_equal(block[offsets[1] : offsets[2]], emb.residues(9, layer=3))
        for start, stop in ((5, 2), (0, N + 1), (-1, 2)):
            with pytest.raises(StoreError, match=rf"rows {start}\.\.{stop} are not a range within 0\.\.{N}"):
                emb.residue_block(start, stop)
            with pytest.raises(StoreError, match=rf"rows {start}\.\.{stop} are not a range within 0\.\.{N}"):
                emb.pooled_block("mean", start, stop)
        for layer in (None, 3):
            whole = emb.pooled("mean", layer)
            np.testing.assert_array_equal(
                emb.pooled_block("mean", 3, 7, layer), whole[3:7]
            )  # NaN where skipped
        assert np.array_equal(emb.residues(-1), emb.residues(N - 1))  # from the end, as a list counts
        assert np.array_equal(emb.residues(np.int64(9)), emb.residues(9))
        for row in (N, -N - 1):
            with pytest.raises(StoreError, match=rf"row {row} out of range"):
                emb.residues(row)
        with pytest.raises(TypeError):
            emb.residues(8.7)  # type: ignore[arg-type]
    for read in (lambda: emb.pooled("mean"), lambda: emb.residues(9), lambda: emb.residue_block(0, 2)):
        with pytest.raises(StoreError, match="out.h5: the file is closed"):
            read()  # after the `with` block


def test_one_layer_float32_without_residues(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    writer = open_writer(path, n_layers=1, per_residue=False, store_dtype="float32", attrs=attrs(layers=[3]))
    write_all(writer, writer.pending, n_layers=1)
    writer.close(complete=True)
    with open_embeddings(path) as emb:
        assert emb.pooled("mean").shape == (N, D) and emb.pooled("mean").dtype == np.float32
        assert np.array_equal(emb.pooled("mean", layer=3)[0], fake(np.array([0]), 1)[0]["mean"][0, 0])
        with pytest.raises(StoreError, match="no per-residue embeddings"):
            emb.residues(0)
        with pytest.raises(StoreError, match="no per-residue embeddings"):
            emb.residue_block(0, 2)
        assert "residues" not in emb.h5 and "offsets" not in emb.h5


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compressed_output_equals_plain(tmp_path: Path, compression: str) -> None:
    for name, comp in (("plain.h5", None), ("packed.h5", compression)):
        writer = open_writer(tmp_path / name, compression=comp)
        write_all(writer, writer.pending[::-1])
        writer.close(complete=True)
    assert_same_file(tmp_path / "plain.h5", tmp_path / "packed.h5")
    with h5py.File(tmp_path / "packed.h5", "r") as h5:
        assert h5["mean"].compression == compression and h5["mean"].chunks == (N, 1, D)
        assert h5["residues"].chunks[1:] == (1, D)
    assert not (tmp_path / "packed.h5.partial").exists()


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    whole = write_complete(tmp_path / "whole.h5")

    path = tmp_path / "out.h5"
    writer = open_writer(path)
    first = writer.pending[1::2]
    write_all(writer, first)
    writer.close(complete=False)
    with pytest.raises(StoreError, match=r"unfinished output \(19 of 38 records written\)"):
        open_embeddings(path)
    with open_embeddings(path, allow_incomplete=True) as emb:
        assert not emb.attrs["complete"] and np.flatnonzero(emb.written).tolist() == sorted(first.tolist())
        mean = emb.pooled("mean")
        assert np.isnan(mean[~emb.written]).all() and not np.isnan(mean[emb.written]).any()
        unwritten = int(np.flatnonzero(~emb.written & ~emb.skipped)[0])
        with pytest.raises(StoreError, match=rf"row {unwritten} is not written yet"):
            emb.residues(unwritten)
        block, offs = emb.residue_block(0, len(emb))  # unwritten rows are NaN here too, not zeros
        for r in range(len(emb)):
            rows = block[offs[r] : offs[r + 1]]
            done = emb.written[r] or emb.skipped[r]
            assert not np.isnan(rows).any() if done else np.isnan(rows).all()

    writer = open_writer(path)
    assert writer.pending.tolist() == sorted(set(range(N)) - set(SKIPPED) - set(first.tolist()))
    write_all(writer, writer.pending)
    writer.close(complete=True)
    assert_same_file(whole, path)


def test_resume_with_other_settings_names_them(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    open_writer(path).close(complete=False)
    with pytest.raises(ResumeMismatchError) as err:
        open_writer(path, attrs=attrs(model_revision="def456", layers=[1, 2], max_length=None))
    message = str(err.value)
    assert "\n" not in message and "--overwrite" in message
    assert "model_revision 'abc123' (file) vs 'def456' (now)" in message
    assert (
        "layers [1, 3] (file) vs [1, 2] (now)" in message
        and "max_length 1022 (file) vs (unset) (now)" in message
    )
    open_writer(path, attrs=attrs(model="tests/fixture/")).close(complete=False)  # same model, other name
    with pytest.raises(ResumeMismatchError, match="dataset residues"):
        open_writer(path, per_residue=False, attrs=attrs(per_residue=True))
    with pytest.raises(ResumeMismatchError, match="store_dtype 'float16' \\(file\\) vs 'float32'"):
        open_writer(path, store_dtype="float32", attrs=attrs(store_dtype="float32"))
    open_writer(path, overwrite=True, attrs=attrs(model="esm2-other")).close(complete=False)
    open_writer(path, attrs=attrs(model="esm2-other")).close(complete=False)


def test_complete_or_foreign_output_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    writer = open_writer(path)
    write_all(writer, writer.pending)
    writer.close(complete=True)
    with pytest.raises(
        OutputExistsError, match=r"out.h5: a complete output already exists; pass --overwrite"
    ):
        open_writer(path)
    writer = open_writer(path, overwrite=True)
    assert len(writer.pending) == N - len(SKIPPED)
    writer.close(complete=False)

    other = tmp_path / "other.h5"
    other.write_text("not hdf5")
    with pytest.raises(OutputExistsError, match="not a readable HDF5 file; pass --overwrite"):
        open_writer(other)
    with h5py.File(other, "w") as h5:
        h5["x"] = 1
    with pytest.raises(OutputExistsError, match="not a protembed embeddings file"):
        open_writer(other)
    open_writer(other, overwrite=True).close(complete=False)


def test_second_writer_is_refused_and_stale_lock_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "out.h5"
    writer = open_writer(path)
    with pytest.raises(OutputExistsError, match=rf"another protembed run \(pid {os.getpid()}\) is writing"):
        open_writer(path)
    writer.close(complete=False)
    (tmp_path / "out.h5.lock").write_text("12345\n")  # left by a killed run: not locked
    open_writer(path).close(complete=False)
    assert not (tmp_path / "out.h5.lock").exists()


def test_unwritable_output(tmp_path: Path) -> None:
    with pytest.raises(
        StoreError, match=r"^.*missing/out.h5: cannot write output: No such file or directory$"
    ):
        open_writer(tmp_path / "missing" / "out.h5")
    with pytest.raises(StoreError, match="cannot write output: is a folder"):
        open_writer(tmp_path)


def test_write_error_surfaces_and_rows_stay_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.h5"
    writer = open_writer(path)
    rows = writer.pending[:4]
    pooled, residues = fake(rows)
    writer.write(rows, pooled, residues)
    pooled["mean"][:] = 1e4  # the writer holds its own copy

    def full_disk(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", full_disk)
        with pytest.raises(StoreError, match=r"out.h5: cannot write output: No space left on device$"):
            writer.flush()
        writer.close(complete=False)
    writer = open_writer(path)
    assert writer.pending[:4].tolist() == rows.tolist()
    writer.write(rows, *fake(rows))
    writer.close(complete=False)
    with open_embeddings(path, allow_incomplete=True) as emb:
        assert np.allclose(emb.pooled("mean")[rows], fake(rows)[0]["mean"], atol=1e-2)


CHILD = """
import sys
import numpy as np
from pathlib import Path
from tests.test_store import open_writer, write_all
writer = open_writer(Path(sys.argv[1]), flush_seconds=0.0)
rows = np.random.default_rng(2).permutation(writer.pending)
for a in range(0, len(rows), 2):
    write_all(writer, rows[a : a + 2])
    print(a, flush=True)
    if a >= 24:
        break
while True:  # never closes: killed from outside
    write_all(writer, rows[:1])
"""


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    whole = write_complete(tmp_path / "whole.h5")

    path = tmp_path / "out.h5"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    for line in child.stdout:
        if int(line) >= 10:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "out.h5.lock").exists()  # stale: the killed run never released it

    with open_embeddings(path, allow_incomplete=True) as emb:  # still a readable file
        done = int(emb.h5["written"][...].sum())
    assert 10 <= done < N - len(SKIPPED)
    writer = open_writer(path)
    assert len(writer.pending) == N - len(SKIPPED) - done
    write_all(writer, writer.pending)
    writer.close(complete=True)
    assert_same_file(whole, path)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_complete_output_with_complete_ok(tmp_path: Path, compression: str | None) -> None:
    """A finished shard is accepted as done only when made with the same settings."""
    path = tmp_path / "out.h5"
    writer = open_writer(path, compression=compression)
    write_all(writer, writer.pending)
    writer.close(complete=True)
    with pytest.raises(OutputExistsError, match="a complete output already exists"):
        open_writer(path, compression=compression)
    with pytest.raises(OutputCompleteError, match="complete, made with these settings"):
        open_writer(path, compression=compression, complete_ok=True)
    with pytest.raises(ResumeMismatchError, match=r"a complete output with other settings exists: layers"):
        open_writer(path, compression=compression, complete_ok=True, attrs=attrs(layers=[1, 2]))
    assert not (tmp_path / "out.h5.lock").exists()


def test_a_dropped_stop_request_is_raised_at_the_next_step(tmp_path: Path) -> None:
    """A SIGTERM whose exception Python dropped (raised inside an h5py finaliser) still stops the
    next long loop, here the compressed rewrite of a finished output."""
    source = write_complete(tmp_path / "done.h5")
    signals._pending[:] = [signals.Terminated]  # what the handler leaves when its raise is dropped
    try:
        with pytest.raises(signals.Terminated):
            compressed_copy(source, tmp_path / "packed.h5", "gzip")
        signals.check()  # raised once, then gone
    finally:
        signals.clear()
