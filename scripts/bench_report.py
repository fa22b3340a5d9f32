#!/usr/bin/env python
"""Turn the outputs of scripts/bench_readme.sh into the README's markdown tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent / "shared" / "bench"))
import benchlib as bl  # noqa: E402

MODELS = [
    ("esm2-8m", "8M", "realistic256"),
    ("esm2-35m", "35M", "realistic256"),
    ("esm2-150m", "150M", "realistic64"),
]
PEERS = [  # (method, result file): optional peers, shown when scripts/bench_readme.sh ran them
    ("HF naive, batches of 8 in file order, sdpa (forward only)", "hf-{hf}-{fasta}-naive.json"),
    ("fair-esm, extract.py batching (forward only)", "fairesm-{hf}-{fasta}.json"),
    ("esm-cpp 0.2.1 forward_scheduled, fp32 (forward only)", "esmcpp-{hf}-{fasta}.json"),
]
COLUMNS = ["model", "input", "method", "residues/s", "wall s", "GFLOP/s", "% of fp32 peak",
           "vs HF sorted fp32", "peak RSS MB"]  # fmt: skip


def load(path: Path) -> dict:
    return json.loads(path.read_text().strip().splitlines()[-1])


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results")
    peak = load(out / "peak.jsonl")
    mkl32, p16 = peak["peak_gflops_fp32"], peak["peak_gflops_bf16"]
    best = load(out / "peak-protembed.json")  # the faster of torch.matmul and oneDNN
    p32 = max(mkl32, best["peak_gflops_fp32"])
    print(f"matmul peak on this machine (2 threads): fp32 {mkl32} GFLOP/s through torch.matmul "
          f"(bench_peak.py), {best['peak_gflops_fp32']} GFLOP/s best ({best['source']}); "
          f"bf16 {p16} GFLOP/s. '% of fp32 peak' is of {p32}.\n")  # fmt: skip
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for model, hf, fasta in MODELS:
        lengths = [len(s) for _, s in bl.read_fasta(f"../shared/bench/{fasta}.fasta")]
        flops = bl.flops(lengths, bl.MODELS[hf])["useful_flops"]
        n_res = sum(lengths)
        ref = load(out / f"hf-{hf}-{fasta}-fp32.json")
        base = ref["median_s"]
        rows = [("HF sorted 4096, sdpa (forward only)", base, ref["peak_rss_mb"])]
        b16 = load(out / f"hf-{hf}-{fasta}-bf16.json")
        name = "HF sorted 4096, sdpa, bf16 autocast (forward only)"
        rows.append((name, b16["median_s"], b16["peak_rss_mb"]))
        for name, path in PEERS:
            if (out / path.format(hf=hf, fasta=fasta)).exists():
                peer = load(out / path.format(hf=hf, fasta=fasta))
                rows.append((name, peer["median_s"], peer["peak_rss_mb"]))
        for dtype in ("float32", "bfloat16"):
            t = json.loads((out / f"{model}-{fasta}-{dtype}.time").read_text())
            rows.append((f"protembed embed, {dtype} (whole command)", t["wall_s"], t["max_rss_kb"] / 1024))
        for name, secs, rss in rows:
            gflops = flops / secs / 1e9
            print(f"| {model} | {fasta} | {name} | {n_res / secs:,.0f} | {secs:.1f} | {gflops:.0f} | "
                  f"{100 * gflops / p32:.0f} | {base / secs:.2f}x | {rss:,.0f} |")  # fmt: skip
    print("\nbfloat16 against float32 (mean embeddings, same random weights):\n")
    print("| model | max abs diff | min cosine | mean cosine |")
    print("|---|---|---|---|")
    for model, _, fasta in MODELS:
        with h5py.File(out / f"{model}-{fasta}-float32.h5") as a:
            x = a["mean"][:]
        with h5py.File(out / f"{model}-{fasta}-bfloat16.h5") as b:
            y = b["mean"][:]
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        print(f"| {model} | {np.abs(x - y).max():.3g} | {cos.min():.6f} | {cos.mean():.6f} |")
    wall = {
        tag: json.loads((out / f"esm2-35m-realistic256-float32-{tag}.time").read_text())["wall_s"]
        for tag in ("inprocess", "1worker", "2workers")
    }
    print(f"\nData-parallel machinery (esm2-35m, realistic256, one thread per worker, whole command): "
          f"in-process {wall['inprocess']:.1f} s, 1 worker process {wall['1worker']:.1f} s, "
          f"2 worker processes {wall['2workers']:.1f} s: "
          f"{wall['1worker'] / wall['2workers']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
