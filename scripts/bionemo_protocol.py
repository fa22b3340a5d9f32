"""Train the one-hot CNN for a FLIP per-residue task under BioNeMo's published training settings.

A check of where BioNeMo's one-hot baselines (secondary structure 64.3 %, conservation 20.2 %) could
come from, not part of protembed. Three settings, read from BioNeMo's ESM-2nv configs and code:

- `finetune`: downstream_flip_sec_str.yaml: Adam lr 1e-3, no weight decay, batch 128 (64 on each
  of 2 GPUs), 20 epochs, the last weights, sequences over 1022 residues dropped (ESM-2nv's 1024
  tokens; `--max-residues 510` for ESM-1nv's 512).
- `callback`: the validation callback of the pretraining config: Adam lr 1e-4, weight decay 0.01,
  batch 128, 10 epochs, learning rate warmed up over 10 steps and annealed to 1e-5 over 1000 steps.
- `sequential`: `finetune` as BioNeMo's fine-tuning trainer runs it: Megatron's "single" sampler
  (file order every epoch, no shuffling, the last partial batch of train and test dropped), gradients
  clipped at norm 1.0 (the base config's trainer), the loss averaged over batches padded to 1024
  positions, and their ConvNet, whose hidden layer is not zeroed past a sequence's end.

`--train-unresolved` trains on the unresolved residues too (all labelled C in FLIP's files), as a
pipeline that ignores the resolved mask would; scoring still uses resolved residues only.

All use BioNeMo's loss (logits of unlabelled positions zeroed, cross entropy averaged over every
position of the padded batch). Prints test accuracy pooled over residues, averaged per sequence,
averaged per batch of 64 (BioNeMo's metric) and, for secondary structure, over every residue,
unresolved ones included.

Usage: python scripts/bionemo_protocol.py flip-secondary-structure finetune [--data-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from protembed.features import onehot_residues
from protembed.flip import IGNORE, find_file, get_task, load_task, read_residue_task
from protembed.heads import CNNHead, batch

SETTINGS = {
    "finetune": {"lr": 1e-3, "weight_decay": 0.0, "epochs": 20, "anneal_steps": None},
    "callback": {"lr": 1e-4, "weight_decay": 0.01, "epochs": 10, "anneal_steps": 1000},
    "sequential": {"lr": 1e-3, "weight_decay": 0.0, "epochs": 20, "anneal_steps": None},
}
PADDED = 1024  # ESM-2nv's seq_length: BioNeMo pads every frozen-encoder batch to it
BATCH, CPU = 128, torch.device("cpu")


def learning_rate(base: float, step: int, anneal_steps: int | None, warmup: int = 10) -> float:
    if anneal_steps is None:
        return base
    if step < warmup:
        return base * (step + 1) / warmup
    return max(base * (1 - (step - warmup) / (anneal_steps - warmup)), 1e-5)


def bionemo_loss(out: torch.Tensor, yb: torch.Tensor, n_classes: int) -> torch.Tensor:
    labelled = yb != IGNORE
    logits = out * labelled[..., None]
    target = torch.nn.functional.one_hot(yb.clamp(min=0), n_classes).float() * labelled[..., None]
    return torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), target.permute(0, 2, 1))


@torch.no_grad()
def accuracies(
    head: CNNHead, feats, labels, rows: np.ndarray, masked: bool = True
) -> tuple[float, float, float]:
    head.eval()
    right = total = 0
    per_seq: list[float] = []
    per_batch: list[float] = []
    for start in range(0, len(rows), 64):
        xb, yb, mask = batch(feats, labels, rows[start : start + 64], CPU)
        assert yb is not None
        ok = (head(xb, mask if masked else None).argmax(-1) == yb) & (yb != IGNORE)
        n = (yb != IGNORE).sum(1)
        right, total = right + int(ok.sum()), total + int(n.sum())
        acc = (100 * ok.sum(1) / n.clamp(min=1))[n > 0]
        per_seq += acc.tolist()
        per_batch.append(float(acc.mean()))
    return 100 * right / total, float(np.mean(per_seq)), float(np.mean(per_batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task")
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/flip/fasta_layout"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-residues", type=int, default=1022, help="longer sequences are dropped")
    parser.add_argument(
        "--train-unresolved", action="store_true", help="train on unresolved residues too (label C)"
    )
    args = parser.parse_args()
    cfg = SETTINGS[args.setting]
    torch.manual_seed(args.seed)
    task = get_task(args.task)
    data = load_task(task, data_dir=args.data_dir)
    feats = onehot_residues(data.seqs).residues
    train_labels = data.labels
    if args.train_unresolved:  # the loss sees every residue: the resolved mask is not applied
        folder = args.data_dir
        train_labels = read_residue_task(task, data.split, find_file(folder, task.folder, "sequences"),
                                         find_file(folder, task.folder, data.split), None).labels  # fmt: skip
    keep = np.array([len(s) <= args.max_residues for s in data.seqs])
    train, test = (np.flatnonzero((data.part == p) & keep) for p in (0, 2))
    head = CNNHead(feats.dim, task.n_outputs)
    opt = torch.optim.Adam(head.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    rng, step = np.random.default_rng(args.seed), 0
    sequential = args.setting == "sequential"
    if sequential:  # Megatron's "single" sampler drops the last partial batch, of train and test alike
        train, test = train[: train.size // BATCH * BATCH], test[: test.size // BATCH * BATCH]
    for epoch in range(cfg["epochs"]):
        head.train()
        order = train if sequential else train[rng.permutation(train.size)]
        for start in range(0, order.size, BATCH):
            xb, yb, mask = batch(feats, train_labels, order[start : start + BATCH], CPU)
            assert yb is not None
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg["lr"], step, cfg["anneal_steps"])
            out = head(xb, None if sequential else mask)
            loss = bionemo_loss(out, yb, task.n_outputs)
            if sequential:  # the mean runs over every position of a batch padded to 1024
                loss = loss * xb.shape[1] / PADDED
            opt.zero_grad()
            loss.backward()
            if sequential:  # trainer.gradient_clip_val of the base config
                torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}", flush=True)
    pooled, seq, per_batch = accuracies(head, feats, data.labels, test, not sequential)
    print(f"{args.task} {args.setting} ({train.size} train / {test.size} test records): test accuracy")
    print(f"  pooled {pooled:.2f}%, per sequence {seq:.2f}%, BioNeMo's per-batch mean {per_batch:.2f}%")
    if task.mask:  # score unresolved residues too
        folder = args.data_dir
        raw = read_residue_task(task, data.split, find_file(folder, task.folder, "sequences"),
                                find_file(folder, task.folder, data.split), None)  # fmt: skip
        every = accuracies(head, feats, raw.labels, test, not sequential)[0]
        print(f"  every residue, unresolved included: {every:.2f}%")


if __name__ == "__main__":
    main()
