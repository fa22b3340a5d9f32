"""Fit a FLIP head on frozen features, evaluate it, save it, and apply a saved head to new sequences.

A saved head is a directory: `head.safetensors` (weights), `config.json` (task, split, features,
model, layer, head, target scaling, metrics) and `predictions.csv` (the test split).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from protembed import __version__
from protembed.api import default_device
from protembed.cache import default_cache_dir, ensure_dir
from protembed.embed import locate_model
from protembed.errors import OptionError, OutputExistsError, is_whole, require_matplotlib
from protembed.feature_cache import model_features
from protembed.features import Features, Ragged, onehot_flat, onehot_residues
from protembed.flip import (
    IGNORE,
    PARTS,
    TEST,
    Dataset,
    FlipError,
    Task,
    get_task,
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
from protembed.metrics import clean, confusion, floor
from protembed.models.encoder import resolve_layers
from protembed.records import read_records

MAX_ONEHOT = 1024  # flattened one-hot features cover at most this many positions
CONFIG, WEIGHTS, PREDICTIONS, PLOT = "config.json", "head.safetensors", "predictions.csv", "test.png"
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
) -> Features:
    """One-hot features, or the cached embeddings of the model described by `model_cfg`."""
    if model_cfg is None:
        if task.level == "residue":
            return onehot_residues(seqs)
        assert onehot_length is not None
        return onehot_flat(seqs, onehot_length)
    dtype = "bfloat16" if backend == "te" else "float32"  # Transformer Engine runs in half precision
    expected = model_cfg.get("revision")  # a Hub commit, or a local checkpoint's weights digest
    digest = expected if expected and expected.startswith("sha256:") else None
    ref = locate_model(model_cfg["ref"], None if digest else expected)
    if digest and digest != ref.revision:
        raise FlipError(f"the weights in {ref.source} changed since the head was trained ({digest})")
    model_cfg.update(name=ref.name, source=ref.source, revision=ref.revision)
    try:
        layer = model_cfg["layer_index"] = resolve_layers([model_cfg["layer"]], ref.config)[0]  # -1 resolved
    except ValueError as exc:
        raise OptionError(f"--layer: {exc}") from None
    # The features are computed by the embed pipeline: "cuda" (no index) means every GPU.
    embed_device = None if device == "cuda" else device
    return model_features(
        seqs, ref, layer, task.level == "residue", cache_dir,
        dtype=dtype, device=embed_device, backend=backend, progress=progress,
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
) -> Run:
    """Fit a head on `data`'s train split (ridge: train + validation), evaluate on its test split.

    model=None means one-hot features; otherwise a registry name, Hub repo id or checkpoint directory.
    """
    task, head_name, dev = data.task, check_head(data.task, head), device or default_device()
    counts = data.counts()
    if counts["train"] == 0 or counts["test"] == 0:
        raise FlipError(f"{task.name}/{data.split} needs train and test records (found {counts})")
    if head_name != "ridge" and counts["validation"] == 0:
        raise FlipError(f"{task.name}/{data.split} has no validation records for early stopping")
    t0 = time.perf_counter()
    rows = {name: np.flatnonzero(data.part == i) for i, name in enumerate(PARTS)}
    fit_rows = np.flatnonzero(data.part != TEST) if head_name == "ridge" else rows["train"]
    onehot_length = None
    if model is None and task.level == "sequence":  # pad to the longest sequence the head is fit on
        onehot_length = min(MAX_ONEHOT, max(len(data.seqs[i]) for i in np.flatnonzero(data.part != TEST)))
    model_cfg = None if model is None else {"ref": _model_ref(model), "layer": layer}
    feats = featurize(data.seqs, task, model_cfg, onehot_length, cache_dir, dev, on_embed, backend)
    t_features = time.perf_counter() - t0
    x, y, dropped = inputs_and_targets(data, feats)
    if task.level == "residue":
        for part in ("train", "validation", "test"):
            if (part != "validation" or head_name != "ridge") and not any(
                (y[int(i)] != IGNORE).any() for i in rows[part]
            ):
                raise FlipError(f"{task.name}/{data.split}: no labelled residues in the {part} records")
    scale = (0.0, 1.0)
    if task.kind == "regression":  # heads see standardized targets
        yt = np.asarray(y)[fit_rows]
        scale = (float(yt.mean()), float(yt.std()) or 1.0)
        y = (np.asarray(y, dtype=np.float32) - scale[0]) / scale[1]

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
        return preds, score(task.kind, preds, [y[int(i)] for i in r], scale)

    test_pred, test_metrics = evaluate_rows(rows["test"])
    val_metrics = None if head_name == "ridge" else evaluate_rows(rows["validation"])[1]
    truth = [np.atleast_1d(np.asarray(y[int(i)])) for i in range(len(data.ids))]  # real units
    truth = [t * scale[1] + scale[0] for t in truth] if task.kind == "regression" else truth
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
        "training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "patience": patience,
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


# --- saving, loading, predicting ----------------------------------------------------------------


def check_output(out_dir: Path, overwrite: bool) -> None:
    """OutputExistsError if `out_dir` already holds a saved head and overwrite is off."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder")
    if not overwrite and out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExistsError(f"{out_dir} is not empty (pass --overwrite to replace it)")
    ensure_dir(out_dir, "output folder")  # fail now, not after training


def save(run: Run, out_dir: Path, overwrite: bool = False) -> None:
    """Write head weights, config and the test predictions to `out_dir`."""
    check_output(out_dir, overwrite)  # creates the folder
    (out_dir / PLOT).unlink(missing_ok=True)  # a plot of an earlier run
    weights = out_dir / WEIGHTS
    save_file({k: v.detach().cpu().contiguous() for k, v in run.head.state_dict().items()}, str(weights))
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)  # safetensors creates it private; match the other files
    (out_dir / CONFIG).write_text(json.dumps(run.config, indent=2, allow_nan=False) + "\n")
    kind, classes = run.config["kind"], run.config["classes"]
    with open(out_dir / PREDICTIONS, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "sequence", "measured", "predicted"])
        for rid, seq, true, pred in zip(run.test_ids, run.test_seqs, run.test_true, run.test_pred):
            w.writerow(
                [
                    rid,
                    seq,
                    format_value(kind, run.config["level"], classes, true),
                    format_value(kind, run.config["level"], classes, pred),
                ]
            )


def format_value(kind: str, level: str, classes: list[str], value: np.ndarray) -> str:
    """A value as CSV text: a number, a class name, or one character per residue ('-' = no label)."""
    if kind == "regression":
        return f"{float(np.asarray(value).reshape(-1)[0]):.6g}"
    if level == "sequence":
        return classes[int(np.asarray(value).reshape(-1)[0])]
    return "".join("-" if int(v) == IGNORE else classes[int(v)] for v in value)


def load(out_dir: Path) -> tuple[dict[str, Any], nn.Module]:
    """The config and head module of a saved head directory."""
    cfg_path, w_path = out_dir / CONFIG, out_dir / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FlipError(f"{out_dir} is not a saved head (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise FlipError(f"{cfg_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise FlipError(f"{cfg_path}: not a protembed FLIP head (format {found!r})")
    _check_saved(config, cfg_path)
    try:
        head = build_head(config["head_config"])
        head.load_state_dict(load_file(str(w_path)))
    except (KeyError, ValueError, TypeError, RuntimeError, OSError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlipError(f"{w_path}: not the weights of the head in {CONFIG} ({first})") from None
    return config, head.eval()


def _check_saved(config: dict[str, Any], cfg_path: Path) -> None:
    """The fields `predict` reads, as `finetune` writes them; FlipError naming the first that is not."""

    def bad(field: str, why: str) -> FlipError:
        return FlipError(f"{cfg_path}: {field} {config.get(field)!r} {why}")

    try:
        task = get_task(str(config.get("task")))
    except FlipError:
        raise bad("task", "is not a FLIP task") from None
    if config.get("classes") != list(task.classes):
        raise bad("classes", f"are not those of {task.name}")
    scale = config.get("target_scale")
    pair = scale if isinstance(scale, list) and len(scale) == 2 else []
    if not (pair and all(is_whole(v) or isinstance(v, float) for v in pair)):
        raise bad("target_scale", "is not two numbers")
    if not isinstance(config.get("head_config"), dict):
        raise bad("head_config", "is not a head's settings")
    model = config.get("model")
    features = config.get("features", "onehot" if model is None else "model")
    if features == "model":
        if not (isinstance(model, dict) and isinstance(model.get("ref"), str) and is_whole(model.get("layer"))
                and isinstance(model.get("revision"), (str, type(None)))):  # fmt: skip
            raise bad("model", "is not a model with ref, layer and revision")
    elif features == "onehot":
        if model is not None:
            raise bad("model", "is set, but the features are one-hot")
        n = config.get("onehot_length")
        if task.level == "sequence" and not (is_whole(n) and n >= 1):
            raise bad("onehot_length", "is not a positive whole number")
    else:
        raise bad("features", "is neither 'model' nor 'onehot'")


def predict_fasta(
    out_dir: Path,
    fasta: Path,
    device: str | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[str]], int]:
    """Apply a saved head to a FASTA file: rows (id, prediction) and the number of truncated inputs."""
    config, head = load(out_dir)
    ids, seqs = [], []
    for rec in read_records(fasta):  # the header after the id is a free-text description
        body = rec.body.removesuffix("*")  # a translated stop codon, as `embed` drops it
        if not body:
            raise rec.error("empty record (only a stop codon)")
        replace(rec, body=body).check_residues()
        ids.append(rec.id)
        seqs.append(body)
    task, dev = get_task(config["task"]), device or default_device()
    model_cfg = config["model"]
    if model_cfg is not None:
        revision = model_cfg.get("revision")
        revision = None if revision == "local" else revision  # heads saved before weight digests
        model_cfg = {"ref": model_cfg["ref"], "layer": model_cfg["layer"], "revision": revision}
    feats = featurize(
        seqs, task, model_cfg, config.get("onehot_length"), cache_dir or default_cache_dir(), dev, progress
    )
    x = feats.residues if task.level == "residue" else feats.pooled
    assert x is not None
    scale = (float(config["target_scale"][0]), float(config["target_scale"][1]))
    preds = decode(task.kind, predict(head.to(dev), x, None, dev), scale)
    rows = []
    for rid, seq, pred in zip(ids, seqs, preds):
        text = format_value(task.kind, task.level, config["classes"], pred)
        if task.level == "residue":
            text += "-" * (len(seq) - len(text))  # residues past the model's maximum length
        rows.append([rid, text])
    return rows, int(feats.truncated.sum())


# --- plotting -----------------------------------------------------------------------------------


def plot(run: Run, path: Path) -> None:
    """Predicted vs measured (regression) or a row-normalized confusion matrix (classification), as PNG."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = run.config
    true = np.concatenate([np.atleast_1d(t) for t in run.test_true])
    pred = np.concatenate([np.atleast_1d(p) for p in run.test_pred])
    metrics = cfg["metrics"]["test"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if cfg["kind"] == "regression":
        ax.scatter(true, pred, s=4, alpha=0.4)
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        unit = f" ({cfg['unit']})" if cfg["unit"] else ""
        ax.set(xlabel=f"measured{unit}", ylabel=f"predicted{unit}")
        title = f"RMSE {_fmt(metrics['rmse'])}, Spearman {_fmt(metrics['spearman'])}"
    else:
        k = len(cfg["classes"])
        cm = confusion(pred, true, k).astype(np.float64)
        cm /= np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="measured")
        ax.set_xticklabels(cfg["classes"], rotation=90 if k > 5 else 0)
        ax.set_yticklabels(cfg["classes"])
        title = f"accuracy {_fmt(metrics['accuracy'])}%"
    ax.set_title(f"{cfg['task']} / {cfg['split']} (test): {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
