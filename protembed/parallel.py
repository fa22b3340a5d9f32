"""Several devices on one machine: one worker process per device, pulling from a shared queue.

`--device` takes `cpu`, `cpu:N` (N CPU workers sharing the cores), `cuda`, `cuda:0,1`, `0,1,3`
(CUDA indices) or `all` (every visible GPU; `CUDA_VISIBLE_DEVICES` is honoured). Workers pull
units (longest batches first) from one queue, so no device idles at the end while another works
through a backlog; results go back to the single writer in the main process, which places every
row at its input position, so the output does not depend on the number of devices or on timing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp

from protembed.compute import JobSpec, SequenceTooLargeError, compute_unit
from protembed.errors import RERUN, BackendError, OptionError, ProtembedError

if TYPE_CHECKING:  # workers import this module: keep it light (no FASTA or HDF5 modules)
    from protembed.pipeline import Unit

POLL_SECONDS = 0.5
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def parse_devices(spec: str | None) -> list[str]:
    """Device strings for `--device` (None: every GPU when there are several, else one GPU or CPU)."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec is None:
        return [f"cuda:{i}" for i in range(n_gpu)] if n_gpu > 1 else (["cuda:0"] if n_gpu else ["cpu"])
    text = spec.strip().lower()
    if text == "cpu":
        return ["cpu"]
    if text.startswith("cpu:"):
        count = text[4:]
        if not (count.isascii() and count.isdigit()) or int(count) < 1:
            raise OptionError(f"--device {spec}: cpu:N needs a worker count N >= 1")
        if int(count) > (os.cpu_count() or 1):  # each worker is a process with a model copy
            raise OptionError(f"--device {spec}: more workers than this machine's {os.cpu_count()} CPUs")
        return ["cpu"] * int(count)
    if text == "all":
        if not n_gpu:
            raise BackendError("--device all: no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
        return [f"cuda:{i}" for i in range(n_gpu)]
    if text == "cuda":
        text = "cuda:0"
    indices = text.removeprefix("cuda:").split(",")
    if not all(i.strip().isdigit() for i in indices):
        raise OptionError(f"--device {spec}: use cpu, cpu:N, cuda, cuda:0,1, 0,1,3 or all")
    wanted = [int(i) for i in indices]
    if not n_gpu:
        raise BackendError(f"--device {spec}: no CUDA device is visible (this machine runs on cpu)")
    missing = [i for i in wanted if i >= n_gpu]
    if missing:
        raise BackendError(f"--device {spec}: only {n_gpu} CUDA device(s) visible, no cuda:{missing[0]}")
    return [f"cuda:{i}" for i in wanted]


def uses_workers(devices: list[str], spec: str | None) -> bool:
    """Whether the devices run in worker processes: several of them, or `cpu:N` (even `cpu:1`)."""
    return len(devices) > 1 or (spec or "").strip().lower().startswith("cpu:")


def device_label(devices: list[str], spec: str | None = None) -> str:
    """Devices as `--device` writes them: `cpu:2` for two CPU workers, else `cuda:0,cuda:1`."""
    if set(devices) == {"cpu"} and uses_workers(devices, spec):
        return f"cpu:{len(devices)}"
    return ",".join(devices)


class WorkerPool:
    """An executor (see `pipeline.Executor`) running one process per device."""

    def __init__(self, devices: list[str], spec: JobSpec) -> None:
        self.devices, self.spec = devices, spec
        n_cpu = sum(1 for d in devices if d == "cpu")
        share = (os.cpu_count() or 1) // max(n_cpu, 1)
        cap = int(os.environ.get("OMP_NUM_THREADS") or share)  # honour an explicit thread limit
        self.cpu_threads = max(1, min(share, cap))

    def serve(self, get: Callable[[], Unit | None], put: Callable[[Any], None]) -> None:
        ctx = mp.get_context("spawn")
        tasks = ctx.Queue()
        pipes = [ctx.Pipe(duplex=False) for _ in self.devices]  # (receiving end, sending end)
        procs = [
            ctx.Process(
                target=_worker,
                args=(dev, self.spec, self.cpu_threads, tasks, send),
                name=f"protembed-{dev}-{i}",
                daemon=True,
            )  # fmt: skip
            for i, (dev, (_, send)) in enumerate(zip(self.devices, pipes))
        ]
        with _children_ignore_stop_signals():
            for p in procs:
                p.start()
        # Each worker owns the only sending end of its result pipe, so a worker that dies, even
        # half-way through sending a result, ends its pipe: reading it then fails instead of hanging.
        for _, send in pipes:
            send.close()
        names = worker_names(self.devices)
        workers: dict[Connection, tuple[Any, str]] = {
            recv: (p, name) for (recv, _), p, name in zip(pipes, procs, names)
        }
        in_flight, reading, limit = 0, True, 2 * len(procs)
        done = False
        try:
            while reading or in_flight:
                while reading and in_flight < limit:
                    unit = get()
                    if unit is None:
                        reading = False
                        break
                    tasks.put(unit)
                    in_flight += 1
                if not in_flight:
                    continue
                ready = wait(list(workers), timeout=POLL_SECONDS)
                if not ready:
                    _check_alive(procs, names)
                for conn in ready:
                    assert isinstance(conn, Connection)
                    proc, dev = workers[conn]
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        proc.join(timeout=1)
                        raise BackendError(_stopped(dev, proc.exitcode)) from None
                    if kind == "error":
                        raise ProtembedError(payload)
                    if kind == "too-large":
                        raise SequenceTooLargeError(0, payload[1], payload[2], row=payload[0])
                    put(payload)
                    in_flight -= 1
            done = True
        finally:
            _stop(procs, tasks, finished=done)
            for conn in workers:
                conn.close()


@contextmanager
def _children_ignore_stop_signals() -> Iterator[None]:
    """Start processes that ignore SIGINT and SIGTERM from their first instruction (an ignored
    signal stays ignored across exec, and Python then installs no KeyboardInterrupt handler), so a
    Ctrl-C while a worker still imports torch prints no traceback from it. The two signals are
    blocked here meanwhile: one that arrives now reaches this process once they are restored."""
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _stop(procs: list, tasks: Any, finished: bool) -> None:
    """End the workers. After the last result they are told to stop and exit on their own; on an
    error or an interrupt they are killed at once: their queued units would be computed for nothing
    (the rows they hold are not written, and a rerun resumes), and they ignore SIGTERM."""
    for _ in procs:
        tasks.put(None)
    for p in procs:
        if not finished:
            p.kill()
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    # Units left in the task pipe (a worker died, or we stopped early) must not make this
    # process wait for the queue's feeder thread at exit.
    tasks.cancel_join_thread()
    tasks.close()


def worker_names(devices: list[str]) -> list[str]:
    """How messages name each worker: its device, numbered where several share one (`cpu:N`)."""
    names = []
    for k, dev in enumerate(devices):
        total = devices.count(dev)
        names.append(f"{dev} (worker {devices[:k].count(dev) + 1} of {total})" if total > 1 else dev)
    return names


def _stopped(device: str, exitcode: int | None) -> str:
    return (
        f"the worker on {device} stopped (exit code {exitcode}); rows finished so far are kept, "
        f"{RERUN} to resume"
    )


def _check_alive(procs: list, devices: list[str]) -> None:
    for p, dev in zip(procs, devices):
        if p.exitcode is not None:
            raise BackendError(_stopped(dev, p.exitcode))


def _worker(device: str, spec: JobSpec, cpu_threads: int, tasks: Any, results: Connection) -> None:
    """Worker process: load the model on `device`, compute units until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and SIGTERM and
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stops its workers (or they end with it)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked while we were started
    exit_with_parent()
    from protembed.backends import prepare
    from protembed.compute import COMPUTE_DTYPES
    from protembed.models.checkpoints import load_checkpoint

    if device == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        loaded = load_checkpoint(Path(spec.model_path), dtype=COMPUTE_DTYPES[spec.dtype], device=device)
        encoder = prepare(loaded, spec.backend, spec.dtype, spec.compile)
        while (unit := tasks.get()) is not None:
            reps, tokens, starts = unit
            try:
                results.send(("ok", (reps, compute_unit(encoder, spec, tokens, starts))))
            except SequenceTooLargeError as exc:
                results.send(
                    ("too-large", (int(reps[min(exc.position, reps.size - 1)]), exc.n_tokens, device))
                )
                return
    except (BrokenPipeError, ConnectionResetError):
        return  # the main process is gone (killed): nobody is left to tell
    except ProtembedError as exc:
        _tell(results, ("error", f"{device}: {exc}"))
    except Exception as exc:  # a bug or a driver error: report it with its type, then stop
        _tell(results, ("error", f"{device}: worker failed: {type(exc).__name__}: {exc}"))


def exit_with_parent() -> None:
    """End this worker as soon as the main process is gone (killed with -9 it cannot stop us):
    a worker blocked on the task queue would otherwise live on, holding memory and the GPU."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="protembed-parent-watch", daemon=True).start()


def _tell(results: Connection, message: tuple[str, str]) -> None:
    """Send a last message to the main process, unless it is gone."""
    try:
        results.send(message)
    except (BrokenPipeError, ConnectionResetError):
        pass
