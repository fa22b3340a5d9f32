"""`protembed bench`: embedding throughput per (workload, token budget), optionally against transformers."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from protembed.bench_output import report, table, write_plot
from protembed.cache import check_file_output
from protembed.cli_common import (
    Backend,
    BackendOption,
    CompileOption,
    counted,
    err_console,
    handle_errors,
    out_console,
    path_value,
    print_json,
    resolve_device,
)
from protembed.errors import OptionError, UnknownModelError, require_matplotlib
from protembed.registry import DEFAULT_MODEL, MODELS, lookup

if TYPE_CHECKING:  # torch and the bench machinery are imported when the command runs, not for --help
    import torch

    from protembed.api import Model
    from protembed.bench import ConfigResult, Workload

DEFAULT_LENGTHS = "64,128,256,512,1022"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Compare(str, Enum):
    hf = "hf"


def parse_ints(values: list[str], option: str, top: int | None = None) -> list[int]:
    """Positive integers (at most `top`) from repeated and/or comma-separated option values, in
    order, de-duplicated."""
    out: list[int] = []
    for value in values:
        for part in (p.strip() for p in value.split(",")):
            if not (part.isascii() and part.isdigit()) or int(part) < 1:
                got = repr(part) if part else f"an empty item in {value!r}"
                raise typer.BadParameter(f"expected positive integers, got {got}", param_hint=f"'{option}'")
            if top is not None and int(part) > top:
                raise typer.BadParameter(f"{part} is more than {top}", param_hint=f"'{option}'")
            if int(part) not in out:
                out.append(int(part))
    return out


def build_model(
    name: str, random_weights: bool, dtype: torch.dtype, device: torch.device, seed: int
) -> Model:
    """A registry model or checkpoint directory; with `random_weights`, its shape with random values."""
    from protembed.api import Model, load_model
    from protembed.models.checkpoints import random_model, read_config, registry_config

    if not random_weights:
        return load_model(name, dtype=dtype, device=device)
    info = lookup(name)
    if info is not None:
        config, label = registry_config(info.name), info.name
    elif Path(name).is_dir():
        config, label = read_config(Path(name)), Path(name).name
    else:
        raise UnknownModelError(
            name,
            list(MODELS),
            f"with --random-weights give a registry name ({', '.join(MODELS)}) or a checkpoint directory",
        )
    encoder = random_model(config, seed=seed, dtype=dtype, device=device)
    return Model(encoder=encoder, name=label, source="random weights", revision="random")


@handle_errors
def bench(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Registry name, Hub repo id or checkpoint dir.", metavar="MODEL"),
    ] = DEFAULT_MODEL,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default: the GPU if any).", metavar="DEVICE")
    ] = None,
    dtype: Annotated[DType, typer.Option(help="Weights and compute dtype.")] = DType.float32,
    backend: BackendOption = Backend.auto,
    compile: CompileOption = False,
    lengths: Annotated[
        list[str] | None,
        typer.Option(
            metavar="N,N,...",
            help=f"Synthetic sequence lengths, comma-separated or repeated (default: {DEFAULT_LENGTHS}).",
        ),
    ] = None,
    tokens_per_batch: Annotated[
        list[str] | None,
        typer.Option(
            metavar="N,N,...",
            help="Tokens per batch, comma-separated or repeated for a sweep (default: embed's, 4096 on CPU).",
        ),
    ] = None,
    input: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="Benchmark this FASTA instead of synthetic data.",
            metavar="FASTA",
            parser=path_value,
            dir_okay=False,  # for the completions; the command checks it is a file
        ),
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="Random weights at the model's shape: no download (speed does not depend on the values).",
            metavar="",
        ),
    ] = False,
    compare: Annotated[
        Compare | None,
        typer.Option(help="Also run Hugging Face transformers on the same workload (ESM-2 only)."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed passes per configuration.")] = 3,
    batches: Annotated[int, typer.Option(min=1, help="Full batches per synthetic workload.")] = 4,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: torch's).")] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="Seed of synthetic sequences and random weights.")
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print machine-readable results on stdout.", metavar="")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG of residues/s against length.", metavar="PNG", parser=path_value),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --plot file.", metavar="")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.", metavar="")] = False,
) -> None:
    """Measure embedding throughput (residues/s, TFLOP/s, % of peak, memory) on synthetic or FASTA input."""
    if input is not None and not input.is_file():  # an input mistake: exit 1, as embed's
        why = "no such file" if str(input) != "-" else "bench reads a file, not stdin"
        raise OptionError(f"--input {input}: {'is a folder' if input.is_dir() else why}")
    if input is not None and lengths:
        raise typer.BadParameter(
            "give either --lengths (synthetic) or --input (FASTA), not both", param_hint="'--lengths'"
        )
    length_list = parse_ints(lengths or [DEFAULT_LENGTHS], "--lengths")
    from protembed.batching import MAX_TOKEN_BUDGET  # torch: imported only now, not for --help

    budgets = parse_ints(tokens_per_batch, "--tokens-per-batch", MAX_TOKEN_BUDGET) if tokens_per_batch else []
    if plot is not None:
        require_matplotlib()
        if plot.suffix.lower() != ".png":
            raise OptionError(f"--plot {plot}: the plot is a PNG; name the file *.png")
        check_file_output(plot, overwrite)
    import torch

    from protembed import bench_hf
    from protembed.api import DTYPES
    from protembed.backends import describe, prepare, resolve_backend
    from protembed.batching import default_token_budget
    from protembed.bench import (
        WARMUP_BATCHES,
        BenchError,
        bench_config,
        fasta_workload,
        protembed_runner,
        synthetic_workload,
    )
    from protembed.peaks import device_name, device_peak

    if threads is not None:
        if threads > (os.cpu_count() or 1):  # torch crashes on absurd counts
            raise OptionError(f"--threads {threads}: this machine has {os.cpu_count()} CPUs")
        torch.set_num_threads(threads)
    if device is not None and device.startswith("cpu:"):
        raise OptionError("bench times one process; --device cpu:N (worker processes) is for embed")
    dev = resolve_device(device)
    resolved = resolve_backend(backend.value, str(dev), dtype.value, compile)
    loaded = build_model(model, random_weights, DTYPES[dtype.value], dev, seed)
    config = loaded.encoder.config
    budgets = budgets or [default_token_budget(config, dev, DTYPES[dtype.value])]  # what embed would use
    if compare is not None:
        bench_hf.require_transformers(config.family)
    # the reference copies the canonical weights, so it is built before the backend wraps them
    reference = bench_hf.hf_runner(loaded.encoder) if compare is not None else None
    loaded.encoder = prepare(loaded.encoder, resolved, dtype.value, compile)
    too_long = [n for n in length_list if n > config.max_residues]
    if input is None and too_long:
        raise BenchError(
            f"--lengths {too_long[0]} exceeds the model's maximum of {config.max_residues} residues"
        )

    def say(msg: str) -> None:
        if not quiet:
            err_console.print(msg, highlight=False)

    weights = "random weights: speed does not depend on the values" if random_weights else loaded.source
    say(f"model {loaded.name}: {weights}; {dev} {dtype.value}, {counted(torch.get_num_threads(), 'thread')}")
    peak = device_peak(dev, DTYPES[dtype.value])
    say(f"peak {peak.tflops:.3f} TFLOP/s ({peak.source})")
    ours = protembed_runner(loaded)
    fasta = fasta_workload(input, loaded.alphabet, config.max_residues) if input is not None else None
    if fasta is not None and fasta.truncated:
        cut = counted(fasta.truncated, "sequence")
        say(f"{cut} cut to {config.max_residues} residues (the model's maximum)")

    results: list[ConfigResult] = []
    for budget in budgets:
        workloads: list[Workload] = (
            [fasta]
            if fasta is not None
            else [synthetic_workload(n, budget, batches, seed) for n in length_list]
        )
        for w in workloads:
            say(f"running {w.name}, {budget} tokens/batch, {len(w.sequences)} sequences")
            results.append(bench_config(ours, w, budget, repeats, config, peak, reference))

    settings = {
        "repeats": repeats,
        "warmup_batches": WARMUP_BATCHES,
        "batches": batches,
        "seed": seed,
        "input": str(input) if input else None,
        "compare": compare.value if compare else None,
        "backend": describe(resolved, dtype.value, compile),
        "truncated": fasta.truncated if fasta else 0,
    }
    if as_json:
        print_json(report(loaded, random_weights, peak, results, settings))
    else:
        what = f"; input {input} ({len(fasta.sequences)} sequences)" if fasta is not None else ""
        out_console.print(
            f"[bold]{loaded.name}[/] ({weights}){what}; {device_name(dev)}, {dtype.value}, "
            f"{counted(torch.get_num_threads(), 'thread')}; peak {peak.tflops:.3f} TFLOP/s "
            f"({peak.source})",
            highlight=False,
        )
        out_console.print(table(results))
        memory = (
            "CUDA max allocated in the timed passes (working memory + the runner's own weights)"
            if dev.type == "cuda"
            else "peak RSS of the whole process (never decreases; includes everything loaded before"
            + (", both models)" if reference else ")")
        )
        out_console.print(
            f"config: tokens per batch · workload. ms/batch: median of {repeats} "
            f"pass{'es' if repeats > 1 else ''} ± half the range. TFLOP/s: matmuls + attention over "
            f"real tokens. MB: {memory}."
            + (
                " vs hf: residues/s ratio; max |Δ|: of the mean embeddings (! above rounding)."
                if reference
                else ""
            ),
            highlight=False,
        )
    for r in (r for r in results if r.disagrees):
        err_console.print(
            f"warning: {r.tokens_per_batch} · {r.workload}: protembed and hf differ by max |Δ| "
            f"{r.max_abs_diff:.2e}, above the {r.parity_tolerance:.2e} that {dtype.value} rounding "
            "explains; please report it with this command line",
            highlight=False,
        )
    if plot is not None:
        write_plot(results, plot, f"{loaded.name}, {device_name(dev)}, {dtype.value}")
        say(f"wrote {plot}")
