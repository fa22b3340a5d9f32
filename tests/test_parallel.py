"""Several devices and torchrun: the output equals a single-process run; failures are survived.

All of it runs on CPU (`--device cpu:N`, torchrun with the gloo backend on 127.0.0.1); the same
code drives one process per GPU on CUDA machines.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest

from protembed import merge as merge_module
from protembed.alphabet import ALPHABETS
from protembed.batching import split_tail, token_batches
from protembed.compute import BatchResult
from protembed.errors import BackendError, OptionError, StoreError
from protembed.export import compressed_copy
from protembed.fasta import duplicate_groups, scan_fasta
from protembed.merge import find_shards, merge_shards, shard_ranges
from protembed.parallel import _children_ignore_stop_signals, _stop, device_label, parse_devices, worker_names
from protembed.pipeline import (
    TAIL_BATCHES,
    Work,
    plan_members,
    read_windows,
    run_pipeline,
    units_to_compute,
)
from protembed.reader import open_embeddings
from protembed.store_file import unfinished_output
from tests.helpers import damage_chunk, fixture_dir, rows_written

ESM = str(fixture_dir("esm2_t3_h64") / "checkpoint")
PROTEMBED = [sys.executable, "-m", "protembed"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~1200 random proteins (~190k tokens: several read-ahead windows)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("par") / "many.fa"
    with path.open("w") as fh:
        for i in range(1200):
            seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), int(rng.integers(20, 300))))
            fh.write(f">p{i} protein {i}\n{seq}\n")
    return path


def embed_args(fasta: Path, out: Path, *extra: str) -> list[str]:
    return ["embed", str(fasta), "-o", str(out), "--model", ESM, "--per-residue", "--quiet",
            "--tokens-per-batch", "2000", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def single(many: Path) -> Path:
    out = many.with_name("single.h5")
    subprocess.run([*PROTEMBED, *embed_args(many, out), "--device", "cpu"], check=True, env=ENV)
    return out


def assert_same_file(a: Path, b: Path, atol: float = 1e-6) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert bool(fb.attrs["complete"])
        for name in ("ids", "descriptions", "lengths", "offsets", "truncated", "skipped"):
            assert np.array_equal(fa[name][:], fb[name][:]), name
        for name in ("mean", "residues"):  # NaN in the same places: skipped rows
            np.testing.assert_allclose(fb[name][:], fa[name][:], rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("workers", [1, 2])
def test_cpu_workers_equal_one_process(many: Path, single: Path, workers: int) -> None:
    """`cpu:N` runs N worker processes (N = 1 too); the file equals the in-process run's."""
    out = many.with_name(f"cpu{workers}.h5")
    cmd = [*PROTEMBED, *embed_args(many, out), "--device", f"cpu:{workers}", "--json"]
    summary = json.loads(subprocess.run(cmd, check=True, env=ENV, capture_output=True, text=True).stdout)
    assert summary["device"] == f"cpu:{workers}"  # as --device writes it
    assert_same_file(single, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("merge", [True, False])
def test_torchrun_two_ranks_equal_one_process(many: Path, single: Path, merge: bool, tmp_path: Path) -> None:
    fasta = tmp_path / many.name
    shutil.copy(many, fasta)
    out = tmp_path / "tr.h5"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd = [*launcher, *rendezvous, "-m", "protembed", *embed_args(fasta, out)]
    if merge:
        cmd.remove("--quiet")  # progress: log lines, stderr being a pipe
    else:
        cmd.append("--no-merge")
    r = subprocess.run([*cmd, "--json"], check=True, env=ENV, capture_output=True, text=True)
    job = json.loads(r.stdout)  # one summary, from rank 0, for the whole job
    assert ("rank 0/2: merging 1,200 rows" in r.stderr) == merge, r.stderr
    with h5py.File(single, "r") as f:
        assert (job["records"], job["residues"]) == (len(f["lengths"]), int(f["lengths"][:].sum()))
    assert (job["ranks"], job["computed"], job["output"]) == (2, 1200, str(out))
    assert job["device"] == "2 ranks (rank 0: cpu)"
    shards = sorted(tmp_path.glob("tr.shard-*"))
    assert len(shards) == (0 if merge else 2)
    with h5py.File(out, "r") as f:
        assert ("virtual_shards" in f.attrs) != merge
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    cwd = os.getcwd()
    os.chdir(other_dir)  # the virtual file finds its shards beside it, from any directory
    try:  # bitwise: each shard computes the batches the single process did (no sequence repeats)
        assert_same_file(single, out, atol=0)
    finally:
        os.chdir(cwd)
    if not merge:  # without its shards, a virtual file would read as zeros: refused instead
        (other_dir / "link.h5").symlink_to(out)  # through a link, HDF5 finds the shards beside the target
        with open_embeddings(other_dir / "link.h5") as emb:
            assert len(emb) > 0
        shards[1].rename(other_dir / shards[1].name)
        with pytest.raises(StoreError, match=rf"not beside it: {shards[1].name} \(copy them"):
            open_embeddings(out)
        r = subprocess.run([*PROTEMBED, "export", str(out), "-o", str(tmp_path / "x.h5")],
                           env=ENV, capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 1 and "not beside it" in r.stderr and "Traceback" not in r.stderr


def test_torchrun_three_ranks_with_skipped_and_repeated_records(
    many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank keeps only its own part of the input (headers read again for its rows): bad
    records skipped in place, repeats across ranks and non-ASCII headers come out as a single
    process writes them, and the job's summary names the skipped rows by input row. The merge
    reads texts and embeddings a bounded piece at a time."""
    records = many.read_text().split(">")[1:]
    seq_of = {i: r.split("\n", 1)[1] for i, r in enumerate(records)}
    records[3] = "p3 bad\nMK7\n"
    records[600] = "p600 empty\n"
    records[700] = f"p700 repeats p10\n{seq_of[10]}"
    records[1150] = f"p1150 caf\u00e9, repeats p10\n{seq_of[10]}"
    fasta = tmp_path / "mixed.fa"
    fasta.write_text("".join(">" + r for r in records))
    extra = ("--on-invalid", "skip", "--json")
    one = tmp_path / "one.h5"
    cmd = [*PROTEMBED, *embed_args(fasta, one, *extra), "--device", "cpu"]
    alone = json.loads(subprocess.run(cmd, check=True, env=ENV, capture_output=True, text=True).stdout)
    out = tmp_path / "tr.h5"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd = [*launcher, *rendezvous, "-m", "protembed", *embed_args(fasta, out, *extra, "--no-merge")]
    job = json.loads(subprocess.run(cmd, check=True, env=ENV, capture_output=True, text=True).stdout)
    monkeypatch.setattr(merge_module, "COPY_BYTES", 200_000)  # a few rows per step, not whole shards
    monkeypatch.setattr(merge_module, "TEXT_ROWS", 64)  # skip reasons read in several blocks
    calls: list[tuple[int, int]] = []
    merge_shards(out, find_shards(out), overwrite=True, progress=lambda *done: calls.append(done))
    assert calls[0] == (0, 1198) and calls[-1] == (1198, 1198) and len(calls) > 10
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    assert job["skip_reasons"] == alone["skip_reasons"] and set(job["skip_reasons"]) == {"3", "600"}
    assert job["skip_reasons"]["3"] == f"{fasta}:8: invalid residue '7' at position 3"
    assert (job["records"], job["skipped"], job["computed"] + job["duplicates"]) == (1200, 2, 1198)
    # a sequence repeated in another shard is computed in each: its window's batches differ (README)
    assert_same_file(one, out, atol=1e-5)
    with h5py.File(out, "r") as f:
        assert f["descriptions"].asstr()[1150] == "p1150 caf\u00e9, repeats p10"
        assert f["skip_reasons"].asstr()[600] == f"{fasta}:1201: empty sequence"
        assert f.attrs["n_sequences"] == 1200
        assert np.array_equal(f["mean"][700], f["mean"][10]) and np.array_equal(
            f["mean"][1150], f["mean"][10]
        )


def test_joined_texts_read_across_shards(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "t.h5", "w") as f:
        parts = [["a", "b\u00e9"], [], ["c"], ["d", "e", "f"]]
        for k, texts in enumerate(parts):
            f.create_dataset(str(k), data=np.array(texts, dtype=object), dtype=h5py.string_dtype())
        joined = merge_module._JoinedTexts([f[str(k)] for k in range(len(parts))])
        flat = [t for texts in parts for t in texts]
        assert len(joined) == 6 and joined[:] == flat and list(joined) == flat
        assert all(joined[a:b] == flat[a:b] for a in range(-7, 8) for b in range(-7, 8))
        assert (joined[1], joined[-1], joined[2]) == ("b\u00e9", "f", "c")
        with pytest.raises(IndexError):
            joined[6]


def test_torchrun_rerun_takes_finished_shards_and_a_stopped_merge(
    many: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun of a job whose shards are done (a rank finished before the job was stopped) or
    whose merge was stopped half-way finishes it without recomputing; --compression holds."""
    fasta = tmp_path / many.name
    shutil.copy(many, fasta)
    out = tmp_path / "tr.h5"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]

    def job(*extra: str) -> str:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        cmd = [*launcher, *rendezvous, "-m", "protembed", *embed_args(fasta, out, "--compression", "gzip")]
        return subprocess.run([*cmd, *extra], check=True, env=ENV, capture_output=True, text=True).stderr

    job("--no-merge")
    shards = sorted(tmp_path.glob("tr.shard-*"))
    out.unlink()  # both shards done, no output: as if the job stopped before rank 0 merged
    copied: list[int] = []
    real_copy = merge_module._copy_rows

    def stop_after_one_shard(*args: Any) -> None:
        if copied:
            raise KeyboardInterrupt
        copied.append(1)
        real_copy(*args)

    monkeypatch.setattr(merge_module, "_copy_rows", stop_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(out, shards)
    assert unfinished_output(out) and 0 < rows_written(out) < 1200
    (tmp_path / "tr.shard-000-of-003.h5").touch()  # left by a run with 3 ranks: named, not used
    err = job()
    assert "note: shard files of a run with another number of ranks are beside" in err
    assert "(*-of-003); this run of 2 ranks does not use them" in err
    assert not any(p.exists() for p in shards)  # merged, then removed
    assert_same_file(single, out)
    with h5py.File(out, "r") as f:
        assert f["mean"].compression == "gzip" and f["residues"].compression == "gzip"


def test_torchrun_refuses_an_unfinished_single_process_output_at_once(single: Path, tmp_path: Path) -> None:
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">p{i}\nMKTAYIAKQR{'A' * i}\n" for i in range(40)))
    out = tmp_path / "left.h5"
    shutil.copy(single, out)
    with h5py.File(out, "r+") as f:  # an unfinished output of a single-process run
        f.attrs["complete"] = False
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    r = subprocess.run([*launcher, *rendezvous, "-m", "protembed", *embed_args(fasta, out)],
                       env=ENV, capture_output=True, text=True)  # fmt: skip
    told = "left.h5: an unfinished output of a single-process run (no shard files beside it); run its command"
    assert r.returncode != 0 and r.stderr.count(told) == 2, r.stderr
    assert not list(tmp_path.glob("*.shard-*"))  # refused before any rank computed (torchrun's own
    # ChildFailedError traceback follows the ranks' one-line errors)


def test_a_single_process_run_and_a_torchrun_jobs_shards(single: Path, tmp_path: Path) -> None:
    """Shards beside a missing output: a torchrun job is writing it or stopped, and a run without
    torchrun would neither use nor remove them: refused. Beside an unfinished output while not all
    done: that output is a single-process run's own, which resumes. All done beside an unfinished
    output: the job's stopped merge, refused. A complete output gets the usual message."""
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">p{i}\nMKTAYIAKQR{'A' * i}\n" for i in range(10)))
    out = tmp_path / "job.h5"
    shard = tmp_path / "job.shard-001-of-002.h5"
    shard.write_bytes(b"a rank's shard, not finished")

    def embed(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PROTEMBED, *embed_args(fasta, out, *extra)], env=ENV, capture_output=True, text=True
        )

    r = embed()
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"shard files of a torchrun job are beside {out} (*-of-002): run that torchrun" in r.stderr
    r = embed("--overwrite")  # then interrupted, say: the same run without --overwrite resumes
    assert r.returncode == 0 and "this run does not use or remove them" in r.stderr, r.stderr
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    r = embed()
    assert r.returncode == 0 and "this run does not use or remove them" in r.stderr, r.stderr
    assert shard.read_bytes() == b"a rank's shard, not finished" and rows_written(out) == 10
    again = embed()
    assert again.returncode == 1 and "shard files" not in again.stderr, again.stderr  # complete: usual check

    for rank in (0, 1):  # every shard done, the output unfinished: the job's merge stopped
        shutil.copy(single, tmp_path / f"job.shard-{rank:03d}-of-002.h5")
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    r = embed()
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{out}: the stopped merge of a torchrun job whose shards are all done" in r.stderr
    assert f"`protembed merge {out}`" in r.stderr


def test_shard_ranges_cover_every_row_at_window_boundaries() -> None:
    rng = np.random.default_rng(3)
    n_tokens = rng.integers(30, 1000, 5000)
    windows = read_windows(n_tokens)
    for world in (1, 2, 3, 7):
        ranges = shard_ranges(n_tokens, windows, world)
        assert ranges[0][0] == 0 and ranges[-1][1] == n_tokens.size
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))
        for start, _ in ranges[1:]:
            assert start == n_tokens.size or windows[start] != windows[start - 1]
        shares = [n_tokens[a:b].sum() for a, b in ranges]
        assert max(shares) - min(shares) <= 2 * (1 << 16) + 1000


def test_split_tail_cuts_only_the_last_batches_keeping_order() -> None:
    n_tokens = np.random.default_rng(4).integers(30, 900, 400)
    batches = token_batches(n_tokens, 4000)
    cut = split_tail(batches, n_tokens, last=3, pieces=4)
    kept = len(batches) - 3
    assert [b.tolist() for b in cut[:kept]] == [b.tolist() for b in batches[:kept]]
    assert np.concatenate(cut[kept:]).tolist() == np.concatenate(batches[kept:]).tolist()
    assert len(cut) - kept >= 3 * 4
    for piece in cut[kept:]:
        assert n_tokens[piece].sum() <= 1000 or piece.size == 1


def test_only_the_inputs_last_window_ends_on_small_units(many: Path) -> None:
    index = scan_fasta(many, ALPHABETS["esm2"])
    try:
        rows = np.arange(len(index))
        lengths = index.n_residues.astype(np.int64)
        window_of = read_windows(lengths + 2)
        members = plan_members(rows, duplicate_groups(index.seq_hash, np.zeros(len(index), dtype=bool)))
        work = Work(index, ALPHABETS["esm2"], members, np.ones(len(index), dtype=bool), lengths, 1022,
                    False, window_of, int(window_of[-1]))  # fmt: skip
        units = list(units_to_compute(work, 2000))
    finally:
        index.cleanup()
    sizes = [sum(t.size for t in tokens) for _, tokens, _ in units]
    last = [window_of[reps[0]] == window_of[-1] for reps, _, _ in units]
    assert window_of[-1] > 0 and not all(last)  # several windows
    full = [s for s, is_last in zip(sizes, last) if not is_last]
    assert np.median(full) > 1500  # other windows: full batches, nothing cut
    assert max(sizes[-TAIL_BATCHES * 3 :]) <= 600  # the end of the input: quarter batches
    assert sorted(np.concatenate([r for r, _, _ in units]).tolist()) == rows.tolist()


def test_parse_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_devices("cpu") == ["cpu"]
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert parse_devices("cpu:3") == ["cpu", "cpu", "cpu"]
    with pytest.raises(OptionError, match="cpu:4: more workers than this machine's 3 CPUs"):
        parse_devices("cpu:4")
    assert device_label(["cpu"]) == "cpu" and device_label(["cpu"], "cpu:1") == "cpu:1"
    assert device_label(["cuda:0", "cuda:1"]) == "cuda:0,cuda:1"
    for bad in ("cpu:0", "cpu:x", "gpu", "cuda:a"):  # a malformed value: a ValueError, like other options
        with pytest.raises(OptionError):
            parse_devices(bad)
    if not (__import__("torch").cuda.is_available()):
        with pytest.raises(BackendError, match="no CUDA device"):
            parse_devices("all")
        with pytest.raises(BackendError, match="no CUDA device"):
            parse_devices("0,1")


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append((int(entry.name), cmdline))
    return out


def _start_and_wait(cmd: list[str], out: Path) -> subprocess.Popen:
    child = "import sys, protembed.embed as e; e.FLUSH_SECONDS = 0.0; from protembed.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", child, *cmd], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while rows_written(out) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


ORPHAN_SCRIPT = """
import multiprocessing, sys, time
from protembed import parallel

def idle_worker():  # like a worker waiting on an empty task queue
    parallel.exit_with_parent()
    time.sleep(600)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=idle_worker)
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_workers_end_when_the_main_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: the main process cannot stop its workers itself
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while Path(f"/proc/{worker}").exists() and time.time() < deadline:
        time.sleep(0.1)
    alive = Path(f"/proc/{worker}").exists()
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "a worker outlived the main process"


def _busy_worker(tasks: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as real workers do
    while True:  # a long unit: never reads the stop message
        time.sleep(0.05)


def _polite_worker(tasks: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while tasks.get() is not None:
        pass


def test_stopping_workers_kills_busy_ones_only_after_an_interrupt() -> None:
    """On Ctrl-C or an error, workers are killed at once instead of computing their queued units
    (a SIGTERM would be ignored); after the last result they exit on their own, exit code 0."""
    ctx = multiprocessing.get_context("fork")
    for target, finished, code in [(_busy_worker, False, -signal.SIGKILL), (_polite_worker, True, 0)]:
        tasks = ctx.Queue()
        procs = [ctx.Process(target=target, args=(tasks,), daemon=True) for _ in range(2)]
        for p in procs:
            p.start()
        tasks.put("a queued unit")
        _stop(procs, tasks, finished=finished)
        assert [p.exitcode for p in procs] == [code, code]


def _exit_with_sigint_disposition() -> None:
    sys.exit(0 if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else 3)


def test_workers_ignore_ctrl_c_from_their_start() -> None:
    """A Ctrl-C while a worker still imports torch printed its KeyboardInterrupt traceback: workers
    are started with SIGINT ignored (Python then installs no handler of its own)."""
    ctx = multiprocessing.get_context("spawn")
    before = signal.getsignal(signal.SIGINT)
    plain = ctx.Process(target=_exit_with_sigint_disposition)
    plain.start()
    with _children_ignore_stop_signals():
        ignoring = ctx.Process(target=_exit_with_sigint_disposition)
        ignoring.start()
    for p in (plain, ignoring):
        p.join(timeout=120)
    assert (plain.exitcode, ignoring.exitcode) == (3, 0)
    assert signal.getsignal(signal.SIGINT) == before
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, set()) & {signal.SIGINT, signal.SIGTERM}


def test_killed_worker_stops_cleanly_and_rerun_completes(many: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    proc = _start_and_wait(embed_args(many, out, "--device", "cpu:2"), out)
    workers = [pid for pid, cmd in _children(proc.pid) if "spawn_main" in cmd]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 15
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(r"worker on cpu \(worker [12] of 2\) stopped", lines[0]), err
    assert "resume" in lines[0]
    kept = rows_written(out)
    assert kept > 0
    subprocess.run([*PROTEMBED, *embed_args(many, out, "--device", "cpu:2")], check=True, env=ENV)
    assert_same_file(single, out)


def test_ctrl_c_leaves_a_resumable_file(many: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted.h5"
    proc = _start_and_wait(embed_args(many, out, "--device", "cpu"), out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert 0 < rows_written(out) < 1200
    subprocess.run([*PROTEMBED, *embed_args(many, out)], check=True, env=ENV)
    assert_same_file(single, out)


def test_sigterm_stops_like_ctrl_c(many: Path, single: Path, tmp_path: Path) -> None:
    """What a scheduler's time limit sends: rows finished are kept, the lock is gone, exit 143."""
    out = tmp_path / "terminated.h5"
    proc = _start_and_wait(embed_args(many, out, "--device", "cpu:2"), out)
    workers = [pid for pid, cmd in _children(proc.pid) if "spawn_main" in cmd]
    for pid in [proc.pid, *workers]:  # as SLURM signals every process of the step
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().startswith("terminated;") and "Traceback" not in err, err
    assert not out.with_name(out.name + ".lock").exists()
    assert 0 < rows_written(out) < 1200
    subprocess.run([*PROTEMBED, *embed_args(many, out)], check=True, env=ENV)
    assert_same_file(single, out)


def test_merge_refuses_partial_shards(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "job.h5"
    with pytest.raises(StoreError, match="no shard files"):
        find_shards(out)
    with pytest.raises(StoreError, match="no shard files"):  # no such folder: the same message
        find_shards(tmp_path / "nowhere" / "job.h5")
    shard0, shard1 = tmp_path / "job.shard-000-of-002.h5", tmp_path / "job.shard-001-of-002.h5"
    shutil.copy(single, shard0)
    with pytest.raises(StoreError, match="shard files missing: job.shard-001-of-002.h5"):
        find_shards(out)
    stale = tmp_path / "job.shard-000-of-003.h5"  # a set left by an earlier run with 3 ranks
    shutil.copy(single, stale)
    with pytest.raises(StoreError, match=r"different numbers of ranks beside it \(\*-of-002, \*-of-003\)"):
        find_shards(out)
    stale.unlink()
    (tmp_path / "job.shard-000-of-002.h5.partial").touch()  # other names beside them are ignored
    shutil.copy(single, shard1)
    with pytest.raises(StoreError, match="not a shard of a torchrun job"):
        merge_shards(out, find_shards(out))
    n = 1200
    for rank, path in enumerate((shard0, shard1)):  # two shards as a killed job leaves them
        with h5py.File(path, "r+") as f:
            f.attrs.update(
                shard_start=rank * n, shard_stop=(rank + 1) * n, shard_rank=rank, shard_world_size=2
            )
            f.attrs["complete"] = rank == 0
    with pytest.raises(StoreError, match="unfinished"):
        merge_shards(out, find_shards(out))
    r = subprocess.run([*PROTEMBED, "merge", str(out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "unfinished" in r.stderr, r.stderr
    assert not out.exists()
    with h5py.File(shard1, "r+") as f:  # both complete, but rank 1 is a copy of rank 0
        f.attrs.update(shard_start=0, shard_stop=n, complete=True)
    listing = r"\(job.shard-000-of-002.h5 rows 0:1200, job.shard-001-of-002.h5 rows 0:1200\)$"
    with pytest.raises(StoreError, match=rf"^{tmp_path}: shards do not cover consecutive rows {listing}"):
        merge_shards(out, find_shards(out))
    compressed_copy(single, shard1, "gzip")  # complete again, with data that cannot be read
    with h5py.File(shard1, "r+") as f:
        f.attrs.update(shard_start=n, shard_stop=2 * n, shard_rank=1, shard_world_size=2)
    damage_chunk(shard1, "mean", 1)
    r = subprocess.run([*PROTEMBED, "merge", str(out), "-q"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {shard1}: damaged HDF5 file (") and "rows " in r.stderr, r.stderr


def test_ctrl_c_inside_a_result_put_does_not_hang_the_writer(tmp_path: Path) -> None:
    """Ctrl-C landing inside `Condition.notify` of the results queue (between waking the writer and
    unlisting it) used to leave the writer asleep beside the end marker, and the run hung."""
    fasta = tmp_path / "two.fa"
    fasta.write_text(">a\nMKTAYI\n>b\nMSEQ\n")
    index = scan_fasta(fasta, ALPHABETS["esm2"])
    rows = np.arange(len(index))
    members = plan_members(rows, duplicate_groups(index.seq_hash, np.zeros(len(index), dtype=bool)))
    lengths = index.n_residues.astype(np.int64)
    work = Work(index, ALPHABETS["esm2"], members, np.ones(len(index), dtype=bool), lengths, 1022,
                False, np.zeros(len(index), dtype=np.int64), 0)  # fmt: skip
    written: list[list[int]] = []

    class Writer:
        def write(self, rows: np.ndarray, pooled: dict, residues: object) -> None:
            written.append(rows.tolist())

    class Interrupted:
        """Hands one result over, with a 'Ctrl-C' raised at one bytecode inside Condition.notify."""

        def serve(self, get: Any, put: Any) -> None:
            get()
            time.sleep(0.3)  # the writer is now waiting on the results queue
            armed = [True]

            def tracer(frame: Any, event: str, arg: Any) -> Any:
                if event == "line" and armed[0] and frame.f_code.co_name == "notify":
                    line = inspect.getsourcelines(frame.f_code)[0]
                    text = line[frame.f_lineno - frame.f_code.co_firstlineno]
                    if "waiters.remove" in text:
                        armed[0] = False
                        raise KeyboardInterrupt
                return tracer

            result = BatchResult({"mean": np.zeros((1, 1, 4), dtype=np.float32)}, None)
            sys.settrace(tracer)
            try:
                put((np.array([0]), result))
            except KeyboardInterrupt:
                sys.settrace(None)
                time.sleep(0.3)  # as stopping the workers takes: the writer waits again meanwhile
                raise
            finally:
                sys.settrace(None)
            raise AssertionError("the simulated Ctrl-C did not fire")

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            spec = SimpleNamespace(budget=4096)
            run_pipeline(work, spec, Interrupted(), Writer(), None)  # type: ignore[arg-type]
        except BaseException as exc:
            outcome.append(exc)

    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=20)
    finally:
        index.cleanup()
    assert not thread.is_alive(), "the pipeline hung after Ctrl-C"
    assert outcome and isinstance(outcome[0], KeyboardInterrupt)
    assert written == [[0]], "the result handed over before Ctrl-C was still written"


def test_workers_sharing_a_device_are_numbered_in_messages() -> None:
    assert worker_names(["cpu", "cpu"]) == ["cpu (worker 1 of 2)", "cpu (worker 2 of 2)"]
    assert worker_names(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
