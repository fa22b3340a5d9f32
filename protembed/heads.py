"""Small heads on frozen features, closed-form ridge, and the training loop (AdamW + early stopping).

Sequence-level inputs are [n, D] arrays; residue-level inputs are `Ragged` rows [L, D] with labels
of the same length (IGNORE where a residue has no usable label). Regression targets are given to
the heads standardized; callers keep the mean and std.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from protembed.features import Ragged
from protembed.flip import IGNORE, FlipError
from protembed.metrics import PRIMARY, better, evaluate

SEQUENCE_HEADS = ("linear", "mlp", "ridge")
RESIDUE_HEADS = ("linear", "mlp", "cnn")
DEFAULT_HEAD = {"sequence": "mlp", "residue": "cnn"}

Inputs = np.ndarray | Ragged
Targets = np.ndarray | Sequence[np.ndarray]


class LinearHead(nn.Module):
    """One linear map, applied to the last axis ([B, D] or [B, L, D]). Also holds fitted ridge weights."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)


class MLPHead(nn.Module):
    """Linear -> ReLU -> dropout -> linear on the last axis."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class CNNHead(nn.Module):
    """Two 1-D convolutions along the sequence (the light per-residue head of ProtT5/FLIP's SS3 runs)."""

    def __init__(
        self, d_in: int, d_out: int, hidden: int = 32, kernel: int = 7, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(d_in, hidden, kernel, padding=kernel // 2)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(hidden, d_out, kernel, padding=kernel // 2)

    def forward(self, x_BLD: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        if mask_BL is not None:
            x_BLD = x_BLD * mask_BL[..., None]  # padding must not leak into real residues
        h = self.drop(torch.relu(self.conv1(x_BLD.transpose(1, 2))))
        if mask_BL is not None:
            h = h * mask_BL[:, None, :]
        return self.conv2(h).transpose(1, 2)  # [B, L, d_out]


def head_config(name: str, d_in: int, d_out: int) -> dict[str, Any]:
    """The constructor arguments of a head, as saved next to its weights."""
    if name in ("linear", "ridge"):
        return {"module": "linear", "d_in": d_in, "d_out": d_out}
    if name == "mlp":
        return {"module": "mlp", "d_in": d_in, "d_out": d_out, "hidden": 256, "dropout": 0.1}
    if name == "cnn":
        return {"module": "cnn", "d_in": d_in, "d_out": d_out, "hidden": 32, "kernel": 7, "dropout": 0.25}
    raise ValueError(f"unknown head {name!r}")


def build_head(config: dict[str, Any]) -> nn.Module:
    """A head module from `head_config` output."""
    kwargs = {k: v for k, v in config.items() if k != "module"}
    cls = {"linear": LinearHead, "mlp": MLPHead, "cnn": CNNHead}[config["module"]]
    return cls(**kwargs)


def fit_ridge(
    x: np.ndarray, y: np.ndarray, alpha: float = 1.0, device: str | torch.device = "cpu"
) -> LinearHead:
    """Closed-form ridge with an unpenalized intercept, as scikit-learn's `Ridge(alpha)`.

    y: [n] (regression) or [n, K] (classification with +-1 targets, as `RidgeClassifier`).
    Solves in float64 in whichever of the primal (D x D) or dual (n x n) forms is smaller.
    """
    X = torch.from_numpy(np.asarray(x)).to(device, torch.float64)
    Y = torch.from_numpy(np.asarray(y)).to(device, torch.float64).reshape(X.shape[0], -1)
    x_mean, y_mean = X.mean(0), Y.mean(0)
    X, Y = X - x_mean, Y - y_mean
    n, d = X.shape
    if n < d:
        gram = X @ X.T
        gram.diagonal().add_(alpha)
        W = X.T @ torch.linalg.solve(gram, Y)  # [D, K]
    else:
        cov = X.T @ X
        cov.diagonal().add_(alpha)
        W = torch.linalg.solve(cov, X.T @ Y)
    head = LinearHead(d, W.shape[1])
    with torch.no_grad():
        head.proj.weight.copy_(W.T.float())
        head.proj.bias.copy_((y_mean - x_mean @ W).float())
    return head


def batch(
    x: Inputs, y: Targets | None, rows: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inputs [B, D] or padded [B, L, D], targets (padded with IGNORE) and the residue mask [B, L]."""
    if isinstance(x, np.ndarray):
        xb = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32)).to(device)
        yb = None if y is None else torch.as_tensor(np.asarray(y)[rows]).to(device)
        return xb, yb, None
    lengths = x.lengths()[rows]
    width = int(lengths.max())
    xp = np.zeros((len(rows), width, x.dim), dtype=np.float32)
    yp = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for j, r in enumerate(rows):
        n = int(lengths[j])
        xp[j, :n] = x[int(r)]
        if y is not None:
            assert len(y[int(r)]) == n, "labels and features must have the same length"
            yp[j, :n] = y[int(r)]
    mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]).to(device, torch.float32)
    return torch.from_numpy(xp).to(device), (torch.from_numpy(yp).to(device) if y is not None else None), mask


def loss_fn(kind: str, out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    if kind == "regression":
        return nn.functional.mse_loss(out.squeeze(-1), yb.float())
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def predict(
    head: nn.Module,
    x: Inputs,
    rows: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Raw head outputs for `rows` of x (all rows by default): [d_out] or [L, d_out] each."""
    head.eval()
    if rows is None:
        rows = np.arange(x.shape[0] if isinstance(x, np.ndarray) else len(x))
    out: list[np.ndarray] = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        xb, _, mask = batch(x, None, part, torch.device(device))
        res = head(xb, mask).float().cpu().numpy()
        if isinstance(x, Ragged):
            lengths = x.lengths()[part]
            out.extend(res[j, : int(n)] for j, n in enumerate(lengths))
        else:
            out.extend(res)
    return out


def decode(kind: str, outputs: list[np.ndarray], scale: tuple[float, float] = (0.0, 1.0)) -> list[np.ndarray]:
    """Head outputs to predictions: de-standardized values or argmax class indices."""
    if kind == "regression":
        return [o[..., 0] * scale[1] + scale[0] for o in outputs]
    return [o.argmax(-1) for o in outputs]


def score(
    kind: str, preds: list[np.ndarray], targets: Targets, scale: tuple[float, float]
) -> dict[str, float]:
    """Metrics of predictions against (standardized, for regression) targets, in real units."""
    trues = [np.asarray(t) for t in targets]
    if kind == "regression":
        trues = [t * scale[1] + scale[0] for t in trues]
    return evaluate(kind, preds, trues, per_residue=any(t.ndim > 0 for t in trues))


def train(
    head: nn.Module,
    x: Inputs,
    y: Targets,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    *,
    kind: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    patience: int,
    device: torch.device,
    scale: tuple[float, float] = (0.0, 1.0),
    weight_decay: float = 1e-2,
    on_epoch: Callable[[int, float, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """AdamW on `train_rows` of (x, y); keeps the weights of the best validation epoch (early stopping).

    Deterministic for a given seed on CPU: shuffling uses its own generator seeded with `seed`.
    Returns one dict per epoch: loss, the validation metrics and whether it was the best so far.
    """
    head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    n = len(train_rows)
    y_val = [y[int(i)] for i in val_rows]
    metric = PRIMARY[kind]
    best: float | None = None
    best_state = copy.deepcopy(head.state_dict())
    history: list[dict[str, float]] = []
    since_best = 0
    for epoch in range(1, epochs + 1):
        head.train()
        total, seen = 0.0, 0
        perm = train_rows[rng.permutation(n)]
        for start in range(0, n, batch_size):
            rows = perm[start : start + batch_size]
            xb, yb, mask = batch(x, y, rows, device)
            assert yb is not None
            loss = loss_fn(kind, head(xb, mask), yb)
            if not math.isfinite(loss.item()):
                if not bool((yb != IGNORE).any()):
                    continue  # a batch with no labelled residue
                raise FlipError(
                    f"training diverged (loss {loss.item()} in epoch {epoch}); try a smaller --lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            try:
                opt.step()
            except RuntimeError as exc:  # e.g. lr * weight decay beyond float range
                if "overflow" not in str(exc):
                    raise
                raise FlipError(
                    f"training diverged (step overflows in epoch {epoch}); try a smaller --lr"
                ) from None
            total += loss.item() * len(rows)
            seen += len(rows)
        val = score(kind, decode(kind, predict(head, x, val_rows, device), scale), y_val, scale)
        improved = better(kind, val[metric], best)
        if improved:
            best, since_best = val[metric], 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            since_best += 1
        history.append({"epoch": epoch, "loss": total / max(seen, 1), **val, "best": improved})
        if on_epoch is not None:
            on_epoch(epoch, total / max(seen, 1), val)
        if since_best >= patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    return history
