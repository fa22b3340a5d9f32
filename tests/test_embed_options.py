"""`protembed embed` / `export`: option checks, outputs that would clobber their input, the token
budget kept across a resume, odd headers, locks through symlinks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from protembed import embed as embed_module
from protembed import progress_log
from protembed.cli import app
from protembed.errors import RERUN, BackendError, HubError, OptionError, OutputExistsError
from protembed.models import checkpoints
from protembed.output_lock import OutputLock
from tests.helpers import fixture_dir

ESM = str(fixture_dir("esm2_t3_h64") / "checkpoint")
runner = CliRunner()
FASTA = "".join(f">s{i} protein {i}\n{'MKTAYIAKQRQISFVKSHFSRQ'[: 5 + i]}\n" for i in range(12))


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def fasta(tmp_path: Path) -> Path:
    path = tmp_path / "in.fasta"
    path.write_text(FASTA)
    return path


def test_option_values_are_checked(tmp_path: Path, fasta: Path) -> None:
    out = tmp_path / "o.h5"
    for extra, message in [
        (["--tokens-per-batch", "0"], "--tokens-per-batch"),
        (["--max-length", "0"], "--max-length"),
        (["--resume", "--overwrite"], "Invalid value for '--resume': contradicts --overwrite"),
    ]:
        r = run("embed", fasta, "-o", out, "--model", ESM, "-q", *extra)
        assert r.exit_code == 2 and message in r.output, (extra, r.output)
    for args, message in [  # an unset shell variable must not mean the current folder
        (["", "-o", out], "Invalid value for 'INPUT': the path is empty"),
        ([fasta, "-o", ""], "the path is empty"),
    ]:
        r = run("embed", *args, "--model", ESM, "-q")
        assert r.exit_code == 2 and message in " ".join(r.output.split()), (args, r.output)
    r = run("embed", tmp_path, "--model", ESM, "-q")
    assert r.exit_code == 1 and f"error: {tmp_path}: is a folder, not a FASTA file" in r.output, r.output
    dash = tmp_path / "-"  # `./-` names a file, only `-` is stdin
    dash.write_text(FASTA)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = run("embed", "./-", "-o", "dash.h5", "--model", ESM, "-q")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0 and (tmp_path / "dash.h5").exists(), r.output
    r = run("embed", fasta, "-o", out, "--model", ESM, "-q", "--pool", "mean,mean")
    assert r.exit_code == 0, r.output
    with h5py.File(out) as h5:
        assert h5.attrs["pooling"] == "mean" and "mean" in h5


def test_output_that_is_the_input_is_refused(tmp_path: Path, fasta: Path) -> None:
    r = run("embed", fasta, "-o", fasta, "--model", ESM, "-q", "--overwrite")
    assert r.exit_code == 1 and "the output is the input file" in r.output
    assert fasta.read_text() == FASTA
    link = tmp_path / "link.h5"
    link.symlink_to(fasta)
    r = run("embed", fasta, "-o", link, "--model", ESM, "-q", "--overwrite")
    assert r.exit_code == 1 and "the output is the input file" in r.output
    assert fasta.read_text() == FASTA


def test_export_never_replaces_its_source_or_a_folder(tmp_path: Path, fasta: Path) -> None:
    src = tmp_path / "e.h5"
    assert run("embed", fasta, "-o", src, "--model", ESM, "-q").exit_code == 0
    before = src.read_bytes()
    r = run("export", src, "-o", src, "--layout", "per-protein", "--overwrite")
    assert r.exit_code == 1 and "the output is the source file" in r.output
    assert src.read_bytes() == before
    (tmp_path / "adir").mkdir()
    r = run("export", src, "-o", tmp_path / "adir", "--layout", "per-protein", "--overwrite")
    assert r.exit_code == 1 and "is a folder" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "adir.partial").exists()


def test_resume_keeps_the_recorded_token_budget(
    tmp_path: Path, fasta: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r.h5"
    budgets: list[int] = []
    real = embed_module.JobSpec

    def spy(*args: object, **kw: object) -> object:
        spec = real(*args, **kw)  # type: ignore[arg-type]
        budgets.append(spec.budget)
        return spec

    monkeypatch.setattr(embed_module, "JobSpec", spy)
    assert run("embed", fasta, "-o", out, "--model", ESM, "-q", "--tokens-per-batch", "40").exit_code == 0
    with h5py.File(out, "a") as h5:  # as if the run had been killed half-way
        assert h5.attrs["tokens_per_batch"] == 40
        h5.attrs["complete"] = False
        written = h5["written"][...]
        written[6:] = False
        h5["written"][...] = written
    r = run("embed", fasta, "-o", out, "--model", ESM, "-q")  # no --tokens-per-batch: the file's
    assert r.exit_code == 0, r.output
    assert budgets == [40, 40]
    with h5py.File(out, "a") as h5:
        h5.attrs["complete"] = False
        h5["written"][0] = False
    r = run("embed", fasta, "-o", out, "--model", ESM, "-q", "--tokens-per-batch", "64")
    assert r.exit_code == 1 and "tokens_per_batch 40 (file) vs 64 (now)" in r.output


def test_nul_byte_in_a_header(tmp_path: Path) -> None:
    path = tmp_path / "nul.fasta"
    path.write_bytes(b">a\nMKT\n>b\x00c desc\nMKTAYI\n>d\nMSE\n")
    out = tmp_path / "nul.h5"
    r = run("embed", path, "-o", out, "--model", ESM, "-q")
    assert r.exit_code == 1 and f"{path}:3" in r.output and "NUL byte in the header" in r.output
    assert "Traceback" not in r.output
    r = run("embed", path, "-o", out, "--model", ESM, "-q", "--on-invalid", "skip")
    assert r.exit_code == 0, r.output
    with h5py.File(out) as h5:
        assert h5["skipped"][...].tolist() == [False, True, False]
        assert np.isfinite(h5["mean"][0]).all() and np.isnan(h5["mean"][1]).all()


def test_input_is_validated_before_a_local_checkpoint_is_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_hashing(path: Path) -> str:
        raise AssertionError("weights hashed before the input was validated")

    monkeypatch.setattr(checkpoints, "weights_sha256", no_hashing)
    path = tmp_path / "bad.fasta"
    path.write_text(">a\nMKT8\n")
    r = run("embed", path, "-o", tmp_path / "b.h5", "--model", ESM, "-q")
    assert r.exit_code == 1 and "invalid residue '8' at position 4" in r.output


def test_lock_is_shared_by_every_path_to_one_output(tmp_path: Path) -> None:
    real = tmp_path / "out.h5"
    real.write_bytes(b"")
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    held = OutputLock(real)
    try:
        with pytest.raises(OutputExistsError, match="another protembed run"):
            OutputLock(link)
    finally:
        held.release()


def test_ctrl_c_hint_fits_the_command(tmp_path: Path, fasta: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.h5"
    assert run("embed", fasta, "-o", out, "--model", ESM, "-q").exit_code == 0  # a complete output

    def interrupted(*args: object, **kwargs: object) -> None:  # before the output is touched
        raise KeyboardInterrupt

    def interrupted_writing(*args: object, **kwargs: object) -> None:  # the new output begun
        with h5py.File(out, "r+") as f:
            f.attrs["complete"] = False
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "embed_fasta", interrupted)
    fresh = run("embed", fasta, "-o", tmp_path / "new.h5", "--model", ESM)  # no output yet
    assert fresh.exit_code == 130
    assert "no embeddings were written yet; run the same command again to start" in fresh.output
    # Stopped before writing (a download, the model load): the old output is whole, and only the
    # same command replaces it.
    early = run("embed", fasta, "-o", out, "--model", ESM, "--overwrite")
    assert early.exit_code == 130 and "were written yet; run the same command again to start" in early.output

    def hub_failed(*args: object, **kwargs: object) -> None:
        raise HubError(f"download of x failed: 503; {RERUN} to resume")

    monkeypatch.setattr(embed_module, "embed_fasta", hub_failed)
    failed = run("embed", fasta, "-o", out, "--model", ESM, "--overwrite")
    assert failed.exit_code == 1 and "503; run the same command again to resume" in failed.output
    # With --overwrite and the new output begun, the same command would start over: drop it.
    monkeypatch.setattr(embed_module, "embed_fasta", interrupted_writing)
    again = run("embed", fasta, "-o", out, "--model", ESM, "--overwrite")
    assert again.exit_code == 130 and "run the command again without --overwrite to resume" in again.output
    plain = run("embed", fasta, "-o", out, "--model", ESM)  # an unfinished output: what it holds is kept
    assert plain.exit_code == 130 and "kept; run the same command again to resume" in plain.output
    monkeypatch.setattr("protembed.export.export_per_protein", interrupted)
    export = run("export", out, "-o", tmp_path / "x.h5")
    assert export.exit_code == 130 and export.output.strip() == "interrupted"

    def worker_lost(*args: object, **kwargs: object) -> None:  # as parallel.py words it
        raise BackendError("the worker on cpu stopped (exit code -9); rows finished so far are kept, "
                           "run the same command again to resume")  # fmt: skip

    monkeypatch.setattr(embed_module, "embed_fasta", worker_lost)
    lost = run("embed", fasta, "-o", out, "--model", ESM, "--overwrite")
    assert lost.exit_code == 1 and "kept, run the command again without --overwrite to resume" in lost.output


def test_embed_fasta_checks_what_the_cli_checks(tmp_path: Path, fasta: Path) -> None:
    """The function behind `embed` refuses the values the command line refuses, and takes one
    layer or pooling as well as a list."""
    out = tmp_path / "api.h5"
    for kwargs, message in [
        ({"tokens_per_batch": 0}, "--tokens-per-batch 0 must be at least 1"),
        ({"tokens_per_batch": -10}, "--tokens-per-batch -10 must be at least 1"),
        ({"tokens_per_batch": 1 << 30}, "--tokens-per-batch 1073741824 is more than a device holds"),
        ({"max_length": 0}, r"--max-length 0 is outside 1\.\.1022"),
        ({"compression": "zip"}, "--compression 'zip' is not one of None, gzip, lzf"),
    ]:
        with pytest.raises(OptionError, match=message):
            embed_module.embed_fasta(fasta, out, model=ESM, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()
    embed_module.embed_fasta(fasta, out, model=ESM, layers="all", poolings="cls", quiet=True)
    with h5py.File(out, "r") as f:
        assert list(f.attrs["layers"]) == [0, 1, 2, 3] and f["cls"].shape == (12, 4, 64)
    embed_module.embed_fasta(
        fasta, out, model=ESM, poolings=["mean, cls", "mean"], overwrite=True, quiet=True
    )
    with h5py.File(out, "r") as f:
        assert f.attrs["pooling"] == "mean,cls"
    embed_module.embed_fasta(fasta, out, model=Path(ESM), overwrite=True, quiet=True)  # a Path as well
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] and f.attrs["model_source"] == str(Path(ESM).resolve())
    for wrong, match in (
        ({"layers": None}, "layers: pass a layer"),
        ({"poolings": None}, "pooling: pass a name"),
    ):
        with pytest.raises(TypeError, match=match):
            embed_module.embed_fasta(fasta, out, model=ESM, overwrite=True, **wrong)  # type: ignore[arg-type]


def test_output_folder_is_checked_before_the_model(
    tmp_path: Path, fasta: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model download can take an hour: an output that cannot be written fails first."""
    monkeypatch.setattr(embed_module, "locate_model", lambda *a, **k: pytest.fail("the model was looked up"))
    shut = tmp_path / "shut"
    shut.mkdir()
    monkeypatch.setattr("protembed.embed_setup.writable", lambda p: Path(p) != shut.resolve())
    for out, message in [
        (shut / "o.h5", f"{shut / 'o.h5'}: cannot write output: permission denied (folder {shut})"),
        (tmp_path / "none" / "o.h5", f"cannot write output: folder {tmp_path / 'none'} does not exist"),
        (tmp_path, f"{tmp_path}: cannot write output: is a folder"),
        (fasta / "o.h5", f"cannot write output: {fasta} is not a folder"),
    ]:
        r = run("embed", fasta, "-o", out, "--model", "esm2-8m", "-q")
        assert r.exit_code == 1 and message in r.output.replace("\n", ""), r.output  # type: ignore[attr-defined]


def test_another_users_stale_lock_is_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock file this user may not open for writing (another user's, left by a killed run)."""
    out = tmp_path / "o.h5"
    lock = tmp_path / "o.h5.lock"
    lock.write_text("12345\n")
    real_open = os.open
    refused: list[int] = []

    def as_another_users(path: object, flags: int, *args: object) -> int:
        if Path(str(path)) == lock and flags & os.O_RDWR and lock.exists() and lock.read_text() == "12345\n":
            refused.append(flags)
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("protembed.output_lock.os.open", as_another_users)
    held = OutputLock(out)
    assert refused and lock.read_text() == f"{os.getpid()}\n"  # replaced by one of ours
    held.release()
    assert not lock.exists()


def test_progress_lines_when_stderr_is_a_log_file(
    tmp_path: Path, fasta: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No bar outside a terminal (CliRunner's stderr is not one), so plain lines say how far it got."""
    monkeypatch.setattr(progress_log, "LOG_SECONDS", 0.0)
    r = runner.invoke(app, ["embed", str(fasta), "-o", str(tmp_path / "a.h5"), "-m", ESM, "--json"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert lines[0] == f"embedding 12 rows ({sum(5 + i for i in range(12))} residues)"
    last = [line for line in lines if line.startswith("12/12 rows (100.0%), ")]
    assert last and last[-1].endswith(" residues/s, 0 s left"), lines
    assert json.loads(r.stdout)["records"] == 12  # stdout stays the JSON alone
    r = runner.invoke(app, ["embed", str(fasta), "-o", str(tmp_path / "b.h5"), "-m", ESM, "-q"])
    assert r.exit_code == 0 and r.stderr == "", r.stderr
