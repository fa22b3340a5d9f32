#!/usr/bin/env python
"""Time esm-cpp's packed fp32 forward on a FASTA file, for the README's peer comparison.

esm-cpp (https://pypi.org/project/esm-cpp/) needs numpy < 2, so it runs in its own environment:

    python -m venv /tmp/esmcpp && /tmp/esmcpp/bin/pip install esm-cpp==0.2.1
    /tmp/esmcpp/bin/python scripts/bench_esmcpp.py FASTA CHECKPOINT_DIR [--repeats 2]

CHECKPOINT_DIR holds a Hub-layout `model.safetensors` (e.g. from scripts/random_checkpoint.py).
Times `Model.forward_scheduled` over every sequence (esm-cpp's own length-bucketed packing; it
returns logits, so the work is the encoder plus a 33-wide LM head), after one untimed pass over the
first 8 sequences. Only the standard library, numpy and esm_cpp are imported. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import esm_cpp
import numpy as np


def read_fasta(path: Path) -> list[str]:
    seqs: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            seqs.append("")
        elif seqs:
            seqs[-1] += line.strip()
    return seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fasta", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    seqs = read_fasta(args.fasta)
    t0 = time.perf_counter()
    model = esm_cpp.Model.load_from_safetensors(str(args.checkpoint / "model.safetensors"))
    load_s = time.perf_counter() - t0
    tokenizer = esm_cpp.Tokenizer()
    ids = [np.asarray(tokenizer.encode(s), dtype=np.int32) for s in seqs]
    model.forward_scheduled(ids[:8])
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.forward_scheduled(ids)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    n_res = sum(len(s) for s in seqs)
    record = {
        "method": "esm-cpp-forward_scheduled-fp32",
        "esm_cpp": esm_cpp.__version__,
        "isa": esm_cpp.current_isa(),
        "threads": esm_cpp.Model.num_threads,
        "fasta": str(args.fasta),
        "n_seq": len(seqs),
        "n_res": n_res,
        "load_s": round(load_s, 3),
        "times_s": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "residues_per_s": round(n_res / median, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    json.dump(record, sys.stdout)
    print()


if __name__ == "__main__":
    main()
