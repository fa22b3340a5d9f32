"""What `embed` settles before it reads the input: where the model is, whether the options fit, and
the resulting `Plan`.

Shared with `finetune`, which embeds through the same pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protembed.alphabet import Alphabet
from protembed.batching import MAX_TOKEN_BUDGET
from protembed.cache import check_replaceable, writable
from protembed.compute import COMPUTE_DTYPES
from protembed.errors import OptionError, StoreError, is_whole
from protembed.models import checkpoints
from protembed.models.encoder import EncoderConfig, resolve_layers
from protembed.pooling import POOLINGS
from protembed.store import COMPRESSIONS, STORE_DTYPES

LONG_POLICIES = ("truncate", "window")


@dataclass
class ModelRef:
    """A model located on disk, with its architecture read and nothing loaded."""

    name: str
    source: str
    revision: str
    path: Path
    config: EncoderConfig


@dataclass
class Plan:
    """The resolved options of one `embed` run."""

    ref: ModelRef
    alphabet: Alphabet
    layers: list[int]
    poolings: list[str]
    per_residue: bool
    dtype: str
    store_dtype: str
    tokens_per_batch: int | None
    limit: int
    long_policy: str
    device: str | None
    overwrite: bool
    compression: str | None
    backend: str = "torch"
    compile: bool = False

    def stored_lengths(self, n_residues: np.ndarray) -> np.ndarray:
        """Residues stored per row: all of them in window mode, else at most the length limit."""
        return n_residues if self.long_policy == "window" else np.minimum(n_residues, self.limit)

    def token_counts(self, n_residues: np.ndarray, skipped: np.ndarray) -> np.ndarray:
        """Tokens each row puts through the model (0 for skipped rows): what balances the work."""
        return np.where(skipped, 0, self.stored_lengths(n_residues) + 2)


def locate_model(
    model: str,
    revision: str | None = None,
    progress: bool = True,
    on_config: Callable[[EncoderConfig], None] | None = None,
    cache_dir: Path | None = None,
) -> ModelRef:
    """Registry name, Hub repo id (downloaded if not cached) or local directory -> `ModelRef`.

    `on_config` sees a downloaded model's configuration before its weights are fetched;
    `cache_dir` is the protembed cache that remembers a local checkpoint's weights digest.
    """
    path = checkpoints.local_checkpoint(model, revision)
    if path is not None:
        config = checkpoints.read_config(path)
        return ModelRef(model, str(path), checkpoints.weights_sha256(path, cache_dir), path, config)
    from protembed.hub import resolve_model

    resolved = resolve_model(model, revision=revision, progress=progress, on_config=on_config)
    config = checkpoints.read_config(resolved.path)
    return ModelRef(resolved.name or model, resolved.source, resolved.revision, resolved.path, config)


def check_options(
    poolings: Sequence[str],
    long_policy: str,
    dtype: str,
    store_dtype: str,
    on_invalid: str,
    tokens_per_batch: int | None = None,
    compression: str | None = None,
) -> None:
    """Refuse impossible option values before anything is read."""
    if tokens_per_batch is not None and (not is_whole(tokens_per_batch) or tokens_per_batch < 1):
        raise OptionError(f"--tokens-per-batch {tokens_per_batch} must be at least 1")
    if tokens_per_batch is not None and tokens_per_batch > MAX_TOKEN_BUDGET:
        raise OptionError(
            f"--tokens-per-batch {tokens_per_batch} is more than a device holds (at most {MAX_TOKEN_BUDGET})"
        )
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        given = ",".join(bad) or "(none)"
        raise OptionError(f"--pool {given!r} is not one of {', '.join(POOLINGS)} (or a comma list of them)")
    for value, allowed, what in (
        (long_policy, LONG_POLICIES, "--long"),
        (dtype, tuple(COMPUTE_DTYPES), "--dtype"),
        (store_dtype, tuple(STORE_DTYPES), "--store-dtype"),
        (on_invalid, ("error", "skip"), "--on-invalid"),
        (compression, COMPRESSIONS, "--compression"),
    ):
        if value not in allowed:
            raise OptionError(f"{what} {value!r} is not one of {', '.join(map(str, allowed))}")


def check_model_options(
    cfg: EncoderConfig, name: str, layers: Sequence[int | str] | int | str, max_length: int | None
) -> tuple[list[int], int]:
    """Resolved layers and residue limit for a model; OptionError when they do not fit it."""
    try:
        layer_idx = resolve_layers(layers, cfg)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    limit = cfg.max_residues if max_length is None else max_length
    if not is_whole(limit) or not 1 <= limit <= cfg.max_residues:
        raise OptionError(f"--max-length {limit} is outside 1..{cfg.max_residues} for {name}")
    return layer_idx, limit


def check_output_folder(output: Path) -> None:
    """StoreError unless `output`'s folder exists and takes new files (its lock file, at least)."""
    if output.is_dir():
        raise StoreError(f"{output}: cannot write output: is a folder")
    check_replaceable(output)
    folder = output.resolve().parent
    if not folder.is_dir():
        where = output.parent
        why = f"{where} is not a folder" if folder.exists() else f"folder {where} does not exist"
        raise StoreError(f"{output}: cannot write output: {why}")
    if not writable(folder):
        raise StoreError(f"{output}: cannot write output: permission denied (folder {output.parent})")
