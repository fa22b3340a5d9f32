"""Fit a FLIP head on frozen features and evaluate it; `saved_head` writes it to disk and applies it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protembed import __version__
from protembed.api import default_device
from protembed.embed_setup import locate_model
from protembed.errors import OptionError
from protembed.feature_cache import model_features
from protembed.features import Features, Ragged, onehot_flat, onehot_residues
from protembed.flip import (
    IGNORE,
    PARTS,
    TEST,
    Dataset,
    FlipError,
    Task,
)
from protembed.heads import (
    DEFAULT_HEAD,
    RESIDUE_HEADS,
    SEQUENCE_HEADS,
    build_head,
    decode,
    fit_ridge,
    head_config,
    predict,
    score,
    train,
)
from protembed.metrics import clean, floor
from protembed.models.encoder import resolve_layers

MAX_ONEHOT = 1024  # flattened one-hot features cover at most this many positions
FORMAT = "protembed-flip-head/1"


@dataclass
class Run:
    """A fitted head with its config (saved as JSON) and its test-split predictions."""

    config: dict[str, Any]
    head: nn.Module
    test_ids: list[str]
    test_seqs: list[str]
    test_true: list[np.ndarray]
    test_pred: list[np.ndarray]


def check_head(task: Task, head: str | None) -> str:
    """The head to use for a task (its default when None); FlipError if it does not fit the task's level."""
    name = head or DEFAULT_HEAD[task.level]
    allowed = SEQUENCE_HEADS if task.level == "sequence" else RESIDUE_HEADS
    if name not in allowed:
        raise FlipError(
            f"head '{name}' does not fit {task.level}-level task {task.name} "
            f"(choose from {', '.join(allowed)})"
        )
    return name


def featurize(
    seqs: list[str],
    task: Task,
    model_cfg: dict[str, Any] | None,
    onehot_length: int | None,
    cache_dir: Path,
    device: str,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "auto",
    quiet: bool = False,
    features_dir: Path | None = None,
    layer_from: str = "--layer",
) -> Features:
    """One-hot features, or the cached embeddings of the model described by `model_cfg` (`quiet`:
    no notice or progress bar when the model is downloaded first). The embeddings are cached in
    `features_dir` (default: `cache_dir`, which also remembers a local checkpoint's digest).
    `layer_from` names where the layer came from in an error about it."""
    if model_cfg is None:
        if task.level == "residue":
            return onehot_residues(seqs)
        assert onehot_length is not None
        return onehot_flat(seqs, onehot_length)
    dtype = "bfloat16" if backend == "te" else "float32"  # Transformer Engine runs in half precision
    expected = model_cfg.get("revision")  # a Hub commit, or a local checkpoint's weights digest
    digest = expected if expected and expected.startswith("sha256:") else None
    revision = None if digest else expected
    ref = locate_model(model_cfg["ref"], revision, progress=not quiet, cache_dir=cache_dir)
    if digest and digest != ref.revision:
        raise FlipError(
            f"the weights in {ref.source} ({ref.revision[:19]}…) are not the ones the head was trained on"
            f" ({digest[:19]}…)"
        )
    model_cfg.update(name=ref.name, source=ref.source, revision=ref.revision)
    try:
        layer = model_cfg["layer_index"] = resolve_layers([model_cfg["layer"]], ref.config)[0]  # -1 resolved
    except ValueError as exc:
        raise OptionError(f"{layer_from}: {exc}") from None
    # The features are computed by the embed pipeline: "cuda" (no index) means every GPU.
    embed_device = None if device == "cuda" else device
    return model_features(
        seqs, ref, layer, task.level == "residue", features_dir or cache_dir,
        dtype=dtype, device=embed_device, backend=backend, progress=progress, memo_dir=cache_dir,
    )  # fmt: skip


def inputs_and_targets(
    data: Dataset, feats: Features
) -> tuple[np.ndarray | Ragged, list[np.ndarray] | np.ndarray, int]:
    """Head inputs, targets aligned with them, and how many labelled residues fell past a truncation."""
    if data.task.level == "sequence":
        assert feats.pooled is not None and data.targets is not None
        return feats.pooled, data.targets, 0
    assert feats.residues is not None and data.labels is not None
    lengths = feats.residues.lengths()
    labels = [lab[: int(n)] for lab, n in zip(data.labels, lengths)]
    dropped = sum(int((lab[int(n) :] != IGNORE).sum()) for lab, n in zip(data.labels, lengths))
    return feats.residues, labels, dropped


def fit_head(
    name: str,
    task: Task,
    x: np.ndarray | Ragged,
    y: Any,
    rows: dict[str, np.ndarray],
    *,
    ridge_alpha: float,
    device: str,
    **train_kw: Any,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Ridge in closed form on train + validation, or a trained head with early stopping on validation."""
    if name == "ridge":
        assert isinstance(x, np.ndarray)
        fit_rows = np.concatenate([rows["train"], rows["validation"]])
        yt = y[fit_rows]
        if task.kind == "classification":
            yt = np.eye(task.n_outputs)[yt] * 2.0 - 1.0  # +-1 targets, as RidgeClassifier
        return fit_ridge(x[fit_rows], yt, ridge_alpha, device), []
    module = build_head(head_config(name, _dim(x), task.n_outputs))
    dev = torch.device(device)
    history = train(module, x, y, rows["train"], rows["validation"], kind=task.kind, device=dev, **train_kw)
    return module, history


def _dim(x: np.ndarray | Ragged) -> int:
    return int(x.shape[1]) if isinstance(x, np.ndarray) else x.dim


def finetune(
    data: Dataset,
    *,
    model: str | None = None,
    head: str | None = None,
    layer: int = -1,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    patience: int = 5,
    ridge_alpha: float = 1.0,
    device: str | None = None,
    backend: str = "auto",
    cache_dir: Path,
    on_embed: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, float, dict[str, float]], None] | None = None,
    quiet: bool = False,
) -> Run:
    """Fit a head on `data`'s train split (ridge: train + validation), evaluate on its test split.

    model=None means one-hot features; otherwise a registry name, Hub repo id or checkpoint directory.
    """
    task, head_name, dev = data.task, check_head(data.task, head), device or default_device()
    counts = data.counts()
    if counts["train"] == 0 or counts["test"] == 0:
        found = ", ".join(f"{n} {part}" for part, n in counts.items())
        raise FlipError(f"{task.name}/{data.split} needs train and test records (found {found})")
    if head_name != "ridge" and counts["validation"] == 0:
        raise FlipError(f"{task.name}/{data.split} has no validation records for early stopping")
    t0 = time.perf_counter()
    rows = {name: np.flatnonzero(data.part == i) for i, name in enumerate(PARTS)}
    fit_rows = np.flatnonzero(data.part != TEST) if head_name == "ridge" else rows["train"]
    onehot_length = None
    if model is None and task.level == "sequence":  # pad to the longest sequence the head is fit on
        onehot_length = min(MAX_ONEHOT, max(len(data.seqs[i]) for i in np.flatnonzero(data.part != TEST)))
    model_cfg = None if model is None else {"ref": _model_ref(model), "layer": layer}
    feats = featurize(data.seqs, task, model_cfg, onehot_length, cache_dir, dev, on_embed, backend, quiet)
    t_features = time.perf_counter() - t0
    x, y, dropped = inputs_and_targets(data, feats)
    if task.level == "residue":
        for part in ("train", "validation", "test"):
            if (part != "validation" or head_name != "ridge") and not any(
                (y[int(i)] != IGNORE).any() for i in rows[part]
            ):
                raise FlipError(f"{task.name}/{data.split}: no labelled residues in the {part} records")
    scale = (0.0, 1.0)
    targets = y  # as read: the saved "measured" values, the floor and the reported metrics use them
    if task.kind == "regression":  # heads see standardized targets
        yt = np.asarray(y, dtype=np.float64)[fit_rows]  # float32 sums of squares overflow from ~1e19
        scale = (float(yt.mean()), float(yt.std()) or 1.0)
        y = ((np.asarray(y, dtype=np.float64) - scale[0]) / scale[1]).astype(np.float32)

    torch.manual_seed(seed)
    train_kw = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "patience": patience}
    module, history = fit_head(
        head_name,
        task,
        x,
        y,
        rows,
        ridge_alpha=ridge_alpha,
        device=dev,
        scale=scale,
        on_epoch=on_epoch,
        **train_kw,
    )
    module.to(dev)

    def evaluate_rows(r: np.ndarray) -> tuple[list[np.ndarray], dict[str, float]]:
        preds = decode(task.kind, predict(module, x, r, dev), scale)
        return preds, score(task.kind, preds, [targets[int(i)] for i in r], (0.0, 1.0))

    test_pred, test_metrics = evaluate_rows(rows["test"])
    val_metrics = None if head_name == "ridge" else evaluate_rows(rows["validation"])[1]
    truth = [np.atleast_1d(np.asarray(targets[int(i)])) for i in range(len(data.ids))]  # real units
    base = floor(task.kind, [truth[i] for i in rows["train"]], [truth[i] for i in rows["test"]],
                 per_residue=task.level == "residue")  # fmt: skip
    if task.level == "residue":  # saved predictions: every residue, '-' past the features' reach
        assert data.labels is not None
        truth = list(data.labels)
        test_pred = [np.pad(p, (0, len(truth[int(i)]) - len(p)), constant_values=IGNORE)
                     for p, i in zip(test_pred, rows["test"])]  # fmt: skip
    best = next((h for h in reversed(history) if h["best"]), None)
    config = {
        "format": FORMAT, "protembed_version": __version__,
        "task": task.name, "split": data.split, "level": task.level, "kind": task.kind,
        "classes": list(task.classes), "unit": task.unit,
        "features": "onehot" if model_cfg is None else "model", "model": model_cfg,
        "onehot_length": onehot_length,
        "head": head_name, "head_config": head_config(head_name, feats.dim, task.n_outputs),
        "target_scale": list(scale),
        "training": {**({k: None for k in train_kw} if head_name == "ridge" else train_kw),  # closed form
                     "ridge_alpha": ridge_alpha if head_name == "ridge" else None,
                     "fit_on": "train+validation" if head_name == "ridge" else "train",
                     "epochs_run": len(history), "best_epoch": int(best["epoch"]) if best else None},
        "counts": counts,
        "truncated_sequences": int(feats.truncated.sum()), "dropped_residue_labels": dropped,
        "metrics": {"test": clean(test_metrics), "validation": clean(val_metrics) if val_metrics else None,
                    "floor": clean(base),
                    "floor_kind": "train mean" if task.kind == "regression" else "majority class"},
        "seconds": {"features": round(t_features, 2), "total": round(time.perf_counter() - t0, 2)},
        "history": [clean(h) for h in history],
    }  # fmt: skip
    test = [int(i) for i in rows["test"]]
    return Run(config, module, [data.ids[i] for i in test], [data.seqs[i] for i in test],
               [truth[i] for i in test], test_pred)  # fmt: skip


def _model_ref(model: str) -> str:
    path = Path(model)
    return str(path.resolve()) if path.is_dir() else model
