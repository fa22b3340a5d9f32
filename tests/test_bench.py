"""`protembed bench`: FLOP count, peak table, like-with-like guard, JSON schema, runs on the fixtures.

No test asserts on a timing: the runs only have to complete and report well-formed numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from protembed import bench as bench_module
from protembed.alphabet import ESM2
from protembed.batching import pack
from protembed.bench import (
    AMINO_ACIDS,
    BenchError,
    Runner,
    check_like_with_like,
    fasta_workload,
    forward_flops,
    synthetic_workload,
)
from protembed.bench_hf import padded_batches, require_transformers
from protembed.cli import app
from protembed.errors import BackendError
from protembed.models import amplify, esm2, projections
from protembed.models.checkpoints import random_model
from protembed.peaks import Peak, table_peak
from tests.helpers import fixture_dir

ESM2_CKPT = str(fixture_dir("esm2_t3_h64") / "checkpoint")
AMPLIFY_CKPT = str(fixture_dir("amplify_l3_h64") / "checkpoint")
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
FAST = ["--repeats", "1", "--batches", "1", "--tokens-per-batch", "64", "--quiet"]

TINY_ESM2 = esm2.config_from_hub(
    {
        "model_type": "esm",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
)
# intermediate_size 96 -> SwiGLU width int(2 * 96 / 3) = 64
TINY_AMPLIFY = amplify.config_from_hub(
    {
        "model_type": "AMPLIFY",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 96,
    }
)


def test_flops_hand_count_gelu() -> None:
    # D = 32, F = 64, 2 layers, sequences of 5 and 12 tokens.
    # per token per layer: Q,K,V,O 4*32*32 = 4096 MACs + up/down 2*32*64 = 4096 MACs -> 16384 FLOPs
    # attention per layer: 4 * T^2 * 32 -> T=5: 3200, T=12: 18432
    flops = forward_flops([5, 12], TINY_ESM2)
    assert flops.dense == 2 * 16384 * (5 + 12) == 557056
    assert flops.attention == 2 * (3200 + 18432) == 43264
    assert flops.total == 600320


def test_flops_hand_count_swiglu() -> None:
    # SwiGLU: up projection has 2F rows, so 3*D*F MACs in the FFN: 4096 + 3*32*64 = 10240 MACs/token
    assert TINY_AMPLIFY.d_ffn == 64
    flops = forward_flops([7], TINY_AMPLIFY)
    assert flops.dense == 2 * 2 * 7 * 10240
    assert flops.attention == 2 * 4 * 49 * 32


@pytest.mark.parametrize("config", [TINY_ESM2, TINY_AMPLIFY], ids=["esm2", "amplify"])
def test_dense_flops_match_torch_flop_counter(config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The matmul part of the formula equals what torch counts for the model's linear layers
    (on the addmm path: torch's counter does not see oneDNN's fused linear)."""
    monkeypatch.setattr(projections, "ONEDNN", False)
    model = random_model(config)
    batch = pack([np.full(12, 5, dtype=np.int64)])
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(batch.tokens, batch.packing, [config.n_layers])
    mm = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    assert mm == forward_flops([12], config).dense


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
        ("NVIDIA H100 80GB HBM3", torch.float32, 67.0),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H200", torch.float16, 989.0),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
        ("NVIDIA A10", torch.bfloat16, 125.0),
        ("NVIDIA L40S", torch.bfloat16, 362.0),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.0),
        ("Tesla V100-SXM2-16GB", torch.float16, 125.0),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 units: measured instead
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_gpu_peak_table(name: str, dtype: torch.dtype, expected: float | None) -> None:
    peak = table_peak(name, dtype)
    assert (peak.tflops if peak else None) == expected
    if peak:
        assert "datasheet" in peak.source


def test_gpu_peak_tf32() -> None:
    peak = table_peak("NVIDIA A100-SXM4-40GB", torch.float32, tf32=True)
    assert peak is not None and peak.tflops == 156.0 and "tf32" in peak.source


def test_compare_refuses_unlike() -> None:
    cpu = torch.device("cpu")
    check_like_with_like((torch.float32, cpu), (torch.float32, cpu))
    with pytest.raises(BenchError, match="unlike dtypes"):
        check_like_with_like((torch.bfloat16, cpu), (torch.float32, cpu))
    with pytest.raises(BenchError, match="unlike devices"):
        check_like_with_like((torch.float32, cpu), (torch.float32, torch.device("meta")))


def test_compare_refuses_amplify() -> None:
    with pytest.raises(BackendError, match="ESM-2 models only"):
        require_transformers("amplify")


def test_synthetic_workload() -> None:
    w = synthetic_workload(30, tokens_per_batch=100, n_batches=3, seed=1)
    assert len(w.sequences) == 3 * 3  # 100 // 32 sequences per batch
    assert all(len(s) == 30 and set(s) <= set(AMINO_ACIDS) for s in w.sequences)
    assert w.sequences == synthetic_workload(30, 100, 3, seed=1).sequences
    assert w.n_residues == 270 and w.length == 30


def test_padded_batches_respect_budget() -> None:
    lengths = [10, 50, 3, 48, 20, 100]
    batches = padded_batches(lengths, budget=110)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] + 2 for i in b)
        assert len(b) == 1 or len(b) * longest <= 110
    assert batches[0] == [5]  # longest first, alone (102 tokens)


def test_runners_take_turns_in_the_timed_passes() -> None:
    """Each round times every runner once, in an order reversed every round, so a load that comes
    and goes on a shared machine cannot fall on one runner's passes only."""
    calls: list[str] = []

    def runner(name: str) -> Runner:
        def embed(seqs: list[str], budget: int) -> np.ndarray:
            calls.append(name)
            return np.zeros((len(seqs), 4), dtype=np.float32)

        return Runner(name, embed, lambda lengths, budget: (1, sum(lengths) + 2 * len(lengths)), 0,
                      torch.float32, torch.device("cpu"))  # fmt: skip

    w = synthetic_workload(30, tokens_per_batch=100, n_batches=3, seed=1)
    peak = Peak(1.0, "test")
    results = bench_module.measure([runner("a"), runner("b")], w, 100, 3, 10**9, peak)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-ups, then the rounds
    assert [s.runner for s, _ in results] == ["a", "b"]
    assert all(len(s.times_s) == 3 and emb.shape == (9, 4) for s, emb in results)


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_json_schema_with_hf_compare() -> None:
    result = invoke(
        "--model", ESM2_CKPT, "--device", "cpu", "--lengths", "8,20", "--compare", "hf", "--json", *FAST
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "protembed-bench/1"
    assert set(data) == {
        "schema",
        "versions",
        "model",
        "device",
        "peak",
        "memory_metric",
        "settings",
        "results",
    }
    assert data["model"]["family"] == "esm2" and data["model"]["random_weights"] is False
    assert data["device"]["type"] == "cpu" and data["device"]["dtype"] == "float32"
    assert data["peak"]["tflops"] > 0 and "measured" in data["peak"]["source"]
    assert data["memory_metric"] == "cpu_peak_rss_process"
    assert [r["length"] for r in data["results"]] == [8, 20]
    for r in data["results"]:
        assert r["tokens_per_batch"] == 64 and r["n_tokens"] == r["n_residues"] + 2 * r["n_seqs"]
        assert r["gflop"] > r["attention_gflop"] > 0
        for stats in (r["protembed"], r["reference"]):
            assert set(stats) == {
                "runner",
                "times_s",
                "n_batches",
                "padding_fraction",
                "residues_per_s",
                "seqs_per_s",
                "batch_latency_ms",
                "tflops",
                "pct_of_peak",
                "peak_memory_mb",
            }
            assert len(stats["times_s"]) == 1 and stats["residues_per_s"] > 0 and stats["tflops"] > 0
            assert set(stats["batch_latency_ms"]) == {"median", "min", "max"}
        assert r["protembed"]["runner"] == "protembed" and r["reference"]["runner"] == "hf"
        assert r["protembed"]["padding_fraction"] == 0.0
        assert r["speedup"] > 0
        assert r["max_abs_diff"] < 1e-4  # same weights, fp32: the two implementations agree
        assert r["parity_tolerance"] >= 1e-3  # float32: 1e-3 x max(1, largest |value|)


def test_fasta_workload_counts_tokens_and_cuts_between_them(tmp_path) -> None:
    fasta = tmp_path / "masks.fa"
    fasta.write_text(">a\nMK<mask>AY*\n>b\nAC<mask><mask>DEFG\n>c\nmsq\n")
    w = fasta_workload(fasta, ESM2, max_residues=4)
    assert w.lengths == [4, 4, 3] and w.n_residues == 11 and w.truncated == 2
    assert w.sequences == ["MK<mask>A", "AC<mask><mask>", "msq"]  # a cut never splits `<mask>`
    assert [ESM2.validate(s) for s in w.sequences] == w.lengths


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_compare_hf_feeds_the_same_tokens(tmp_path) -> None:
    # EsmTokenizer turns "JJJ" into one <unk> and splits "<MASK>"; protembed makes three <unk> and
    # one <mask>. The reference must see protembed's tokens, or the parity figure compares two inputs.
    fasta = tmp_path / "odd.fa"
    fasta.write_text(">a\nMKTJJJAYIAKQR\n>b\nMK<mask>AYIAK<MASK>QRQ\n>c\nACDEFGHIKLMNPQRSTVWY\n")
    result = invoke("--model", ESM2_CKPT, "--device", "cpu", "--input", str(fasta), "--compare", "hf",
                    "--json", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    [r] = json.loads(result.stdout)["results"]
    assert r["n_residues"] == 13 + 12 + 20
    assert r["max_abs_diff"] < 1e-4 and "warning" not in result.stderr


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_compare_hf_warns_on_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench_module.PARITY_TOLERANCE, torch.float32, 0.0)  # any rounding now disagrees
    result = invoke("--model", ESM2_CKPT, "--device", "cpu", "--lengths", "8", "--compare", "hf", *FAST)
    assert result.exit_code == 0, result.output
    assert "warning: 64 · L=8: protembed and hf differ by max |Δ|" in result.stderr
    assert " !" in result.stdout


def test_random_weights_fasta_table(tmp_path) -> None:
    fasta = tmp_path / "seqs.fa"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nmseqk*\n>c\nACDEFGHIKLMNPQRSTVWY\n")
    result = invoke(
        "--model", AMPLIFY_CKPT, "--random-weights", "--device", "cpu", "--input", str(fasta), *FAST
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps at 80 columns
    assert "random weights" in text and "protembed" in text
    assert "64 · seqs.fa" in text and "(3 sequences)" in text


def unboxed(text: str) -> str:
    """A usage error's text without rich's box and line breaks."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_no_json_without_flag_and_bad_options() -> None:
    too_long = invoke("--model", ESM2_CKPT, "--lengths", "5000", *FAST)
    assert too_long.exit_code == 1 and "exceeds the model's maximum of 1022" in too_long.output
    both = invoke("--model", ESM2_CKPT, "--lengths", "8", "--input", __file__, *FAST)
    assert both.exit_code == 2
    bad = invoke("--model", ESM2_CKPT, "--lengths", "8,x", *FAST)
    assert bad.exit_code == 2
    trailing = invoke("--model", ESM2_CKPT, "--lengths", "16,", *FAST)
    assert trailing.exit_code == 2 and "got an empty item in '16,'" in unboxed(trailing.output)
    budget = invoke("--model", ESM2_CKPT, "--lengths", "8", "--tokens-per-batch", "99999999999", *FAST)
    assert budget.exit_code == 2 and "99999999999 is more than 16777216" in unboxed(budget.output)
    threads = invoke("--model", ESM2_CKPT, "--lengths", "8", "--threads", "100000", *FAST)  # torch crashed
    assert (
        threads.exit_code == 1
        and f"--threads 100000: this machine has {os.cpu_count()} CPUs" in threads.output
    )
    huge_seed = invoke("--model", ESM2_CKPT, "--random-weights", "--seed", str(2**64), *FAST)
    assert huge_seed.exit_code == 2 and "Traceback" not in huge_seed.output
    workers = invoke("--model", ESM2_CKPT, "--device", "cpu:2", *FAST)
    assert workers.exit_code == 1 and "--device cpu:N (worker processes) is for embed" in workers.output
    unknown = invoke("--model", "esm2-9m", "--random-weights", *FAST)
    assert unknown.exit_code == 1 and "unknown model 'esm2-9m'" in unknown.output
    here = Path(__file__).parent
    for path, why in [
        (here / "none.fa", "no such file"),
        (here, "is a folder"),
        ("-", "bench reads a file, not stdin"),
    ]:
        r = invoke("--model", ESM2_CKPT, "--input", str(path), *FAST)  # an input mistake, as in embed
        assert r.exit_code == 1 and f"error: --input {path}: {why}" in r.output, r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_missing_is_an_error() -> None:
    result = invoke("--model", ESM2_CKPT, "--device", "cuda", "--lengths", "8", *FAST)
    assert result.exit_code == 1 and "CUDA is not available" in result.output


def test_compare_hf_on_amplify_is_an_error() -> None:
    result = invoke("--model", AMPLIFY_CKPT, "--device", "cpu", "--lengths", "8", "--compare", "hf", *FAST)
    assert result.exit_code == 1
    assert "no Hugging Face transformers implementation" in result.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs protembed[plot]")
def test_plot(tmp_path) -> None:
    png = tmp_path / "bench.png"
    result = invoke("--model", ESM2_CKPT, "--device", "cpu", "--lengths", "8,16", "--plot", str(png), *FAST)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = invoke("--model", ESM2_CKPT, "--plot", str(png), *FAST)  # refused before anything runs
    assert again.exit_code == 1 and f"{png}: exists; pass --overwrite to replace it" in again.output
    png.write_bytes(b"old")
    replaced = invoke("--model", ESM2_CKPT, "--lengths", "8", "--plot", str(png), "--overwrite", *FAST)
    assert replaced.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    for name in ("bench.txt", "bench"):  # refused before anything runs
        result = invoke("--model", ESM2_CKPT, "--plot", str(tmp_path / name), *FAST)
        assert result.exit_code == 1 and "the plot is a PNG; name the file *.png" in result.output


def test_plot_without_matplotlib(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    png = tmp_path / "bench.png"
    result = invoke("--model", ESM2_CKPT, "--device", "cpu", "--lengths", "8", "--plot", str(png), *FAST)
    assert result.exit_code == 1 and "--plot needs matplotlib: pip install 'protembed[plot]'" in result.output
    assert not png.exists()
