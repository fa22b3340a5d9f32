"""What `protembed bench` shows: the `--json` report, the rich table and the `--plot` PNG."""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from protembed import __version__

if TYPE_CHECKING:
    from protembed.api import Model
    from protembed.bench import ConfigResult
    from protembed.peaks import Peak

SCHEMA = "protembed-bench/1"


def report(
    model: Model, random_weights: bool, peak: Peak, results: list[ConfigResult], settings: dict[str, Any]
) -> dict[str, Any]:
    """The machine-readable result (`--json`); schema in the README."""
    import torch

    from protembed.peaks import device_name

    c, dev = model.encoder.config, model.device
    return {
        "schema": SCHEMA,
        "versions": {
            "protembed": __version__,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
        },
        "model": {
            "name": model.name,
            "source": model.source,
            "family": c.family,
            "n_layers": c.n_layers,
            "d_model": c.d_model,
            "n_heads": c.n_heads,
            "d_ffn": c.d_ffn,
            "random_weights": random_weights,
        },
        "device": {
            "type": dev.type,
            "name": device_name(dev),
            "dtype": str(model.encoder.embed.weight.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
        },
        "peak": {"tflops": round(peak.tflops, 4), "source": peak.source},
        "memory_metric": "cuda_max_allocated" if dev.type == "cuda" else "cpu_peak_rss_process",
        "settings": settings,
        "results": [asdict(r) for r in results],
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def table(results: list[ConfigResult]) -> Table:
    """A header row per configuration, then one row per runner (counts of sequences are in the JSON)."""
    compared = any(r.reference is not None for r in results)
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)
    t.add_column("config", no_wrap=True, min_width=12, max_width=24, overflow="ellipsis")
    columns = ["res/s", "seq/s", "ms/batch", "TFLOP/s", "% peak", "MB"] + (["vs hf", "max |Δ|"] * compared)
    for col in columns:
        t.add_column(col, justify="right", min_width=11 if col == "ms/batch" else None)
    for r in results:
        t.add_row(f"[bold]{r.tokens_per_batch} · {r.workload}[/]")
        for s in (r.protembed, r.reference):
            if s is None:
                continue
            lat = s.batch_latency_ms
            spread = 100 * (lat["max"] - lat["min"]) / 2 / lat["median"] if lat["median"] else 0.0
            cells = [
                f"  {s.runner}",
                f"{s.residues_per_s:,.0f}",
                f"{s.seqs_per_s:,.1f}",
                f"{lat['median']:,.1f} ±{spread:.0f}%",
                f"{s.tflops:.3f}",
                f"{s.pct_of_peak:.1f}",
                f"{s.peak_memory_mb:,.0f}",
            ]
            if compared:
                mine = s is r.protembed and r.speedup is not None
                diff = f"{r.max_abs_diff:.1e}" + (" [red]![/]" if r.disagrees else "")
                cells += [f"{r.speedup:.2f}x", diff] if mine else ["", ""]
            t.add_row(*cells)
    return t


def write_plot(results: list[ConfigResult], path: Path, title: str) -> None:
    """PNG of residues/s against length (synthetic) or token budget (FASTA), one line per runner/budget."""
    from matplotlib.figure import Figure

    synthetic = all(r.length is not None for r in results)
    budgets = sorted({r.tokens_per_batch for r in results})
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in results:
        x = r.length if r.length is not None else r.tokens_per_batch
        for s in (r.protembed, r.reference):
            if s is not None:
                series.setdefault((s.runner, r.tokens_per_batch if synthetic else 0), []).append(
                    (x, s.residues_per_s)
                )
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    colors = {"protembed": "C0", "hf": "C1"}
    for (runner, budget), points in series.items():
        xs, ys = zip(*sorted(points))
        style = ("-", "--", ":", "-.")[budgets.index(budget) % 4] if budget else "-"
        label = f"{runner} ({budget} tok/batch)" if budget and len(budgets) > 1 else runner
        ax.plot(xs, ys, style, marker="o", color=colors.get(runner), label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (residues)" if synthetic else "tokens per batch")
    ax.set_ylabel("residues / s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
