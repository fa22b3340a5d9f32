"""`protembed finetune`: FLIP heads on frozen features, from the command line (`predict`: cli_predict)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from protembed.cache import cache_root, check_file_output, default_cache_dir
from protembed.cli_common import (
    Backend,
    BackendOption,
    counted,
    err_console,
    handle_errors,
    out_console,
    path_value,
    print_json,
    resolve_device,
)
from protembed.errors import require_matplotlib
from protembed.flip_fetch import FLIP_URL
from protembed.registry import DEFAULT_MODEL


class TaskName(str, Enum):
    meltome = "flip-meltome"
    gb1 = "flip-gb1"
    secondary_structure = "flip-secondary-structure"
    ss3 = "flip-ss3"
    conservation = "flip-conservation"
    scl = "flip-scl"
    bind = "flip-bind"


class FeatureKind(str, Enum):
    model = "model"
    onehot = "onehot"


class HeadName(str, Enum):
    linear = "linear"
    mlp = "mlp"
    ridge = "ridge"
    cnn = "cnn"


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        file_okay=False,  # for the completions (folders); load_task checks the folder itself
        parser=path_value,
        help="Folder of FLIP FASTA files, one subfolder per dataset (e.g. DIR/gb1/two_vs_rest.fasta, "
        "or .fasta.gz); default: download once from the FLIP server into the cache.",
    ),
]
CacheDir = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Cache for downloads and features (default: $PROTEMBED_CACHE, "
                 "$XDG_CACHE_HOME/protembed or ~/.cache/protembed).", metavar="DIR", file_okay=False,
                 parser=path_value),
]  # fmt: skip
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="cpu, cuda or cuda:N. Default: cuda if available; features then use every GPU.",
        metavar="DEVICE",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", metavar="")]


def progress_bar(quiet: bool) -> Progress:
    """Progress bars on stderr, when it is a terminal and not `quiet`."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet or not err_console.is_terminal,  # no bar when stderr goes to a file
        transient=True,
    )


@handle_errors
def finetune(
    ctx: typer.Context,
    task: Annotated[TaskName, typer.Argument(help="FLIP task.", metavar="TASK", show_default=False)],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=f"Registry name, Hub repo id or checkpoint folder. Default: {DEFAULT_MODEL}.",
            metavar="MODEL",
        ),
    ] = None,  # fmt: skip
    features: Annotated[
        FeatureKind, typer.Option("--features", help="Language-model embeddings or the one-hot baseline.")
    ] = FeatureKind.model,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Split file. Default: the task's card split.", metavar="SPLIT"),
    ] = None,
    head: Annotated[
        HeadName | None,
        typer.Option("--head", help="Head on the features. Default: mlp per sequence, cnn per residue."),
    ] = None,
    layer: Annotated[
        int | None,
        typer.Option(
            "--layer",
            help="Layer to embed: 0 is the token embedding, negative counts from the end. Default: -1.",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Maximum training epochs.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (> 0).")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per step.")] = 32,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed for initialisation and shuffling.")
    ] = 0,
    patience: Annotated[
        int, typer.Option("--patience", min=1, help="Epochs without improvement to stop.")
    ] = 5,
    data_dir: DataDir = None,
    cache_dir: CacheDir = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Save head, config, predictions.",
            metavar="DIR",
            file_okay=False,
            parser=path_value,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Write into a non-empty --output folder (its saved head is replaced; other files are "
            "left alone) or replace an existing --plot file.",
            metavar="",
        ),
    ] = False,
    device: Device = None,
    backend: BackendOption = Backend.auto,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print results as JSON on stdout.", metavar="")
    ] = False,
    plot_png: Annotated[
        bool, typer.Option("--plot", help="Also write a PNG of the test predictions.", metavar="")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Train a small head on frozen features for a FLIP task and report test metrics."""
    from protembed.backends import resolve_backend
    from protembed.finetune import check_head  # torch: not for --help
    from protembed.finetune import finetune as run_finetune
    from protembed.flip import get_task, load_task
    from protembed.saved_head import PLOT, check_output, plot, save

    if features is FeatureKind.onehot and model is not None:
        raise typer.BadParameter("excludes --features onehot", param_hint="'--model'")
    if features is FeatureKind.onehot and layer is not None:
        raise typer.BadParameter("one-hot features have no layers", param_hint="'--layer'")
    if not (math.isfinite(lr) and lr > 0):
        raise typer.BadParameter(f"must be a positive number, got {lr}", param_hint="'--lr'")
    spec = get_task(task.value)
    head_name = check_head(spec, head.value if head else None)
    if head_name == "ridge" and not quiet:
        training = ["epochs", "lr", "batch_size", "seed", "patience"]
        _note_unused(ctx, training, "--head ridge is fit in closed form")
    dev = str(resolve_device(device))
    if features is FeatureKind.onehot and backend is not Backend.auto:
        raise typer.BadParameter("one-hot features are not computed by a model", param_hint="'--backend'")
    if features is not FeatureKind.onehot:  # checked even when every feature is cached already
        resolve_backend(backend.value, dev, "bfloat16" if backend is Backend.te else "float32", compile=False)
    with _removed_if_unused(output):  # made by check_output, left empty by an error
        if output is not None:
            check_output(output, overwrite)
        if plot_png:
            require_matplotlib()
        cache = cache_dir or default_cache_dir()
        if data_dir is None or features is not FeatureKind.onehot:  # else nothing goes to the cache
            cache_root(cache)
        model_ref = None if features is FeatureKind.onehot else model or DEFAULT_MODEL
        with progress_bar(quiet) as bar:
            dl: dict[str, TaskID] = {}

            def on_download(name: str, done: int, total: int | None) -> None:
                if name not in dl:
                    dl[name] = bar.add_task(f"downloading {name}.fasta", total=total)
                bar.update(dl[name], completed=done)

            data = load_task(
                spec, split, data_dir, cache, os.environ.get("PROTEMBED_FLIP_URL", FLIP_URL), on_download
            )
            plot_path = None
            if plot_png:  # checked before training, written after it
                plot_path = (output / PLOT) if output else Path(f"{spec.name}_{data.split}_{head_name}.png")
                check_file_output(plot_path, overwrite or output is not None)  # (in --output: check_output)
            emb = bar.add_task("embedding", total=None, visible=False)
            ep = bar.add_task("training", total=epochs, visible=False)

            def on_embed(done: int, total: int) -> None:
                bar.update(emb, completed=done, total=total, visible=True)

            def on_epoch(epoch: int, loss: float, val: dict[str, float]) -> None:
                shown = ", ".join(f"val {k} {v:.4g}" for k, v in val.items() if k != "n")
                bar.update(
                    ep, completed=epoch, visible=True, description=f"epoch {epoch} loss {loss:.4f} {shown}"
                )

            run = run_finetune(data, model=model_ref, head=head_name, layer=-1 if layer is None else layer,
                               epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=patience,
                               device=dev, backend=backend.value, cache_dir=cache, on_embed=on_embed,
                               on_epoch=on_epoch, quiet=quiet)  # fmt: skip
        cfg = run.config
        if output is not None:
            save(run, output, overwrite)
    if plot_path is not None:
        plot(run, plot_path)
    if cfg["truncated_sequences"] and not quiet:
        n, dropped = cfg["truncated_sequences"], cfg["dropped_residue_labels"]
        err_console.print(f"note: truncated {counted(n, 'sequence')} longer than the features cover "
                          f"({counted(dropped, 'labelled residue')} not scored)")  # fmt: skip
    if json_out:
        print_json({**{k: v for k, v in cfg.items() if k != "history"}, "output": output, "plot": plot_path})
        return
    out_console.print(results_table(cfg))
    for label, path in (("saved", output), ("plot", plot_path)):
        if path is not None:
            out_console.print(f"{label}: {path}", highlight=False)


@contextmanager
def _removed_if_unused(folder: Path | None) -> Iterator[None]:
    """Remove `folder` (and the parents made for it) again when the block fails leaving them empty."""
    made = []  # the folders that do not exist yet, deepest first
    while folder is not None and folder != folder.parent and not os.path.lexists(folder):
        made.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        for path in made:
            try:
                path.rmdir()  # only an empty folder goes
            except OSError:
                break
        raise


def _note_unused(ctx: typer.Context, names: list[str], why: str) -> None:
    """A note on stderr naming the options among `names` given on the command line: `why` they do nothing."""
    given = [n for n in names if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]
    if given:
        options = ", ".join("--" + n.replace("_", "-") for n in given)
        err_console.print(f"note: {why}; {options} not used", highlight=False, soft_wrap=True)


def results_table(cfg: dict[str, Any]) -> Table:
    """Test, validation and floor rows with the task's metrics."""
    m = cfg["metrics"]
    feats = (
        "one-hot"
        if cfg["features"] == "onehot"
        else f"{cfg['model']['name']} layer {cfg['model']['layer_index']}"
    )
    tr = cfg["training"]
    epochs = "" if tr["best_epoch"] is None else f"; best epoch {tr['best_epoch']} of {tr['epochs_run']}"
    c = cfg["counts"]
    table = Table(
        title=f"{cfg['task']} / {cfg['split']}: {feats} + {cfg['head']} head",
        caption=f"train {c['train']}, validation {c['validation']}, test {c['test']} sequences{epochs}; "
        f"fit on {tr['fit_on']}; {cfg['seconds']['total']:.1f} s",
    )
    table.add_column("")
    unit = f" ({cfg['unit']})" if cfg["unit"] else ""
    if cfg["kind"] == "regression":
        cols = [("rmse", f"RMSE{unit}"), ("spearman", "Spearman")]
    else:
        cols = [("accuracy", "accuracy %")]
        if cfg["level"] == "residue":
            cols.append(("accuracy_per_sequence", "per-sequence accuracy %"))
    for _, title in cols:
        table.add_column(title, justify="right")
    table.add_column("n", justify="right")
    rows = [
        ("test", m["test"]),
        ("validation", m["validation"]),
        (f"floor ({m['floor_kind']}, test)", m["floor"]),
    ]
    for name, metrics in rows:
        if metrics is not None:
            table.add_row(name, *[_num(metrics.get(k), k) for k, _ in cols], str(metrics.get("n", "")))
    return table


def _num(v: float | None, metric: str) -> str:
    """A table cell: accuracies (percent) with 2 decimals, RMSE and Spearman with 3."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}" if metric.startswith("accuracy") else f"{v:.3f}"
