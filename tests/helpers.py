"""Shared test helpers: fixture paths and a runner for packed forwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from protembed.batching import pack
from protembed.models.encoder import Encoder, EncoderOutput

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
FIXTURE_NAMES = ("esm2_t3_h64", "amplify_l3_h64")


def fixture_dir(name: str) -> Path:
    return FIXTURES / name


def reference(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(reference.json, reference.npz arrays) of a fixture model."""
    d = fixture_dir(name)
    meta = json.loads((d / "reference.json").read_text())
    with np.load(d / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def run_packed(
    model: Encoder, token_arrays: list[np.ndarray], layers: list[int], logits: bool = False
) -> tuple[list[EncoderOutput], list[int]]:
    """Run several sequences packed in one batch; returns the output and each one's token bounds."""
    batch = pack(token_arrays)
    with torch.inference_mode():
        out = model(batch.tokens, batch.packing, layers, return_logits=logits)
    cu = batch.packing.cu_seqlens.tolist()
    return [out], cu


def rows_written(path: Path) -> int:
    """Rows an embeddings file marks as written so far (0 while it does not exist yet)."""
    try:
        with h5py.File(path, "r") as f:
            return int(f["written"][:].sum())
    except (OSError, KeyError):
        return 0


def one_line_error(result: Any, message: str) -> None:
    """A CLI result (CliRunner) that failed with exit 1 and one output line holding `message`."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output


def damage_chunk(path: Path, dataset: str, chunk: int = 0) -> None:
    """Overwrite bytes inside one compressed chunk of `dataset`: reading it then fails in the filter."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 4)  # inside this chunk only
        raw.write(b"\xff" * min(64, max(1, info.size // 2)))
