"""Metrics of the ESM-2nv card and FLIP: accuracy %, RMSE, Spearman, plus the floor a trivial model gets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from protembed.flip import IGNORE


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # first index of each run of equal values, and the run boundaries
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(pred: np.ndarray, true: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant or holds a NaN."""
    if (
        np.isnan(np.asarray(pred, dtype=np.float64)).any()
        or np.isnan(np.asarray(true, dtype=np.float64)).any()
    ):
        return float("nan")
    return pearson(rankdata(pred), rankdata(true))


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff)))


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Percent correct over labels that are not IGNORE."""
    keep = true != IGNORE
    n = int(keep.sum())
    return float(100.0 * (pred[keep] == true[keep]).sum() / n) if n else float("nan")


def confusion(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true class, predicted class] where both are set (not IGNORE: an unlabelled residue,
    or one past the features' reach, which has no prediction)."""
    keep = (true != IGNORE) & (pred != IGNORE)
    flat = true[keep].astype(np.int64) * n_classes + pred[keep].astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def sequence_accuracy(preds: Sequence[np.ndarray], trues: Sequence[np.ndarray]) -> float:
    """Percent correct per sequence (labelled residues only), averaged over sequences with any label.

    This is how BioNeMo scores per-residue tasks (and so the ESM-2nv card's accuracies); pooled
    `accuracy` weights every residue equally instead, so long sequences count for more.
    """
    per_seq = [accuracy(p, t) for p, t in zip(preds, trues) if (t != IGNORE).any()]
    return float(np.mean(per_seq)) if per_seq else float("nan")


def evaluate(
    kind: str, preds: Sequence[np.ndarray], trues: Sequence[np.ndarray], per_residue: bool = False
) -> dict[str, float]:
    """Per-record predictions against labels. Regression: rmse and spearman; classification: accuracy
    pooled over labelled residues (%), plus the per-sequence mean for per-residue tasks; n = labels scored."""
    pred = np.concatenate([np.atleast_1d(p) for p in preds])
    true = np.concatenate([np.atleast_1d(t) for t in trues])
    if kind == "regression":
        return {"rmse": rmse(pred, true), "spearman": spearman(pred, true), "n": int(true.size)}
    out = {"accuracy": accuracy(pred, true)}
    if per_residue:
        out["accuracy_per_sequence"] = sequence_accuracy(preds, trues)
    return {**out, "n": int((true != IGNORE).sum())}


def floor(
    kind: str, train: Sequence[np.ndarray], test: Sequence[np.ndarray], per_residue: bool = False
) -> dict[str, float]:
    """What a model that ignores its input scores: the train mean (regression) or majority class."""
    flat = np.concatenate([np.atleast_1d(t) for t in train])
    if kind == "regression":
        const = [np.full(np.shape(t), float(np.mean(flat, dtype=np.float64))) for t in test]
        return {**evaluate(kind, const, test), "spearman": float("nan")}
    majority = int(np.argmax(np.bincount(flat[flat != IGNORE].astype(np.int64))))
    return evaluate(kind, [np.full(np.shape(t), majority) for t in test], test, per_residue)


# Early stopping watches this validation metric: RMSE (lower is better) or accuracy (higher).
PRIMARY = {"regression": "rmse", "classification": "accuracy"}


def better(kind: str, new: float, best: float | None) -> bool:
    """Whether a validation score beats the best so far."""
    if math.isnan(new):
        return best is None
    if best is None or math.isnan(best):
        return True
    return new < best if kind == "regression" else new > best


def clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (undefined, e.g. Spearman of a constant) becomes None for JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
