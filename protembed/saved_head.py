"""A trained FLIP head on disk: save it, load it back, apply it to new sequences, plot its test set.

A saved head is a directory: `head.safetensors` (weights), `config.json` (task, split, features,
model, layer, head, target scaling, metrics) and `predictions.csv` (the test split).
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from protembed.api import default_device
from protembed.cache import TEMP_PREFIX, default_cache_dir, ensure_dir, write_whole
from protembed.errors import (
    OptionError,
    OutputExistsError,
    StoreError,
    first_line,
    is_whole,
    require_matplotlib,
)
from protembed.finetune import FORMAT, Run, featurize
from protembed.flip import IGNORE, FlipError, get_task
from protembed.heads import build_head, decode, predict
from protembed.metrics import confusion
from protembed.records import read_records

CONFIG, WEIGHTS, PREDICTIONS, PLOT = "config.json", "head.safetensors", "predictions.csv", "test.png"


def check_output(out_dir: Path, overwrite: bool) -> None:
    """OutputExistsError if `out_dir` already holds a saved head and overwrite is off."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder")
    if not overwrite and out_dir.exists() and any(not _stale(p) for p in out_dir.iterdir()):
        raise OutputExistsError(f"{out_dir} is not empty (pass --overwrite to replace it)")
    ensure_dir(out_dir, "output folder")  # fail now, not after training
    folder = out_dir.stat()
    sticky = bool(folder.st_mode & stat.S_ISVTX) and folder.st_uid != os.geteuid()
    for name in (WEIGHTS, PREDICTIONS, CONFIG, PLOT):  # an earlier run's, maybe another user's
        path = out_dir / name
        if not path.exists() or path.stat().st_uid == os.geteuid():
            continue
        if not os.access(path, os.W_OK) or (sticky and name in (CONFIG, PLOT)):  # written in place / removed
            raise StoreError(f"{path}: cannot write output: permission denied (another user's file)")


def save(run: Run, out_dir: Path, overwrite: bool = False) -> None:
    """Write head weights, the test predictions and config to `out_dir`.

    Each file is written whole or not at all, `config.json` last, after the previous run's (and
    its plot) is removed: a folder with a `config.json` holds one run's complete head.
    """
    check_output(out_dir, overwrite)  # creates the folder
    for old in (CONFIG, PLOT):  # an earlier run's: its head is incomplete until the new config
        (out_dir / old).unlink(missing_ok=True)
    for left in filter(_stale, out_dir.iterdir()):
        left.unlink(missing_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in run.head.state_dict().items()}
    write_whole(out_dir / WEIGHTS, lambda tmp: tmp.write_bytes(safetensors_bytes(weights)))
    kind, level, classes = run.config["kind"], run.config["level"], run.config["classes"]

    def predictions(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["id", "sequence", "measured", "predicted"])
            for rid, seq, true, pred in zip(run.test_ids, run.test_seqs, run.test_true, run.test_pred):
                w.writerow([rid, seq, format_value(kind, level, classes, true),
                            format_value(kind, level, classes, pred)])  # fmt: skip

    write_whole(out_dir / PREDICTIONS, predictions)
    text = json.dumps(run.config, indent=2, allow_nan=False) + "\n"
    write_whole(out_dir / CONFIG, lambda tmp: tmp.write_text(text))


def _stale(path: Path) -> bool:
    """A temporary file that a save killed before it finished left behind."""
    return path.name.startswith(TEMP_PREFIX) and path.name.endswith(".tmp") and path.is_file()


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
    head_files = (out_dir.parent / CONFIG).is_file() and (out_dir.parent / WEIGHTS).is_file()
    if out_dir.is_file() and out_dir.name in (CONFIG, WEIGHTS, PREDICTIONS, PLOT) and head_files:
        raise FlipError(f"{out_dir} is a file of a saved head: pass its folder, {out_dir.parent}")
    if not cfg_path.is_file() or not w_path.is_file():
        raise FlipError(f"{out_dir} is not a saved head (needs {CONFIG} and {WEIGHTS})")
    try:
        with open(w_path, "rb"):  # readable: a failure below then means wrong weights
            pass
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FlipError(f"{exc.filename}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise FlipError(f"{cfg_path}: not UTF-8 text (byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise FlipError(f"{cfg_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise FlipError(f"{cfg_path}: not a protembed FLIP head (format {found!r})")
    _check_saved(config, cfg_path)
    try:
        head = build_head(config["head_config"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # a hand-edited config
        raise FlipError(f"{cfg_path}: head_config is not a head's settings ({first_line(exc)})") from None
    try:
        weights = load_file(str(w_path))
        if why := _state_mismatch(head, weights):
            raise FlipError(f"{w_path}: not the weights of the head in {CONFIG} ({why})")
        head.load_state_dict(weights)
    except (KeyError, ValueError, TypeError, RuntimeError, OSError, SafetensorError) as exc:
        raise FlipError(f"{w_path}: not the weights of the head in {CONFIG} ({first_line(exc)})") from None
    return config, head.eval()


def _state_mismatch(head: nn.Module, weights: dict[str, Any]) -> str | None:
    """The first difference between a head's tensors and the saved ones, in words; None if none."""
    wanted = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    if missing := [k for k in wanted if k not in weights]:
        return f"no tensor {missing[0]}"
    if extra := [k for k in weights if k not in wanted]:
        return f"an unexpected tensor {extra[0]}"
    for key, shape in wanted.items():
        if tuple(weights[key].shape) != shape:
            return f"{key} has shape {list(weights[key].shape)}, the head needs {list(shape)}"
    return None


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
    if not (pair and all((is_whole(v) or isinstance(v, float)) and math.isfinite(v) for v in pair)):
        raise bad("target_scale", "is not two finite numbers")
    if not pair[1] > 0:
        raise bad("target_scale", "has a scale (its second number) that is not above 0")
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
    fasta: str | Path,
    device: str | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    quiet: bool = False,
    scratch: Path | None = None,
    saved: tuple[dict[str, Any], nn.Module] | None = None,
    model: str | None = None,
) -> tuple[list[list[str]], int]:
    """Apply a saved head (`saved`: as `load(out_dir)` returned it) to a FASTA file: rows (id,
    prediction) and the number of truncated inputs. Features are cached in `cache_dir`, or only in
    `scratch` (a folder the caller deletes). `model`: where the head's local checkpoint is now, if
    its folder moved (its weights must still be the ones the head was trained on)."""
    config, head = saved or load(out_dir)
    model_cfg = _features_model(config, out_dir / CONFIG, model)
    ids, seqs = [], []
    for rec in read_records(fasta):  # the header after the id is a free-text description
        body = rec.body.removesuffix("*")  # a translated stop codon, as `embed` drops it
        if not body:
            raise rec.error("empty record (only a stop codon)")
        replace(rec, body=body).check_residues()
        ids.append(rec.id)
        seqs.append(body)
    task, dev = get_task(config["task"]), device or default_device()
    cache = cache_dir or default_cache_dir()
    length = config.get("onehot_length")
    feats = featurize(
        seqs, task, model_cfg, length, cache, dev, progress,
        quiet=quiet, features_dir=scratch, layer_from=f"{out_dir / CONFIG}: model layer",
    )  # fmt: skip
    x = feats.residues if task.level == "residue" else feats.pooled
    assert x is not None
    d_in = config["head_config"].get("d_in")
    if d_in != feats.dim:  # a hand-edited config: onehot_length, or a model of another width
        what = "one-hot features" if model_cfg is None else f"features of {model_cfg['ref']}"
        raise FlipError(f"{out_dir / CONFIG}: the head takes {d_in} inputs, the {what} have {feats.dim}")
    scale = (float(config["target_scale"][0]), float(config["target_scale"][1]))
    preds = decode(task.kind, predict(head.to(dev), x, None, dev), scale)
    rows = []
    for rid, seq, pred in zip(ids, seqs, preds):
        text = format_value(task.kind, task.level, config["classes"], pred)
        if task.level == "residue":
            text += "-" * (len(seq) - len(text))  # residues past the model's maximum length
        rows.append([rid, text])
    return rows, int(feats.truncated.sum())


def _features_model(config: dict[str, Any], cfg_path: Path, moved_to: str | None) -> dict[str, Any] | None:
    """The model that computes the head's features (None: one-hot), at `moved_to` if given."""
    saved = config["model"]
    if saved is None:
        if moved_to is not None:
            raise OptionError("--model: this head takes one-hot features, not a model's")
        return None
    ref, revision = saved["ref"], saved.get("revision")
    revision = None if revision == "local" else revision  # heads saved before weight digests
    local = revision is None or revision.startswith("sha256:")  # a checkpoint folder, not the Hub
    if moved_to is not None:
        if not local:
            raise OptionError(
                f"--model: the head was trained on the Hub model {ref} (revision {revision}); --model"
                " only gives the new place of a local checkpoint folder (for a moved Hub cache, set"
                " HF_HUB_CACHE)"
            )
        if not Path(moved_to).is_dir():
            why = "not a folder" if os.path.exists(moved_to) else "no such folder"
            raise OptionError(f"--model {moved_to}: {why} (give the checkpoint folder's new place)")
        ref = moved_to
    elif local and not os.path.exists(ref):  # a link to nowhere too
        raise FlipError(
            f"{cfg_path}: the head was trained on the checkpoint folder {ref}, which is no longer there;"
            " if it moved, pass its new place with --model"
        )
    return {"ref": ref, "layer": saved["layer"], "revision": revision}


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
        title = f"accuracy {_fmt(metrics['accuracy'], 2)}%"
    ax.set_title(f"{cfg['task']} / {cfg['split']} (test): {title}", fontsize=9)
    fig.tight_layout()
    try:
        write_whole(path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"))
    finally:
        plt.close(fig)


def _fmt(v: float | None, decimals: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{decimals}f}"
