"""The public Python API: load a model by name, repo id or directory, and embed sequences.

>>> import protembed
>>> model = protembed.load_model("esm2-8m")
>>> out = model.embed(["MKTAYIAKQR", "MSEQ"], layers=[-1], per_residue=True)
>>> out.pooled["mean"].shape        # (2, 1, 320): sequences x layers x hidden
>>> out.residues[0].shape           # (10, 1, 320): residues x layers x hidden
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from protembed.alphabet import ALPHABETS, Alphabet
from protembed.batching import MAX_TOKEN_BUDGET, token_batches
from protembed.compute import run_batch
from protembed.errors import BackendError, InvalidSequenceError, OptionError, is_whole
from protembed.models.checkpoints import load_checkpoint, local_checkpoint, weights_sha256
from protembed.models.encoder import Encoder, resolve_layers
from protembed.pooling import POOLINGS, pooling_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    """The first CUDA device when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Embeddings:
    """Embeddings of a list of sequences, rows in input order.

    pooled: pooling name -> float32 array [n, K, D] (K = number of layers asked for).
    residues: per sequence, float32 [residues, K, D] (only with per_residue=True).
    layers: the resolved layer indices, in the order of the K axis.
    truncated: per sequence, whether it was cut to `max_residues` (default: the model's maximum).
    """

    pooled: dict[str, np.ndarray]
    layers: list[int]
    residues: list[np.ndarray] | None = None
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


@dataclass
class Model:
    """A loaded encoder with its tokenizer and provenance."""

    encoder: Encoder
    name: str
    source: str
    revision: str

    @property
    def alphabet(self) -> Alphabet:
        return ALPHABETS[self.encoder.config.family]

    @property
    def device(self) -> torch.device:
        return self.encoder.embed.weight.device

    def layers(self, spec: Sequence[int | str] | int | str = (-1,)) -> list[int]:
        """Resolve a layer list (negative, "final", "all") to non-negative indices."""
        try:
            return resolve_layers(spec, self.encoder.config)
        except ValueError as exc:
            raise OptionError(f"layers: {exc}") from None

    @torch.inference_mode()
    def embed(
        self,
        sequences: Sequence[str],
        layers: Sequence[int | str] | int | str = (-1,),
        pooling: Sequence[str] | str = ("mean",),
        per_residue: bool = False,
        tokens_per_batch: int = 8192,
        max_residues: int | None = None,
    ) -> Embeddings:
        """Embed sequences in memory; longer ones are truncated to `max_residues` (default and
        maximum: the model's). Each sequence is read as `embed` reads a record: spaces and line
        breaks are ignored and a final `*` is dropped."""
        if isinstance(sequences, (str, bytes)):
            raise TypeError("sequences: pass a list of sequences, not one string")
        sequences = list(sequences)  # a generator is read once
        for i, seq in enumerate(sequences):
            if not isinstance(seq, str):
                raise TypeError(f"sequences: item {i} is {type(seq).__name__}, not str")
            sequences[i] = seq = seq.replace(" ", "").replace("\r", "").replace("\n", "")
            if not seq:
                raise OptionError(f"sequences: sequence {i} is empty")
        pooling = pooling_names(pooling)
        bad = [p for p in pooling if p not in POOLINGS]
        if bad or not pooling:
            named = f"{', '.join(map(repr, bad))} is not" if bad else "name at least"
            raise OptionError(f"pooling: {named} one of {', '.join(POOLINGS)}")
        idx = self.layers(layers)
        if not isinstance(per_residue, (bool, np.bool_)):
            raise TypeError(f"per_residue: pass True or False, not {type(per_residue).__name__}")
        top = self.encoder.config.max_residues
        limit = top if max_residues is None else max_residues
        if not is_whole(limit) or not 1 <= limit <= top:
            raise OptionError(
                f"max_residues: {max_residues!r} must be a whole number in 1..{top} for this model"
            )
        if not is_whole(tokens_per_batch) or not 1 <= tokens_per_batch <= MAX_TOKEN_BUDGET:
            raise OptionError(
                f"tokens_per_batch: {tokens_per_batch!r} is not a whole number in 1..{MAX_TOKEN_BUDGET}"
            )
        limit = int(limit)
        tokens = []
        for i, s in enumerate(sequences):
            try:
                tokens.append(self.alphabet.encode(s))
            except InvalidSequenceError as exc:
                exc.record, exc.args = str(i), (f"sequences: sequence {i}: {exc}",)
                raise
        for i, t in enumerate(tokens):
            if t.size <= 2:  # BOS and EOS only: the sequence was just a '*'
                raise OptionError(f"sequences: sequence {i} is empty once its final '*' is dropped")
        truncated = np.array([t.size - 2 > limit for t in tokens], dtype=bool)
        tokens = [np.concatenate([t[: limit + 1], t[-1:]]) if cut else t for t, cut in zip(tokens, truncated)]
        d = self.encoder.config.d_model
        pooled = {p: np.zeros((len(tokens), len(idx), d), dtype=np.float32) for p in pooling}
        residues: list[np.ndarray] | None = [np.empty(0)] * len(tokens) if per_residue else None
        for rows in token_batches(np.array([t.size for t in tokens]), tokens_per_batch):
            result = run_batch(self.encoder, [tokens[r] for r in rows], idx, list(pooling), per_residue)
            for p in pooling:
                pooled[p][rows] = result.pooled[p]
            if residues is not None and result.residues is not None:
                for j, r in enumerate(rows):
                    residues[r] = result.residues[j]
        return Embeddings(pooled=pooled, layers=idx, residues=residues, truncated=truncated)


def check_device(device: str | torch.device | None, option: str = "device") -> torch.device:
    """The requested torch device, checked to exist; default: first GPU, else CPU. Errors name
    `option` (`--device` on the command line)."""
    if not isinstance(device, (str, torch.device, type(None))):
        raise TypeError(f"{option}: pass a name such as 'cpu' or 'cuda:0', not {type(device).__name__}")
    try:
        dev = torch.device(default_device() if device is None else device)
    except RuntimeError:
        dev = None
    what = f"{option} {str(device)!r}"
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index is not None):
        raise OptionError(f"unknown {what} (use cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"{what} requested but CUDA is not available")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise BackendError(f"{what} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


def load_model(
    model: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    revision: str | None = None,
    backend: str = "auto",
    compile: bool = False,
) -> Model:
    """Load a model by registry name (`esm2-650m`), Hub repo id or local checkpoint directory.

    A registry name or repo id that is not cached is downloaded first (unless HF_HUB_OFFLINE=1).
    `backend` and `compile` choose how it runs (see `protembed.backends`).
    """
    from protembed.backends import prepare, resolve_backend

    dtype_name = next((name for name, dt in DTYPES.items() if dtype in (name, dt)), None)
    if dtype_name is None:
        raise OptionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype_name]
    dev = check_device(device)
    path = local_checkpoint(str(model), revision)
    if path is not None:
        name, source, rev, ckpt = path.name, str(path), weights_sha256(path), path
    else:
        from protembed.hub import resolve_model

        resolved = resolve_model(str(model), revision=revision)
        name, source, rev, ckpt = (
            resolved.name or str(model),
            resolved.source,
            resolved.revision,
            resolved.path,
        )
    runs_on = resolve_backend(backend, str(dev), dtype_name, compile)
    encoder = load_checkpoint(ckpt, dtype=torch_dtype, device=dev)
    encoder = prepare(encoder, runs_on, dtype_name, compile)
    return Model(encoder=encoder, name=name, source=source, revision=rev)
