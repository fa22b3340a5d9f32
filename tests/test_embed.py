"""`protembed embed` end to end on the fixture checkpoints: values, layout, resume, errors."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from protembed.cache import write_whole
from protembed.cli import app
from protembed.cli_common import handle_errors, out_console, print_json
from protembed.cli_embed import default_output
from protembed.errors import FastaError, OptionError, StoreError
from protembed.models import checkpoints
from protembed.reader import open_embeddings
from tests.helpers import fixture_dir, one_line_error, reference, rows_written

ESM = str(fixture_dir("esm2_t3_h64") / "checkpoint")
AMP = str(fixture_dir("amplify_l3_h64") / "checkpoint")
runner = CliRunner()


def fixture_fasta(tmp: Path, name: str) -> tuple[Path, list[str]]:
    """The fixture sequences the FASTA path can carry (no lower case, no '<mask>' text)."""
    meta, _ = reference(name)
    keys = [s["key"] for s in meta["sequences"] if s["name"].split("_")[0] not in ("mixed", "masked")]
    seqs = {s["key"]: s["sequence"] for s in meta["sequences"]}
    path = tmp / f"{name}.fasta"
    path.write_text("".join(f">{k} fixture {k}\n{seqs[k]}\n" for k in keys))
    return path, keys


def embed(*args: str) -> object:
    result = runner.invoke(app, ["embed", *args, "--quiet"])
    return result


@pytest.mark.parametrize("name", ["esm2_t3_h64", "amplify_l3_h64"])
def test_file_reproduces_reference_means_and_residues(tmp_path: Path, name: str) -> None:
    fasta, keys = fixture_fasta(tmp_path, name)
    out = tmp_path / "out.h5"
    ckpt = str(fixture_dir(name) / "checkpoint")
    n_layers = 3
    layers = "0,1,-1" if name.startswith("esm2") else "1,2,-1"
    r = embed(
        str(fasta), "-o", str(out), "--model", ckpt, "--layer", layers, "--per-residue", "--pool", "mean,cls"
    )
    assert r.exit_code == 0, r.output
    _, ref = reference(name)
    with open_embeddings(out) as f:
        assert list(f.ids) == keys
        stored = list(f.attrs["layers"])
        assert stored == ([0, 1, n_layers] if name.startswith("esm2") else [1, 2, n_layers])
        assert f.attrs["model_layers"] == n_layers
        means = f.pooled("mean")
        assert np.array_equal(f.pooled("mean", layer=-1), means[:, -1])
        for i, k in enumerate(keys):
            np.testing.assert_allclose(means[i, -1], ref[f"{k}_mean"], atol=1e-4)
            if f"{k}_hidden_states" not in ref:
                continue
            hs = ref[f"{k}_hidden_states"]
            for j, layer in enumerate(stored):
                want = hs[layer if name.startswith("esm2") else layer - 1][1:-1]
                got = f.residues(i)[:, j]
                assert np.abs(got - want).max() <= 1e-4, (k, layer)
                np.testing.assert_allclose(
                    f.pooled("cls")[i, j], hs[layer if name.startswith("esm2") else layer - 1][0], atol=1e-4
                )


def test_layout_and_attributes(tmp_path: Path) -> None:
    fasta, keys = fixture_fasta(tmp_path, "esm2_t3_h64")
    out = tmp_path / "out.h5"
    assert (
        embed(str(fasta), "-o", str(out), "--model", ESM, "--per-residue", "--max-length", "100").exit_code
        == 0
    )
    meta, _ = reference("esm2_t3_h64")
    n_res = {s["key"]: len(s["sequence"]) for s in meta["sequences"]}
    with h5py.File(out, "r") as f:
        a = f.attrs
        assert a["format"] == "protembed-embeddings" and a["format_version"] == 1
        assert bool(a["complete"]) and a["n_sequences"] == len(keys)
        assert list(a["layers"]) == [3] and a["pooling"] == "mean" and a["long_policy"] == "truncate"
        assert a["max_length"] == 100 and a["compute_dtype"] == "float32" and a["store_dtype"] == "float32"
        for key in (
            "protembed_version",
            "model",
            "model_source",
            "model_revision",
            "input_sha256",
            "created",
        ):
            assert key in a
        assert str(a["model_revision"]).startswith("sha256:")
        lengths = f["lengths"][:]
        assert list(lengths) == [min(n_res[k], 100) for k in keys]
        assert list(f["truncated"][:]) == [n_res[k] > 100 for k in keys]
        assert f["mean"].shape == (len(keys), 64)
        offsets = f["offsets"][:]
        assert offsets[0] == 0 and list(np.diff(offsets)) == list(lengths)
        assert f["residues"].shape == (offsets[-1], 64)
        assert [d.decode() if isinstance(d, bytes) else d for d in f["descriptions"][:2]] == [
            f"{keys[0]} fixture {keys[0]}",
            f"{keys[1]} fixture {keys[1]}",
        ]


def test_stdin_gzip_and_duplicates_agree(tmp_path: Path) -> None:
    fasta, keys = fixture_fasta(tmp_path, "amplify_l3_h64")
    text = fasta.read_text()
    doubled = text + text.replace(">s", ">dup_s")
    gz = tmp_path / "in.fa.gz"
    gz.write_bytes(gzip.compress(doubled.encode()))
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert embed(str(gz), "-o", str(a), "--model", AMP).exit_code == 0
    r = runner.invoke(app, ["embed", "-", "-o", str(b), "--model", AMP, "--json"], input=doubled)
    assert r.exit_code == 0, r.output
    assert f'"duplicates": {len(keys)}' in r.output
    with open_embeddings(a) as fa, open_embeddings(b) as fb:
        assert np.array_equal(fa.pooled("mean"), fb.pooled("mean"))
        m = fa.pooled("mean")
        assert np.array_equal(m[: len(keys)], m[len(keys) :])
        assert fa.attrs["input_sha256"] == fb.attrs["input_sha256"]


def test_window_mode_covers_every_residue(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    long = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 130))
    short = long[:40]
    fasta = tmp_path / "long.fa"
    fasta.write_text(f">long\n{long}\n>short\n{short}\n")
    out, trunc = tmp_path / "w.h5", tmp_path / "t.h5"
    assert embed(str(fasta), "-o", str(out), "--model", ESM, "--max-length", "50", "--long", "window",
                 "--per-residue").exit_code == 0  # fmt: skip
    assert (
        embed(str(fasta), "-o", str(trunc), "--model", ESM, "--max-length", "50", "--per-residue").exit_code
        == 0
    )
    with open_embeddings(out) as w, open_embeddings(trunc) as t:
        assert list(w.lengths) == [130, 40] and list(t.lengths) == [50, 40]
        assert not w.attrs["long_policy"] == "truncate"
        full = w.residues(0)
        assert full.shape == (130, 64) and np.isfinite(full).all()
        np.testing.assert_allclose(w.pooled("mean")[0], full.mean(axis=0), atol=1e-5)
        # windows start at 0, 25, 50, 75, 80: residues 0..24 are seen by the first window alone
        # and equal the truncated run's states there; the short protein is unaffected.
        np.testing.assert_allclose(full[:25], t.residues(0)[:25], atol=1e-5)
        np.testing.assert_allclose(w.residues(1), t.residues(1), atol=1e-5)
    with h5py.File(trunc, "r") as t, h5py.File(out, "r") as w:
        assert list(t["truncated"][:]) == [True, False] and list(w["truncated"][:]) == [False, False]


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fasta = tmp_path / "many.fa"
    with fasta.open("w") as fh:
        for i in range(1500):
            fh.write(
                f">p{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), int(rng.integers(20, 300))))}\n"
            )
    args = ["embed", str(fasta), "--model", ESM, "--per-residue", "--tokens-per-batch", "600", "--quiet"]
    killed, clean = tmp_path / "killed.h5", tmp_path / "clean.h5"
    child = (
        "import sys, protembed.embed as e; e.FLUSH_SECONDS = 0.0; from protembed.cli import main; "
        f"sys.argv = ['protembed'] + {args + ['-o', str(killed)]!r}; main()"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    deadline = time.time() + 120
    while rows_written(killed) < 50 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = rows_written(killed)
    assert 0 < partial < 1500, f"kill landed at {partial} rows; test needs a mid-run kill"
    r = runner.invoke(app, [*args[:-1], "-o", str(killed), "--json"])
    assert r.exit_code == 0, r.output
    assert f'"resumed": {partial}' in r.output
    assert runner.invoke(app, [*args, "-o", str(clean)]).exit_code == 0
    with open_embeddings(killed) as a, open_embeddings(clean) as b:
        assert list(a.ids) == list(b.ids) and np.array_equal(a.lengths, b.lengths)
        assert np.abs(a.pooled("mean") - b.pooled("mean")).max() <= 1e-6
        with h5py.File(killed, "r") as fa, h5py.File(clean, "r") as fb:
            assert np.array_equal(fa["offsets"][:], fb["offsets"][:])
            assert np.abs(fa["residues"][:] - fb["residues"][:]).max() <= 1e-6


def test_existing_output_and_mismatched_resume(tmp_path: Path) -> None:
    fasta, _ = fixture_fasta(tmp_path, "esm2_t3_h64")
    out = tmp_path / "o.h5"
    assert embed(str(fasta), "-o", str(out), "--model", ESM).exit_code == 0
    before = out.read_bytes()
    r = embed(str(fasta), "-o", str(out), "--model", ESM)
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert out.read_bytes() == before
    assert embed(str(fasta), "-o", str(out), "--model", ESM, "--overwrite", "--layer", "1").exit_code == 0
    with h5py.File(out, "r+") as f:  # pretend the run was interrupted
        f.attrs["complete"] = False
    r = embed(str(fasta), "-o", str(out), "--model", ESM, "--layer", "2")
    assert r.exit_code == 1 and "layers" in r.output, r.output
    link = tmp_path / "same-checkpoint"
    link.symlink_to(ESM)
    r = embed(str(fasta), "-o", str(out), "--model", f"{link}/", "--layer", "1")  # the same model
    assert r.exit_code == 0, r.output
    both = embed(str(fasta), "-o", str(out), "--model", ESM, "--overwrite", "--pool", "mean,cls")
    assert both.exit_code == 0
    with h5py.File(out, "r+") as f:  # interrupted before its last rows
        f.attrs["complete"] = False
        f["written"][-2:] = 0
    r = embed(str(fasta), "-o", str(out), "--model", ESM, "--pool", "cls,mean")  # the same datasets
    assert r.exit_code == 0, r.output
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] and f["written"][...].all()
    r = embed(str(fasta), "-o", str(out), "--model", ESM, "--overwrite", "--pool", "mean")
    assert r.exit_code == 0
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    r = embed(str(fasta), "-o", str(out), "--model", ESM, "--pool", "cls,mean")  # other datasets
    assert r.exit_code == 1 and "pooling 'mean' (file) vs 'cls,mean' (now)" in r.output, r.output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty"),
        ("MKTAYIAK\n", "FASTA"),
        (">a\nMKTA\n>b\n\n>c\nMK\n", "'b'"),
        (">a\nMKTA\n>b\nMK1TA\n", "'1' at position 3"),
    ],
)
def test_bad_input_is_one_line_exit_1(tmp_path: Path, content: str, expected: str) -> None:
    fasta = tmp_path / "bad.fa"
    fasta.write_text(content)
    r = embed(str(fasta), "-o", str(tmp_path / "x.h5"), "--model", ESM)
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x.h5").exists()


def test_skip_policy_records_skipped_rows(tmp_path: Path) -> None:
    fasta = tmp_path / "mixed.fa"
    fasta.write_text(">ok\nMKTAYIAK\n>bad\nMK1TA\n>ok2\nMSTNPKPQ\n")
    out = tmp_path / "s.h5"
    r = runner.invoke(
        app, ["embed", str(fasta), "-o", str(out), "--model", ESM, "--on-invalid", "skip", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert '"skipped": 1' in r.output
    with h5py.File(out, "r") as f:
        assert list(f["skipped"][:]) == [False, True, False]
        assert f["lengths"][1] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "esm2-65m"], "esm2-650m"),
        (["--layer", "9"], "out of range"),
        (["--pool", "max"], "--pool 'max' is not one of mean, cls"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], expected: str) -> None:
    fasta, _ = fixture_fasta(tmp_path, "esm2_t3_h64")
    full = ["--model", ESM, *args] if args[0] != "--model" else args
    r = embed(str(fasta), "-o", str(tmp_path / "y.h5"), *full)
    assert r.exit_code == 1 and expected in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1


def test_unknown_choice_is_a_usage_error(tmp_path: Path) -> None:
    fasta, _ = fixture_fasta(tmp_path, "esm2_t3_h64")
    r = embed(str(fasta), "-o", str(tmp_path / "z.h5"), "--model", ESM, "--dtype", "int8")
    assert r.exit_code == 2 and "int8" in r.output
    assert not (tmp_path / "z.h5").exists()


def test_local_weights_digest_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("PROTEMBED_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ESM, ckpt)
    first = checkpoints.weights_sha256(ckpt)
    assert first.startswith("sha256:") and (tmp_path / "cache" / "weights-sha256.json").exists()
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert checkpoints.weights_sha256(ckpt) == first and not opened  # remembered: nothing re-read
    monkeypatch.undo()
    monkeypatch.setenv("PROTEMBED_CACHE", str(tmp_path / "cache"))
    weights = ckpt / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or `touch -r` would
    assert weights.stat().st_size == before.st_size  # same size and mtime: only the ctime tells
    second = checkpoints.weights_sha256(ckpt)
    assert second != first
    memo = tmp_path / "cache" / "weights-sha256.json"
    memo.unlink()
    memo.mkdir()  # a memo that cannot be replaced: the digest is still right, and nothing is left over
    data[-1] ^= 2
    weights.write_bytes(bytes(data))
    assert checkpoints.weights_sha256(ckpt) not in (first, second)
    assert [p.name for p in memo.parent.iterdir()] == ["weights-sha256.json"]


def test_bad_input_fails_before_a_registry_model_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fasta = tmp_path / "bad.fa"
    fasta.write_text(">a\nMKTA\n>b\nMK1TA\n")
    r = embed(str(fasta), "-o", str(tmp_path / "x.h5"), "--model", "esm2-650m")
    assert r.exit_code == 1 and "invalid residue '1' at position 3" in r.output, r.output
    fasta.write_text(">a\nMKTA\n")
    r = embed(str(fasta), "-o", str(tmp_path / "x.h5"), "--model", "esm2-650m")
    assert r.exit_code == 1 and "protembed download esm2-650m" in r.output, r.output  # then the model


def test_error_text_with_newlines_prints_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """HDF5 and OS texts quoted in an error may hold newlines; the user still gets one line, with
    the spaces inside a line (of a quoted input line, say) as they were."""

    @handle_errors
    def fails() -> None:
        raise StoreError("o.h5: cannot write output: write failed: time = Tue Nov 24\n, filename = 'o.h5'")

    with pytest.raises(typer.Exit) as info:
        fails()
    err = capsys.readouterr().err
    assert info.value.exit_code == 1 and err.count("\n") == 1
    assert "time = Tue Nov 24 , filename = 'o.h5'" in err

    @handle_errors
    def quotes() -> None:
        raise FastaError("x.fa", 1, None, "not FASTA: expected a '>' header line, found 'ID   HBA_HUMAN'")

    with pytest.raises(typer.Exit):
        quotes()
    assert "found 'ID   HBA_HUMAN'" in capsys.readouterr().err


def test_output_that_cannot_be_written(capsys: pytest.CaptureFixture[str]) -> None:
    """A closed pipe ends the command quietly (`| head`); a full disk is a one-line error."""

    @handle_errors
    def closed_pipe() -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    @handle_errors
    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def closed_pipe_behind_a_file(tmp: Path) -> None:  # `predict -o /dev/stdout | head`
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    with pytest.raises(typer.Exit) as info:
        closed_pipe()
    assert info.value.exit_code == 141 and capsys.readouterr().err == ""
    with pytest.raises(BrokenPipeError):  # not a StoreError: it reaches handle_errors as a closed pipe
        write_whole(Path("/dev/stdout"), closed_pipe_behind_a_file)
    try:
        with pytest.raises(SystemExit) as stop:  # rich catches it while printing a table
            out_console.on_broken_pipe()
        assert stop.value.code == 141
    finally:
        out_console.quiet = False
    with pytest.raises(typer.Exit) as info:
        disk_full()
    assert info.value.exit_code == 1
    assert capsys.readouterr().err == "error: cannot write: No space left on device (--debug shows where)\n"


def test_large_output_into_a_pipe_closed_early_exits_141() -> None:
    """`protembed predict ... | head`: a write blocked on a full pipe whose reader goes away comes
    back short without an error; the rest of the output must still end in exit status 141."""
    code = (
        "import typer\n"
        "from protembed.cli_common import handle_errors, write_stdout\n"
        "typer.run(handle_errors(lambda: write_stdout('x' * 4_000_000)))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.read(10) == b"x" * 10
    child.stdout.close()
    assert child.wait(timeout=60) == 141, child.stderr.read().decode()


def test_json_output_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    """NaN and infinities are not JSON: strict parsers (jq, JSON.parse) get null instead."""
    print_json(
        {
            "rmse": float("nan"),
            "scale": [1.0, float("inf")],
            "n": (3,),
            "np": np.float32(0.5),
            "arr": np.array([2.0, np.nan]),
            "t": torch.tensor([1, 2]),
        }
    )
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {
        "rmse": None,
        "scale": [1.0, None],
        "n": [3],
        "np": 0.5,
        "arr": [2.0, None],
        "t": [1, 2],
    }


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full")
def test_json_to_a_full_disk(tmp_path: Path) -> None:
    fasta = tmp_path / "a.fa"
    fasta.write_text(">a\nMKTA\n")
    cmd = [sys.executable, "-m", "protembed", "embed", str(fasta), "-m", ESM, "--json", "-q"]
    with open("/dev/full", "w") as full:
        r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr == "error: cannot write to standard output: No space left on device\n"
    assert (tmp_path / "a.h5").is_file()  # the embeddings were written before the summary


def test_a_pipe_needs_an_output_name(tmp_path: Path) -> None:
    """`embed <(zcat x.gz)` has no file name to put the output beside: -o is required, as for stdin."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OptionError, match=rf"reading a pipe \({fifo}\) needs an output: add -o OUTPUT.h5"):
        default_output(str(fifo))
    assert default_output(str(tmp_path / "p.fasta.gz")) == tmp_path / "p.h5"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a number"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is outside 0..1"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 is set but MASTER_ADDR is not"),
    ],
)
def test_broken_launcher_environment_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fasta = tmp_path / "a.fa"
    fasta.write_text(">a\nMKV\n")
    r = embed(str(fasta), "-o", str(tmp_path / "a.h5"), "--model", ESM, "--device", "cpu")
    assert r.exit_code == 1 and f"error: {message}" in r.output and "Traceback" not in r.output, r.output


def test_colons_in_names_print_as_typed(tmp_path: Path) -> None:
    """Rich would turn ':fire:' into an emoji; ids and file names must print verbatim."""
    fasta = tmp_path / "a:fire:.fa"
    fasta.write_text(">id:smile:\nMK1\n")
    r = embed(str(fasta), "-o", str(tmp_path / "a.h5"), "--model", ESM)
    assert r.exit_code == 1 and "a:fire:.fa:2: record 'id:smile:': invalid residue '1'" in r.output, r.output


def test_torchrun_refuses_stdin_and_names_a_lost_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank would read stdin, one of them getting all of it; a collective that fails because
    another rank stopped is a one-line error that says to rerun."""
    import torch.distributed as tdist

    from protembed import torchrun
    from protembed.errors import StoreError

    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    r = runner.invoke(app, ["embed", "-", "-o", str(tmp_path / "a.h5"), "--model", ESM], input=">a\nMKV\n")
    one_line_error(r, "standard input cannot be shared by the ranks of a torchrun job; give a file")
    assert r.output.startswith("error: rank 1/2: standard input")  # which rank, as the ranks share stderr
    fifo = tmp_path / "pipe.fa"
    os.mkfifo(fifo)  # each rank would read a piece of it
    r = runner.invoke(app, ["embed", str(fifo), "-o", str(tmp_path / "a.h5"), "--model", ESM])
    one_line_error(r, f"{fifo} (a pipe) cannot be shared by the ranks of a torchrun job; give a file")
    r = runner.invoke(app, ["embed", "/dev/fd/63", "-o", str(tmp_path / "a.h5"), "--model", ESM])  # <(...)
    one_line_error(r, "/dev/fd/63 (a pipe) cannot be shared by the ranks of a torchrun job; give a file")

    def closed(*_: object, **__: object) -> None:
        raise RuntimeError("[gloo pair.cc:553] Connection closed by peer [127.0.0.1]:5678\nmore")

    monkeypatch.setattr(tdist, "all_reduce", closed)
    lost = r"^another rank of the job stopped \(\[gloo pair.cc:553\] Connection closed by peer \S+\)"
    with pytest.raises(StoreError, match=lost + "; this rank's shard is kept: run the same command again"):
        torchrun.sum_over_ranks([1.0], 1.0)
