"""What goes wrong on the user's side of a download: a Hub that never answers, a cache that cannot
be written or is full, a run stopped while checking files, paths that cannot be used. In process,
against the fake Hub of tests/hub_server.py (fixtures in conftest.py); no internet.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from protembed import hub as hub_module
from protembed.cli import app
from protembed.errors import CheckpointError, HubError, OptionError
from protembed.hub import download_model, resolve_model
from protembed.hub_cache import UNFINISHED, cache_root, cached_snapshot, repo_dir, stopped_download
from protembed.hub_errors import hub_warnings
from protembed.models.checkpoints import load_checkpoint
from tests.hub_server import FakeHub, Fault

ESM = "facebook/esm2_t6_8M_UR50D"


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A server on 127.0.0.1 that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_module, "_TIMEOUT", 0.5)
    yield url
    sock.close()
    for conn in held:
        conn.close()


def test_a_refused_connection_says_to_check_the_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HubError, match=r"check the network \(and HF_ENDPOINT\), then run the same command"):
        download_model("esm2-8m", progress=False)


def test_a_hub_that_never_answers_times_out(silent_endpoint: str) -> None:
    with pytest.raises(HubError, match=f"no answer from {silent_endpoint} for {ESM} \\(timed out\\)"):
        download_model("esm2-8m", progress=False)
    with pytest.raises(HubError, match="timed out"):
        resolve_model("esm2-8m", progress=False)  # what `embed -m` does on first use


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_is_named_before_any_request(hub: FakeHub, cache: Path) -> None:
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.raises(HubError, match=f"{cache}: cannot write to Hub cache folder.*--cache-dir"):
            download_model("esm2-8m", progress=False)
    finally:
        cache.chmod(0o755)
    assert hub.requests == []


def test_a_file_as_cache_and_a_full_disk_are_not_download_failures(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("not a folder")
    with pytest.raises(
        HubError, match=f"{cache}: cannot use as Hub cache folder: it is a file.*--cache-dir"
    ) as info:
        download_model("esm2-8m", progress=False)
    assert "run the same command again" not in str(info.value) and hub.requests == []
    cache.unlink()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub_module, "hf_hub_download", full)
    with pytest.raises(
        HubError, match=f"cannot write {ESM} into {cache}: No space left on device; free some"
    ):
        download_model("esm2-8m", progress=False)


def test_hub_warnings_print_as_one_line_or_not_at_all(capsys: pytest.CaptureFixture[str]) -> None:
    for show in (True, False):
        with hub_warnings(show):
            warnings.warn("Not enough free disk space to download.\nMore here.", UserWarning, stacklevel=1)
        err = capsys.readouterr().err
        assert err == ("warning: Not enough free disk space to download. More here.\n" if show else "")


def test_a_run_stopped_while_checking_a_file_checks_it_again(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = hub_module._sha256

    def stopped(path: Path) -> str:
        raise KeyboardInterrupt

    hub.faults[(ESM, "model.safetensors")] = Fault(flip=True)  # a transfer that went wrong
    monkeypatch.setattr(hub_module, "_sha256", stopped)
    with pytest.raises(KeyboardInterrupt):
        download_model("esm2-8m", progress=False)
    snapshot = next(cache.rglob("snapshots/*"))
    assert (snapshot / "model.safetensors").exists() and (snapshot / UNFINISHED).read_text() == "main"
    commit = snapshot.name
    assert cached_snapshot(ESM) is None and cached_snapshot(ESM, commit) is None  # not by any name

    monkeypatch.setattr(hub_module, "_sha256", real)
    hub.requests.clear()
    with pytest.raises(CheckpointError, match="sha256 mismatch"):  # checked again, fetched again
        download_model("esm2-8m", progress=False)
    assert hub.gets(ESM) == ["model.safetensors"]

    hub.faults.clear()
    hub.requests.clear()
    resolved, _ = download_model("esm2-8m", progress=False)
    assert hub.gets(ESM) == ["model.safetensors"] and not (resolved.path / UNFINISHED).exists()
    assert cached_snapshot(ESM) == (resolved.path, commit)


def test_a_complete_copy_stays_cached_when_its_recheck_is_stopped(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download that finds the files of a complete snapshot (another ref for a cached commit)
    checks them again; Ctrl-C there must not leave the copy marked unfinished."""
    resolved, _ = download_model("esm2-8m", progress=False)

    def stopped(path: Path) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(hub_module, "_sha256", stopped)
    with pytest.raises(KeyboardInterrupt):
        hub_module._download("esm2-8m", ESM, None, None, False, False)
    assert not (resolved.path / UNFINISHED).exists()
    assert cached_snapshot(ESM) == (resolved.path, resolved.revision)


def test_partial_files_of_killed_downloads_are_removed(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub names partial files per process and never resumes another's: one a killed
    run left is deleted by the next download of the repo; one still being written is kept."""
    resolved, _ = download_model("esm2-8m", progress=False)
    blobs = resolved.path.parent.parent / "blobs"
    old, fresh = blobs / "ab12.0f0f0f0f.incomplete", blobs / "cd34.1e1e1e1e.incomplete"
    for path in (old, fresh):
        path.write_bytes(b"x" * 1000)
    os.utime(old, (0, os.stat(old).st_mtime - 3600))
    download_model("esm2-8m", force=True, progress=False)
    assert not old.exists() and fresh.exists()


def test_a_checked_file_left_by_a_stopped_run_is_kept(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, stop = hub_module.verify_checkpoint, [True]

    def verify(path: Path) -> None:
        if stop[0]:
            raise KeyboardInterrupt  # after every sha256 check, before the end
        real(path)

    monkeypatch.setattr(hub_module, "verify_checkpoint", verify)
    with pytest.raises(KeyboardInterrupt):
        download_model("esm2-8m", progress=False)
    assert cached_snapshot(ESM) is None
    stop[0] = False
    hub.requests.clear()
    resolved, _ = download_model("esm2-8m", progress=False)
    assert hub.gets(ESM) == []  # its sha256 matched: nothing fetched again
    assert cached_snapshot(ESM) == (resolved.path, resolved.revision)


@pytest.mark.parametrize("value", ["", "~nosuchuser-protembed/hub"])
def test_unusable_cache_paths(value: str) -> None:
    with pytest.raises(OptionError, match="empty|no such user"):
        cache_root(value)
    r = CliRunner().invoke(app, ["download", "esm2-8m", "--cache-dir", value])
    assert r.exit_code == 2, r.output
    assert ("the path is empty" if not value else "~nosuchuser-protembed: no such user") in r.output


@pytest.mark.parametrize("command", ["download", "embed"])
def test_an_empty_revision_is_refused_not_taken_for_main(command: str, tmp_path: Path) -> None:
    args = ["download", "esm2-8m"] if command == "download" else ["embed", str(tmp_path / "x.fa")]
    r = CliRunner().invoke(app, [*args, "--revision", " "])
    assert r.exit_code == 2 and "the revision is empty" in r.output, r.output


def test_unknown_user_in_a_model_path(tmp_path: Path) -> None:
    (tmp_path / "x.fa").write_text(">a\nMKV\n")
    runner = CliRunner()
    for args in (
        ["download", "~nosuchuser-protembed/x"],
        ["embed", str(tmp_path / "x.fa"), "-m", "~nosuchuser-protembed/x"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "no such directory" in r.output, r.output
        assert "Traceback" not in r.output


def test_a_damaged_cached_model_names_the_command_that_fetches_it_again(
    hub: FakeHub, cache: Path, tmp_path: Path
) -> None:
    resolved, _ = download_model("esm2-8m", progress=False)
    blob = (resolved.path / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])  # damaged after the download
    fasta = tmp_path / "x.fa"
    fasta.write_text(">a\nMKV\n")
    r = CliRunner().invoke(app, ["embed", str(fasta), "-m", "esm2-8m", "-q"])
    assert r.exit_code == 1 and "cached copy is damaged (model.safetensors: sha256 mismatch)" in r.output
    assert "run `protembed download esm2-8m --force`" in " ".join(r.output.split())
    # a cached file that passes its sha256 check but does not load (not an LFS file): the loader's hint
    with pytest.raises(CheckpointError, match="corrupt or truncated") as failed:
        load_checkpoint(resolved.path)
    assert "`protembed download esm2-8m --force` fetches it again" in str(failed.value)


def test_a_stopped_download_counts_for_the_revision_it_was_started_for(tmp_path: Path) -> None:
    commit = "a" * 40
    snapshot = repo_dir(ESM, tmp_path) / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / UNFINISHED).write_text("v1")  # what `download --revision v1` leaves when stopped
    assert stopped_download(ESM, "v1", tmp_path) and stopped_download(ESM, commit, tmp_path)
    assert not stopped_download(ESM, None, tmp_path) and not stopped_download(ESM, "main", tmp_path)
    assert not stopped_download(ESM, "b" * 40, tmp_path)
    (snapshot / UNFINISHED).write_text("")  # marker of an older protembed: any branch or tag
    assert stopped_download(ESM, None, tmp_path) and stopped_download(ESM, "v1", tmp_path)
    (snapshot / UNFINISHED).unlink()  # stopped before the marker: config only, no weights
    assert stopped_download(ESM, "main", tmp_path)
    (snapshot / UNFINISHED).write_text(commit)  # `--revision <commit> --force` stopped over main's snapshot
    assert not stopped_download(ESM, "main", tmp_path)
    (repo_dir(ESM, tmp_path) / "refs").mkdir()
    (repo_dir(ESM, tmp_path) / "refs" / "main").write_text(commit)
    assert stopped_download(ESM, "main", tmp_path) and not stopped_download(ESM, "v1", tmp_path)
