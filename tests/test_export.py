"""`protembed export --layout per-protein`: one dataset per record, ids escaped and made unique."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from protembed import export, progress_log
from protembed.cli import app
from protembed.errors import OutputExistsError, StoreError
from protembed.export import compressed_copy, dataset_names, escape_id, export_per_protein
from protembed.store import EmbeddingWriter
from tests.helpers import damage_chunk

IDS = ["sp|P1|A", "tr/Q2", "50%/x", "sp|P1|A", "skipped", "sp|P1|A#2", "."]
LENGTHS = np.array([3, 4, 2, 3, 0, 5, 1])
D = 4


def make_file(path: Path, layers: list[int], complete: bool = True, depth: int | None = None) -> None:
    n, k = len(IDS), len(layers)
    skipped = np.array([i == 4 for i in range(n)])
    depth_attr = {} if depth is None else {"model_layers": depth}
    writer = EmbeddingWriter.open(
        path,
        attrs={"model": "tiny", "layers": layers, "pooling": ["mean", "cls"], **depth_attr},
        ids=IDS,
        descriptions=IDS,
        lengths=LENGTHS,
        truncated=np.zeros(n, dtype=bool),
        skipped=skipped,
        skip_reasons={4: "x.fa:9: empty sequence"},
        n_layers=k,
        d_model=D,
        poolings=["mean", "cls"],
        per_residue=True,
        store_dtype="float32",
        compression=None,
        overwrite=True,
    )
    rows = writer.pending if complete else writer.pending[:2]
    pooled = rows[:, None, None] + np.arange(k)[None, :, None] / 10 + np.zeros((1, 1, D), np.float32)
    residues = [pooled[j] + np.arange(LENGTHS[r])[:, None, None] / 100 for j, r in enumerate(rows)]
    writer.write(rows, {"mean": pooled, "cls": -pooled}, residues)
    writer.close(complete=complete)


def test_escape_and_unique_names() -> None:
    assert escape_id("a/b%c") == "a%2Fb%25c" and escape_id(".") == "%2E" and escape_id("..") == ".."
    assert dataset_names(["x", "x", "x#2", "x", "a/b"]) == ["x", "x#2", "x#2#2", "x#3", "a%2Fb"]


def test_unique_names_take_the_first_free_suffix() -> None:
    """Repeats get the first suffix not taken, literal 'x#3' ids included, as a plain search would
    give (the names keep a counter per id, so 10^6 repeats of one id stay linear)."""

    def first_free(ids: list[str]) -> list[str]:
        names: list[str] = []
        for base in map(escape_id, ids):
            name, k = base, 1
            while name in names:
                k += 1
                name = f"{base}#{k}"
            names.append(name)
        return names

    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.choice(["x", "x#2", "x#3", "x#2#2", "y", "y#2"], size=12).tolist()
        names = dataset_names(ids)
        assert len(set(names)) == len(ids) and names == first_free(ids), ids
    assert dataset_names(["seq"] * 20_000)[-1] == "seq#20000"


@pytest.mark.parametrize("block_bytes", [64 << 20, 40])  # the whole file, or 2 rows, in one read
def test_export_pooled_one_layer(tmp_path: Path, block_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "_BLOCK_BYTES", block_bytes)
    make_file(tmp_path / "in.h5", layers=[6])
    summary = export_per_protein(tmp_path / "in.h5", tmp_path / "out.h5")
    assert (summary.n_written, summary.n_skipped) == (6, 1)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert sorted(h5) == sorted(["sp|P1|A", "tr%2FQ2", "50%25%2Fx", "sp|P1|A#2", "sp|P1|A#2#2", "%2E"])
        assert h5["tr%2FQ2"].shape == (D,) and np.allclose(h5["tr%2FQ2"][...], 1.0)
        assert np.allclose(h5["sp|P1|A#2"][...], 3.0) and np.allclose(h5["sp|P1|A#2#2"][...], 5.0)
        assert h5["50%25%2Fx"].attrs["original_id"] == "50%/x"
        assert h5.attrs["layout"] == "per-protein" and h5.attrs["what"] == "mean" and h5.attrs["layer"] == 6
        assert h5.attrs["model"] == "tiny" and h5.attrs["n_sequences"] == 6
        # The source's layout attributes do not describe the export and are left out.
        assert not {"layers", "pooling", "per_residue", "complete"} & set(h5.attrs)
    # HDF5 1.8 format (superblock version 2; the default writes 0): its groups index their links,
    # where a symbol-table group stalls past ~900,000 datasets (a million-record export never ended)
    assert (tmp_path / "out.h5").read_bytes()[8] == 2


def test_export_residues_of_one_layer(tmp_path: Path) -> None:
    make_file(tmp_path / "in.h5", layers=[2, 5])
    with pytest.raises(StoreError, match=r"holds layers \[2, 5\]; pick one with --layer"):
        export_per_protein(tmp_path / "in.h5", tmp_path / "out.h5", what="residues")
    export_per_protein(tmp_path / "in.h5", tmp_path / "out.h5", what="residues", layer=5)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["tr%2FQ2"].shape == (4, D) and "skipped" not in h5
        expected = 1 + 0.1 + np.arange(4)[:, None] / 100 + np.zeros((1, D))
        assert np.allclose(h5["tr%2FQ2"][...], expected)
        assert h5["%2E"].shape == (1, D)
    with pytest.raises(OutputExistsError, match=": exists; pass --overwrite"):
        export_per_protein(tmp_path / "in.h5", tmp_path / "out.h5", what="cls", layer=2)
    export_per_protein(tmp_path / "in.h5", tmp_path / "out.h5", what="cls", layer=2, overwrite=True)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert np.allclose(h5["tr%2FQ2"][...], -1.0)


def test_negative_layers_count_from_the_end_when_the_depth_is_recorded(tmp_path: Path) -> None:
    make_file(tmp_path / "old.h5", layers=[2, 5])  # no model_layers attribute
    with pytest.raises(StoreError, match=r"layer -1 is ambiguous; pick one of \[2, 5\]"):
        export_per_protein(tmp_path / "old.h5", tmp_path / "out.h5", layer=-1)
    make_file(tmp_path / "in.h5", layers=[2, 5], depth=5)
    export_per_protein(tmp_path / "in.h5", tmp_path / "last.h5", layer=-1)
    export_per_protein(tmp_path / "in.h5", tmp_path / "five.h5", layer=5)
    with h5py.File(tmp_path / "last.h5", "r") as a, h5py.File(tmp_path / "five.h5", "r") as b:
        assert a.attrs["layer"] == 5 and np.array_equal(a["tr%2FQ2"][...], b["tr%2FQ2"][...])
    with pytest.raises(StoreError, match=r"layer -2 \(= 4\) is not stored \(stored layers: \[2, 5\]\)"):
        export_per_protein(tmp_path / "in.h5", tmp_path / "x.h5", layer=-2)
    counts_back = (
        r"layer -7 out of range: a model of 5 blocks counts back from -1 \(its last block\) to -6 \("
    )
    with pytest.raises(StoreError, match=counts_back):
        export_per_protein(tmp_path / "in.h5", tmp_path / "x.h5", layer=-7)


def test_export_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    make_file(tmp_path / "in.h5", layers=[6])
    args = ["export", str(tmp_path / "in.h5"), "--layout", "per-protein", "-o", str(tmp_path / "out.h5")]
    monkeypatch.setattr(progress_log, "LOG_SECONDS", 0.0)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "out.h5") in result.stdout
    lines = result.stderr.splitlines()  # not a terminal: progress as plain lines
    assert lines[0] == "exporting 6 records" and lines[-2].startswith("6/6 records (100.0%), "), lines
    assert lines[-2].endswith(" records/s, 0 s left")
    assert lines[-1] == "exported 6 records (1 skipped records left out)"
    quiet = runner.invoke(app, [*args, "--overwrite", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "out.h5: exists; pass --overwrite to replace it" in result.stderr
    result = runner.invoke(app, [*args, "--what", "residues", "--layer", "6", "--overwrite"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args, "--layer", "3", "--overwrite"])
    assert result.exit_code == 1 and "layer 3 is not stored (stored layers: [6])" in result.stderr

    make_file(tmp_path / "part.h5", layers=[6], complete=False)
    result = runner.invoke(app, ["export", str(tmp_path / "part.h5"), "-o", str(tmp_path / "p.h5")])
    assert result.exit_code == 1 and "unfinished output (2 of 6 records written)" in result.stderr
    assert not (tmp_path / "p.h5").exists() and not (tmp_path / "p.h5.partial").exists()


@pytest.mark.parametrize("what, rows", [("mean", "rows 2..3"), ("residues", "rows 0..1")])
def test_a_damaged_source_is_named_with_its_rows_and_the_old_output_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, rows: str
) -> None:
    """A read error in the source names the source and the rows the damaged chunk holds, not the
    output ("cannot write") or every row of the block read."""
    plain, source, out = tmp_path / "plain.h5", tmp_path / "gz.h5", tmp_path / "out.h5"
    make_file(plain, [2])
    monkeypatch.setattr(export, "CHUNK_BYTES", 2 * D * 4)  # chunks of 2 rows / 2 residues
    compressed_copy(plain, source, "gzip")
    out.write_bytes(b"an older export")
    damage_chunk(source, what, 1)  # mean: rows 2-3; residues 2-3: in rows 0 (0..2) and 1 (3..6)
    why = rf"^{source}: damaged HDF5 file \(.*\); {rows} cannot be read$"
    with pytest.raises(StoreError, match=why):
        export_per_protein(source, out, what=what, overwrite=True)
    assert out.read_bytes() == b"an older export" and not list(tmp_path.glob("*.partial"))
