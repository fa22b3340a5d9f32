"""The published checkpoints protembed knows by name: one table, one lookup."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """A published checkpoint: where it lives on the Hub and its shape."""

    name: str
    repo_id: str
    family: str  # "esm2" | "amplify"
    n_layers: int
    d_model: int
    n_heads: int
    d_ffn: int
    n_params: int  # encoder + LM head, as published in the model name
    max_residues: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo("esm2-8m", "facebook/esm2_t6_8M_UR50D", "esm2", 6, 320, 20, 1280, 7_500_000, 1022),
        ModelInfo("esm2-35m", "facebook/esm2_t12_35M_UR50D", "esm2", 12, 480, 20, 1920, 33_500_000, 1022),
        ModelInfo("esm2-150m", "facebook/esm2_t30_150M_UR50D", "esm2", 30, 640, 20, 2560, 148_100_000, 1022),
        ModelInfo("esm2-650m", "facebook/esm2_t33_650M_UR50D", "esm2", 33, 1280, 20, 5120, 651_000_000, 1022),
        ModelInfo("esm2-3b", "facebook/esm2_t36_3B_UR50D", "esm2", 36, 2560, 40, 10240, 2_839_000_000, 1022),
        ModelInfo(
            "esm2-15b", "facebook/esm2_t48_15B_UR50D", "esm2", 48, 5120, 40, 20480, 15_129_000_000, 1022
        ),
        ModelInfo(
            "amplify-120m", "chandar-lab/AMPLIFY_120M", "amplify", 24, 640, 10, 1712, 118_300_000, 2046
        ),
        ModelInfo(
            "amplify-350m", "chandar-lab/AMPLIFY_350M", "amplify", 32, 960, 15, 2560, 354_000_000, 2046
        ),
    )
}

DEFAULT_MODEL = "esm2-650m"


def lookup(name: str) -> ModelInfo | None:
    """Registry entry by name (case-insensitive) or by exact Hub repo id; None when not listed."""
    key = name.lower()
    if key in MODELS:
        return MODELS[key]
    for info in MODELS.values():
        if info.repo_id.lower() == key:
            return info
    return None


def suggest(name: str, n: int = 3) -> list[str]:
    """Closest registry names to a mistyped one, best first."""
    names = list(MODELS)
    close = difflib.get_close_matches(name.lower(), names, n=n, cutoff=0.4)
    if not close:
        close = [m for m in names if m.split("-")[0] in name.lower()][:n]
    return close
