"""Backend selection and `--compile`: explicit backends never fall back; compiled == eager."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from protembed.api import load_model
from protembed.backends import describe, resolve_backend
from protembed.cli import app
from protembed.errors import BackendError, OptionError
from tests.helpers import fixture_dir

ESM = str(fixture_dir("esm2_t3_h64") / "checkpoint")
runner = CliRunner()


def test_auto_is_torch_on_cpu_and_explicit_choices_are_checked() -> None:
    assert resolve_backend("auto", "cpu", "float32", False) == "torch"
    assert resolve_backend("auto", "cpu", "bfloat16", False) == "torch"
    assert describe("torch", "float32", True) == "torch+compile"
    assert describe("te", "fp8", False) == "te+fp8"
    with pytest.raises(OptionError, match="needs --backend te"):
        resolve_backend("torch", "cpu", "fp8", False)
    with pytest.raises(OptionError, match="not one of"):
        resolve_backend("tensorrt", "cpu", "float32", False)
    with pytest.raises(BackendError, match="runs on CUDA GPUs, not cpu"):  # before any advice on dtype
        resolve_backend("te", "cpu", "float32", False)


def test_te_errors_come_in_the_order_that_helps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU: say so (installing Transformer Engine would not help); a GPU without TE: the install
    hint; TE on a GPU in float32: the dtype to pass. One line each, before anything is written."""
    fasta = tmp_path / "a.fa"
    fasta.write_text(">a\nMKTAYIAK\n")
    r = runner.invoke(app, ["embed", str(fasta), "--model", ESM, "--backend", "te", "--device", "cpu"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "Transformer Engine runs on CUDA GPUs, not cpu" in r.output
    assert not (tmp_path / "a.h5").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the checks run, no kernels
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # the import fails, as uninstalled
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(BackendError, match=r"pip install 'protembed\[te\]'$"):
        resolve_backend("te", "cuda", "float32", False)
    from protembed.models import te

    monkeypatch.setattr(te, "_import_te", lambda: None)  # as if installed
    with pytest.raises(OptionError, match="add --dtype bfloat16"):
        resolve_backend("te", "cuda", "float32", False)


def test_compiled_embedding_equals_eager(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fasta = tmp_path / "c.fa"
    fasta.write_text("".join(f">s{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), n))}\n"
                             for i, n in enumerate([150, 140, 90, 60, 33, 20])))  # fmt: skip
    eager, compiled = tmp_path / "e.h5", tmp_path / "c.h5"
    common = ["--model", ESM, "--per-residue", "--tokens-per-batch", "400", "--quiet"]
    assert runner.invoke(app, ["embed", str(fasta), "-o", str(eager), *common]).exit_code == 0
    r = runner.invoke(app, ["embed", str(fasta), "-o", str(compiled), *common, "--compile"])
    assert r.exit_code == 0, r.output
    with h5py.File(eager, "r") as a, h5py.File(compiled, "r") as b:
        assert a.attrs["backend"] == "torch" and b.attrs["backend"] == "torch+compile"
        assert np.abs(a["mean"][:] - b["mean"][:]).max() <= 1e-5
        assert np.abs(a["residues"][:] - b["residues"][:]).max() <= 1e-5


def test_compiled_model_is_one_graph_compiled_once() -> None:
    """No graph break (token dropout's mask check) and no recompile (rotary tables filled on the
    first compiled call): a repeated batch reuses the first compilation."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager, compiled = load_model(ESM), load_model(ESM, compile=True)
    for seqs in (["MKTAYIAKQR", "MK<mask>AY"], ["MKTAYIAKQR", "MK<mask>AY"], ["ACDEFGHIK"]):
        want, got = eager.embed(seqs, layers=[-1]), compiled.embed(seqs, layers=[-1])
        assert np.abs(want.pooled["mean"] - got.pooled["mean"]).max() <= 1e-5
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2  # one graph, and at most one dynamic-shape redo


TINY = str(fixture_dir("esm2_t3_h64").parents[1] / "data" / "flip" / "tiny")


@pytest.mark.parametrize(
    "args",
    [
        [
            "bench",
            "--model",
            ESM,
            "--lengths",
            "16",
            "--repeats",
            "1",
            "--backend",
            "te",
            "--dtype",
            "bfloat16",
        ],
        ["finetune", "flip-gb1", "--model", ESM, "--data-dir", TINY, "--backend", "te"],
    ],
)
def test_bench_and_finetune_refuse_te_where_it_cannot_run(args: list[str], tmp_path: Path) -> None:
    """Without TE (this suite never installs it): the install hint on a GPU, the GPU it needs on a CPU."""
    r = runner.invoke(app, [*args, *(["--cache-dir", str(tmp_path)] if args[0] == "finetune" else [])])
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip() and line.startswith("error:")]
    why = "protembed[te]" if torch.cuda.is_available() else "Transformer Engine runs on CUDA GPUs, not cpu"
    assert len(lines) == 1 and why in lines[0], r.output


def test_bench_records_the_backend(tmp_path: Path) -> None:
    r = runner.invoke(app, ["bench", "--model", ESM, "--lengths", "16", "--repeats", "1", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert '"backend": "torch"' in r.output


def test_out_of_memory_batches_are_split_down_to_single_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that raises CUDA out-of-memory is halved and retried; results equal the direct run,
    and a single sequence that still does not fit is reported with its position."""
    import torch

    from protembed import compute
    from protembed.alphabet import ESM2
    from protembed.models.checkpoints import load_checkpoint

    encoder = load_checkpoint(fixture_dir("esm2_t3_h64") / "checkpoint")
    tokens = [
        ESM2.encode(s) for s in ("MKTAYIAKQR", "MSTNPKPQRKTKRNTNRRPQDVKFPGG", "ACDEFGHIK", "MLK", "W" * 40)
    ]
    direct = compute.run_batch(encoder, tokens, [3], ["mean"], True)
    real = compute.run_batch
    limit = {"tokens": 10**9}

    def fits_two(enc, toks, *args):  # noqa: ANN001, ANN002, ANN202 - test double
        if len(toks) > 2 or any(t.size > limit["tokens"] for t in toks):
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(enc, toks, *args)

    monkeypatch.setattr(compute, "run_batch", fits_two)
    split = compute.run_splitting(encoder, tokens, [3], ["mean"], True)
    np.testing.assert_allclose(split.pooled["mean"], direct.pooled["mean"], atol=1e-5)
    assert split.residues is not None and direct.residues is not None
    for a, b in zip(split.residues, direct.residues):
        np.testing.assert_allclose(a, b, atol=1e-5)
    limit["tokens"] = 40
    with pytest.raises(compute.SequenceTooLargeError) as err:
        compute.run_splitting(encoder, tokens, [3], ["mean"], False)
    assert err.value.position == 4 and err.value.n_tokens == 42


def test_compiled_batch_of_one_sequence(tmp_path: Path) -> None:
    """A first batch holding one sequence compiles (torch.compile's CPU code generation failed on
    the scatter that counted each sequence's masks)."""
    fasta, out = tmp_path / "one.fa", tmp_path / "one.h5"
    fasta.write_text(">one\nMKTAYIAKQRQISFVKSHFS\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # a separate process: vectorised kernels, 2 threads
    args = [
        sys.executable,
        "-m",
        "protembed",
        "embed",
        str(fasta),
        "-o",
        str(out),
        "--model",
        ESM,
        "--compile",
        "-q",
    ]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    want = load_model(ESM).embed(["MKTAYIAKQRQISFVKSHFS"]).pooled["mean"][:, 0]
    with h5py.File(out, "r") as f:
        assert np.abs(f["mean"][:] - want).max() <= 1e-5
