"""HDF5 outputs (embed, export, merge) and their inputs where users get paths wrong: links, pipes
and folders in the output's place, shards that are damaged or made with other settings, a disk
too small for an export, an unreadable Hub cache entry."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import pytest
from typer.testing import CliRunner

from protembed.cache import check_file_output
from protembed.cli import app
from protembed.errors import HubError, OutputCompleteError, OutputExistsError, StoreError
from protembed.hub_cache import cached_snapshot, repo_dir
from protembed.merge import find_shards, shard_worlds, write_virtual
from protembed.reader import open_embeddings
from tests.helpers import fixture_dir, one_line_error

ESM = str(fixture_dir("esm2_t3_h64") / "checkpoint")
runner = CliRunner()


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def embedded(tmp_path: Path) -> Path:
    fasta = tmp_path / "s.fa"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nMSEQWERTY\n")
    out = tmp_path / "x.h5"
    assert run("embed", fasta, "-o", out, "--model", ESM, "-q").exit_code == 0
    return out


def make_shards(folder: Path, first: Path, second: Path) -> Path:
    """Two files dressed as the shards of a torchrun job writing folder/j.h5."""
    folder.mkdir(exist_ok=True)
    for rank, source in enumerate((first, second)):
        path = folder / f"j.shard-00{rank}-of-002.h5"
        shutil.copy(source, path)
        with h5py.File(path, "r+") as f:
            f.attrs.update(shard_start=2 * rank, shard_stop=2 * rank + 2, shard_rank=rank, shard_world_size=2)
    return folder / "j.h5"


def test_outputs_never_replace_a_link_or_a_pipe(embedded: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.h5"
    target.write_text("kept")
    link, pipe = tmp_path / "link.h5", tmp_path / "pipe.h5"
    link.symlink_to(target)
    os.mkfifo(pipe)
    output = make_shards(tmp_path / "job", embedded, embedded)
    for out, message in [
        (link, f"it is a link to {target}; name the file itself"),
        (pipe, "not a regular file"),
    ]:
        for args in (
            ["embed", tmp_path / "s.fa", "-o", out, "--model", ESM, "--overwrite", "-q"],
            ["export", embedded, "-o", out, "--overwrite"],
        ):
            one_line_error(run(*args), f"{out}: cannot write output: {message}")
        (output.parent / output.name).unlink(missing_ok=True)
        os.symlink(target, output) if out == link else os.mkfifo(output)
        for extra in ([], ["--virtual"]):
            one_line_error(
                run("merge", output, "--overwrite", *extra), f"{output}: cannot write output: {message}"
            )
        output.unlink()
    assert link.is_symlink() and target.read_text() == "kept" and pipe.is_fifo()
    assert (
        not list(tmp_path.glob("*.partial")) and len(find_shards(output)) == 2
    )  # nothing written, shards kept


def test_what_a_rerun_of_a_torchrun_job_is_told(embedded: Path, tmp_path: Path) -> None:
    """A complete output, another job's stopped merge, shards without an output (--resume)."""
    from protembed import torchrun

    output = make_shards(tmp_path / "job", embedded, embedded)
    r = run("merge", output, "--virtual")
    assert r.exit_code == 0 and f"{output}: wrote a virtual-dataset file over 2 shards" in r.output
    shard = output.with_name("j.shard-001-of-002.h5")
    before = shard.read_bytes()
    r = run("export", output, "-o", shard, "--overwrite")  # the only copy of what it exports
    one_line_error(r, f"{shard}: the output is a shard that {output} reads from; choose another -o")
    assert shard.read_bytes() == before
    with pytest.raises(
        OutputCompleteError, match=rf"^{output}: a complete output already exists; pass --overwrite"
    ):
        torchrun.check_output(output, 2, True, False)
    shutil.copy(embedded, output)
    with h5py.File(output, "r+") as f:
        f.attrs["complete"] = False  # the merge of the 2-rank job, stopped
    torchrun.check_output(output, 2, True, False)  # this job's own: the rerun finishes it
    told = (
        rf"^{output}: the stopped merge of a torchrun job of 2 ranks \(\*-of-002\); run it with 2 ranks, "
        rf"or `protembed merge {output}`, to finish it; or pass --overwrite to start over$"
    )
    with pytest.raises(OutputExistsError, match=told):
        torchrun.check_output(output, 3, True, False)
    output.unlink()  # stopped before the merge: shards only, which --resume accepts
    r = run("embed", tmp_path / "s.fa", "-o", output, "--model", ESM, "--resume")
    one_line_error(
        r, f"shard files of a torchrun job are beside {output} (*-of-002): run that torchrun command"
    )
    r = run("merge", output, "-q")
    assert r.exit_code == 0 and r.output == f"{output}\n" and not shard_worlds(output)
    output = make_shards(tmp_path / "again", embedded, embedded)
    r = run("merge", output)  # not a terminal: progress as log lines
    assert r.exit_code == 0 and "merging 4 rows" in r.output and f"{output}: joined 2 shards" in r.output


def test_merge_names_the_shard_that_does_not_fit(embedded: Path, tmp_path: Path) -> None:
    half = tmp_path / "half.h5"
    assert (
        run(
            "embed", tmp_path / "s.fa", "-o", half, "--model", ESM, "--store-dtype", "float16", "-q"
        ).exit_code
        == 0
    )
    output = make_shards(tmp_path / "mixed", embedded, half)
    for extra in ([], ["--virtual"]):
        r = run("merge", output, *extra)
        one_line_error(
            r, "j.shard-001-of-002.h5: made with other settings than j.shard-000-of-002.h5 (store_dtype)"
        )
    assert len(find_shards(output)) == 2 and not output.exists()

    output = make_shards(tmp_path / "damaged", embedded, embedded)
    shard = output.parent / "j.shard-000-of-002.h5"
    shard.write_bytes(shard.read_bytes()[:3000])
    one_line_error(run("merge", output), f"{shard}: not a readable HDF5 file (")
    shard.unlink()
    shard.mkdir()
    one_line_error(run("merge", output, "--virtual"), f"{shard}: is a folder")


def test_merge_virtual_output_errors(embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = make_shards(tmp_path / "job", embedded, embedded)
    output.mkdir()
    one_line_error(
        run("merge", output, "--virtual", "--overwrite"), f"{output}: cannot write output: is a folder"
    )
    output.rmdir()

    def refuse(tmp: Path, *args: Any) -> None:
        tmp.write_text("begun")
        raise PermissionError(13, "Permission denied", str(tmp))

    monkeypatch.setattr("protembed.merge._write_layout", refuse)
    with pytest.raises(StoreError, match=f"^{output}: cannot write output: Permission denied$"):
        write_virtual(output, find_shards(output))
    assert not output.exists() and not list(output.parent.glob("*.partial"))


def test_export_checks_the_room_on_the_disk_first(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HDF5 cannot recover from a disk filling up midway (it may crash): an export too big fails first."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("protembed.export.shutil.disk_usage", lambda _: usage._replace(free=10_000))
    out = tmp_path / "per-protein.h5"
    one_line_error(
        run("export", embedded, "-o", out), f"{out}: cannot write output: needs about 0.1 MB, 0.0 MB free"
    )
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    monkeypatch.setattr("protembed.export.shutil.disk_usage", lambda _: usage._replace(free=200_000))
    assert run("export", embedded, "-o", out).exit_code == 0
    one_line_error(run("export", tmp_path, "-o", tmp_path / "y.h5"), f"{tmp_path}: is a folder")


def test_unreadable_cached_revision_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = repo_dir("facebook/esm2_t6_8M_UR50D", tmp_path) / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("0" * 40)
    real = Path.read_text

    def read_text(path: Path, *args: Any, **kwargs: Any) -> str:
        if path == ref:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(HubError, match=f"^{ref}: cannot read the cached revision: Permission denied$"):
        cached_snapshot("facebook/esm2_t6_8M_UR50D", None, tmp_path)
    r = run("models", "--cache-dir", tmp_path)
    one_line_error(r, f"{ref}: cannot read the cached revision: Permission denied")
    one_line_error(run("models", "--cache-dir", ref), f"Hub cache {ref}: not a folder")
    assert run("models", "--cache-dir", tmp_path / "none").exit_code == 0  # nothing cached yet


def test_damaged_file_is_a_one_line_error(embedded: Path, tmp_path: Path) -> None:
    """Damage that h5py finds only once the file is open (here the root group's heap) is a
    StoreError naming the file, for the reader, `export` and an `embed` that would resume it."""
    data = bytearray(embedded.read_bytes())
    at = data.find(b"HEAP")  # the signature of the root group's local heap
    assert at > 0
    data[at : at + 4] = b"XXXX"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(data)
    with pytest.raises(StoreError, match=rf"^{bad}: damaged HDF5 file \(.*bad local heap signature"):
        open_embeddings(bad)
    one_line_error(run("export", bad, "-o", tmp_path / "e.h5"), f"{bad}: damaged HDF5 file")
    r = run("embed", tmp_path / "s.fa", "-o", bad, "--model", ESM, "-q")
    one_line_error(r, "; pass --overwrite to replace it")
    assert bad.read_bytes() == data  # left as it was
    r = run("embed", tmp_path / "s.fa", "-o", bad, "--model", ESM, "-q", "--overwrite")
    assert r.exit_code == 0, r.output


def test_a_missing_input_is_named_before_shards_beside_the_output(tmp_path: Path) -> None:
    (tmp_path / "job.shard-000-of-002.h5").write_bytes(b"a rank's shard")
    r = run("embed", tmp_path / "missing.fa", "-o", tmp_path / "job.h5", "--model", ESM, "-q")
    one_line_error(r, "missing.fa: cannot read input: No such file")


def test_a_folder_named_like_a_shard_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "job.shard-000-of-002.h5").mkdir()
    (tmp_path / "job.shard-001-of-003.h5").write_bytes(b"")
    assert shard_worlds(tmp_path / "job.h5") == [3]


def test_a_dangling_link_in_a_files_place_counts_as_existing(tmp_path: Path) -> None:
    link = tmp_path / "plot.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(OutputExistsError, match="plot.png: exists"):
        check_file_output(link, overwrite=False)
    check_file_output(link, overwrite=True)
    link.unlink()
    link.symlink_to(tmp_path / "nowhere" / "plot.png")  # written through, it could not be
    with pytest.raises(StoreError, match=r"plot.png: cannot write output: folder .*nowhere does not exist"):
        check_file_output(link, overwrite=True)
