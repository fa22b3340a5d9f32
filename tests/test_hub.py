"""Download and model resolution against a fake Hub on 127.0.0.1 (tests/hub_server.py); no internet.

CLI tests run `python -m protembed` in a subprocess with HF_* set in its environment, because
huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import time. Library tests run in
process with those constants monkeypatched, which keeps the suite fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from typer.testing import CliRunner

from protembed.cli import app
from protembed.errors import CheckpointError, HubError, UnknownModelError
from protembed.hub import download_model, resolve_model
from protembed.hub_cache import cached_models, cached_snapshot
from protembed.models.checkpoints import load_checkpoint
from tests.helpers import fixture_dir
from tests.hub_server import FIXTURES, TOKEN, FakeHub, Fault
from tests.test_flip import TINY

ROOT = Path(__file__).resolve().parents[1]
ESM, AMP = "facebook/esm2_t6_8M_UR50D", "chandar-lab/AMPLIFY_120M"
COMMON = {"config.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json"}
ESM_FILES, AMP_FILES = COMMON | {"vocab.txt"}, COMMON | {"tokenizer.json"}
ESM_WEIGHTS = (FIXTURES / "esm2_t3_h64" / "checkpoint" / "model.safetensors").read_bytes()


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


def cli(*args: str, hub: FakeHub, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m protembed` with a clean HF environment pointed at the fake Hub."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING")) and k != "TRANSFORMERS_OFFLINE" and "proxy" not in k.lower()
    }
    full = {**keep, "HF_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    full["NO_PROXY"] = "127.0.0.1,localhost"
    cmd = [sys.executable, "-m", "protembed", *args] if args[0] != "-c" else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --- the CLI, in a subprocess --------------------------------------------------------------------


def test_download_layout_then_cached_without_network(hub: FakeHub, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    first = cli("download", "esm2-8m", hub=hub, home=home)
    assert first.returncode == 0, first.stderr
    repo = home / "hub" / "models--facebook--esm2_t6_8M_UR50D"  # HF_HOME honoured, standard layout
    snapshot = repo / "snapshots" / commit_of(ESM)
    assert first.stdout.strip() == str(snapshot)
    assert commit_of(ESM) in first.stderr and "verified" in first.stderr
    assert (repo / "refs" / "main").read_text() == commit_of(ESM)
    assert {p.name for p in snapshot.iterdir()} == ESM_FILES
    assert all(p.is_symlink() and p.resolve().parent == repo / "blobs" for p in snapshot.iterdir())
    assert (snapshot / "model.safetensors").resolve().name == hashlib.sha256(ESM_WEIGHTS).hexdigest()
    assert (snapshot / "model.safetensors").read_bytes() == ESM_WEIGHTS
    assert not list(repo.rglob("*.incomplete"))
    assert set(hub.gets(ESM)) == ESM_FILES  # never pytorch_model.bin, README.md, .gitattributes

    hub.requests.clear()
    second = cli("download", "esm2-8m", hub=hub, home=home)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    quiet = cli("download", "esm2-8m", "-q", hub=hub, home=home)
    assert quiet.returncode == 0 and quiet.stdout == first.stdout
    assert quiet.stderr == ""  # no closing line, as merge and export with -q
    listed = cli("models", "--json", hub=hub, home=home, HF_HUB_OFFLINE="1")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["esm2-8m"]["cached"] and rows["esm2-8m"]["revision"] == commit_of(ESM)
    assert rows["esm2-8m"]["size_bytes"] == sum(p.stat().st_size for p in snapshot.iterdir())
    assert not rows["esm2-650m"]["cached"] and rows["esm2-650m"]["size_bytes"] == 0
    assert hub.requests == []  # the second download and the listing touched no network


def test_offline_and_not_cached_says_what_to_run(hub: FakeHub, tmp_path: Path) -> None:
    out = cli("download", "esm2-8m", hub=hub, home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert out.returncode == 1
    line = one_error_line(out.stderr)
    assert "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to download" in line
    assert "run `protembed download" not in line  # running the same command again would not help
    (tmp_path / "x.fa").write_text(">a\nMKV\n")
    out = cli(
        "embed", str(tmp_path / "x.fa"), "-m", "esm2-8m", hub=hub, home=tmp_path / "hf", HF_HUB_OFFLINE="1"
    )
    line = one_error_line(out.stderr)
    assert (
        out.returncode == 1
        and "run `HF_HUB_OFFLINE=0 protembed download esm2-8m` first (it needs the network)" in line
    )
    assert hub.requests == []


def test_load_model_downloads_repo_id_on_first_use(hub: FakeHub, tmp_path: Path) -> None:
    code = (
        "import protembed\n"
        f"m = protembed.load_model('{AMP}', device='cpu')\n"
        "print(m.name, m.revision, m.embed(['MKTAYIAKQR']).pooled['mean'].shape)\n"
    )
    out = cli("-c", code, hub=hub, home=tmp_path / "hf", HF_HUB_CACHE=str(tmp_path / "hubcache"))
    assert out.returncode == 0, out.stderr
    assert "not cached: downloading" in out.stderr
    assert out.stdout.split() == ["amplify-120m", commit_of(AMP), "(1,", "1,", "64)"]
    assert (tmp_path / "hubcache" / "models--chandar-lab--AMPLIFY_120M" / "refs" / "main").exists()
    assert set(hub.gets(AMP)) == AMP_FILES  # no remote code, no .bin


def test_embed_cli_downloads_on_first_use(hub: FakeHub, tmp_path: Path) -> None:
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nMSEQ\n")
    out_h5 = tmp_path / "out.h5"
    out = cli("embed", str(fasta), "--model", AMP, "-o", str(out_h5), hub=hub, home=tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert "not cached: downloading" in out.stderr and out_h5.exists()
    assert set(hub.gets(AMP)) == AMP_FILES


def test_quiet_commands_download_without_a_word(hub: FakeHub, tmp_path: Path) -> None:
    args = ["finetune", "flip-gb1", "--model", AMP, "--data-dir", str(TINY), "--split", "two_vs_rest",
            "--cache-dir", str(tmp_path / "features"), "--epochs", "1", "--device", "cpu", "-q"]  # fmt: skip
    out = cli(*args, hub=hub, home=tmp_path / "hf")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert set(hub.gets(AMP)) == AMP_FILES


def test_embed_checks_input_and_options_before_fetching_a_hub_models_weights(
    hub: FakeHub, tmp_path: Path
) -> None:
    repo = "protembed-test/esm2-sharded"  # not in the registry: its alphabet comes with config.json
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">a\nMKTA\n>b\nMK1TA\n")
    out = cli(
        "embed", str(fasta), "--model", repo, "-o", str(tmp_path / "x.h5"), hub=hub, home=tmp_path / "hf"
    )
    assert out.returncode == 1 and "not cached: downloading" in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith(
        "bad.fasta:4: record 'b': invalid residue '1' at position 3"
    )
    assert hub.gets(repo) == ["config.json"]
    fasta.write_text(">a\nMKTA\n")
    hub.requests.clear()
    out = cli("embed", str(fasta), "--model", repo, "--layer", "9", hub=hub, home=tmp_path / "hf")
    assert out.returncode == 1 and "layer 9 out of range" in out.stderr, out.stderr
    assert hub.gets(repo) == []  # config.json is cached from the first run; no weights either


# --- the library, in process -----------------------------------------------------------------------


def test_repo_id_of_registry_model_fetches_only_needed_files(hub: FakeHub, cache: Path) -> None:
    resolved, size = download_model(AMP, progress=False)
    assert (resolved.name, resolved.source, resolved.revision) == ("amplify-120m", AMP, commit_of(AMP))
    assert resolved.path.parents[1] == cache / "models--chandar-lab--AMPLIFY_120M"
    assert {p.name for p in resolved.path.iterdir()} == AMP_FILES
    assert size == sum(p.stat().st_size for p in resolved.path.iterdir())
    assert set(hub.gets(AMP)) == AMP_FILES  # amplify.py and pytorch_model.bin are never requested

    hub.requests.clear()
    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    again = resolve_model("amplify-120m")
    assert again == resolved and hub.requests == []
    result = CliRunner().invoke(app, ["models", "--json", "--cache-dir", str(cache)])
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["amplify-120m"]["cached"] and rows["amplify-120m"]["revision"] == commit_of(AMP)


def test_sharded_checkpoint_loads_in_bf16(hub: FakeHub, cache: Path) -> None:
    resolved, _ = download_model("protembed-test/esm2-sharded", progress=False)
    names = {p.name for p in resolved.path.iterdir()}
    assert {"model.safetensors.index.json", "model-00001-of-00002.safetensors"} <= names
    assert resolved.name is None
    sharded = load_checkpoint(resolved.path, dtype=torch.bfloat16)
    whole = load_checkpoint(FIXTURES / "esm2_t3_h64" / "checkpoint", dtype=torch.bfloat16)
    for (k, a), (_, b) in zip(sharded.state_dict().items(), whole.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), k


CHUNK = 64 * 1024  # huggingface_hub streams 10 MB chunks; the fixture weights are smaller than one


def test_dropped_connection_resumes_with_range(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    hub.faults[(ESM, "model.safetensors")] = Fault(drop_after=3 * CHUNK, drops=1)
    with caplog.at_level(logging.WARNING):
        resolved, _ = download_model("esm2-8m", progress=False)
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")], "quiet: no hub warnings"
    ranges = [r.range for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert ranges == [None, f"bytes={3 * CHUNK}-"]
    assert (resolved.path / "model.safetensors").read_bytes() == ESM_WEIGHTS


def test_failed_download_leaves_no_half_file_and_rerun_fetches_the_rest(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    hub.faults[(ESM, "model.safetensors")] = Fault(drop_after=3 * CHUNK, drops=1, status=503)
    with pytest.raises(HubError, match=f"download of {ESM} failed.*run the same command again"):
        download_model("esm2-8m", progress=False)
    assert not list(cache.rglob("*.incomplete"))
    assert not list(cache.rglob("model.safetensors"))
    assert cached_snapshot(ESM) is None
    partly = r"only partly in the cache \(.*: a download stopped before it finished\) and downloads are off"
    with pytest.raises(HubError, match=partly + ": run `protembed download esm2-8m`"):
        resolve_model("esm2-8m", download=False)

    assert [m.partial for m in cached_models() if m.repo_id == ESM] == [True]  # `models` says "partial"

    hub.faults.clear()
    hub.requests.clear()
    resolved = resolve_model("esm2-8m", progress=True)
    assert "esm2-8m is only partly cached: finishing the download of " + ESM in capsys.readouterr().err
    assert hub.gets(ESM) == ["model.safetensors"]  # config and tokenizer files were kept
    assert cached_snapshot(ESM) == (resolved.path, commit_of(ESM))
    assert [m.partial for m in cached_models() if m.repo_id == ESM] == [False]


def test_gated_repo_needs_a_token(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gated = "protembed-test/esm2-gated"
    with pytest.raises(HubError, match="is gated: accept its terms at .* then set HF_TOKEN"):
        download_model(gated, progress=False)
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(HubError, match="HF_TOKEN has no access"):
        download_model(gated, progress=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    resolved, _ = download_model(gated, progress=False)
    assert {p.name for p in resolved.path.iterdir()} == ESM_FILES
    assert hub.requests[-1].auth == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("model", "error", "message"),
    [
        ("nobody/nothing", HubError, "repo 'nobody/nothing' not found"),
        ("protembed-test/bert-tiny", CheckpointError, r"not an ESM-2 or AMPLIFY checkpoint \(model_type 'b"),
        ("protembed-test/esm2-truncated", CheckpointError, r"corrupt or truncated weights.*deleted from the"),
    ],
)
def test_bad_repos(hub: FakeHub, cache: Path, model: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        download_model(model, progress=False)
    assert "\n" not in str(info.value)
    if model == "protembed-test/bert-tiny":
        assert hub.gets(model) == ["config.json"]  # the architecture is checked before any weights
    assert not list(cache.rglob("model.safetensors"))  # nothing that could later look complete


def test_corrupt_transfer_is_detected_and_deleted(hub: FakeHub, cache: Path) -> None:
    hub.faults[(ESM, "model.safetensors")] = Fault(flip=True)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        download_model("esm2-8m", progress=False)
    assert not list(cache.rglob("model.safetensors")) and cached_snapshot(ESM) is None
    assert not [b for b in cache.rglob("blobs/*") if b.stat().st_size == len(ESM_WEIGHTS)]


def test_unknown_revision_and_force(hub: FakeHub, cache: Path) -> None:
    with pytest.raises(HubError, match="has no revision 'v9'"):
        download_model("esm2-8m", revision="v9", progress=False)
    download_model("esm2-8m", progress=False)
    hub.requests.clear()
    download_model("esm2-8m", progress=False)
    assert hub.requests == []
    download_model("esm2-8m", force=True, progress=False)
    assert set(hub.gets(ESM)) == ESM_FILES


def test_a_failed_force_keeps_the_cached_copy_and_a_damaged_one_is_found(hub: FakeHub, cache: Path) -> None:
    snapshot = download_model("esm2-8m", progress=False)[0].path
    hub.faults[(ESM, "model.safetensors")] = Fault(status=503)
    with pytest.raises(HubError, match="download of facebook/esm2_t6_8M_UR50D failed"):
        download_model("esm2-8m", force=True, progress=False)
    assert cached_snapshot(ESM) == (snapshot, commit_of(ESM))  # still cached: nothing was replaced
    hub.faults[(ESM, "model.safetensors")] = Fault(status=403)  # a rerun would not help: not advised
    with pytest.raises(HubError, match=r"failed: .*; check HF_TOKEN and your access$"):
        download_model("esm2-8m", force=True, progress=False)
    hub.faults.clear()
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1  # same length: it still loads
    blob.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: sha256 mismatch\); run `protembed download"
    ):
        download_model("esm2-8m", progress=False)
    with pytest.raises(  # what embed, finetune and load_model find: never computed with silently
        CheckpointError,
        match=r"model.safetensors: sha256 mismatch\); run `protembed download esm2-8m --force`",
    ):
        resolve_model("esm2-8m")
    download_model("esm2-8m", force=True, progress=False)
    assert blob.read_bytes() == ESM_WEIGHTS
    with pytest.raises(
        HubError, match="is gated: accept its terms"
    ):  # not the ValueError --force wraps it in
        download_model("protembed-test/esm2-gated", force=True, progress=False)


def test_a_model_cached_only_at_a_commit_names_it(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = commit_of(ESM)
    download_model("esm2-8m", revision=commit, progress=False)  # a commit: no refs/main is written
    assert cached_snapshot(ESM, commit) is not None and cached_snapshot(ESM) is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as err:
        resolve_model("esm2-8m", progress=False)
    assert f"{ESM} at revision main is not in the cache" in str(err.value)
    assert str(err.value).endswith(f"; --revision {commit} uses the cached copy")
    assert resolve_model("esm2-8m", revision=commit, progress=False).path.name == commit
    listed = CliRunner().invoke(app, ["models", "--json"])
    row = next(r for r in json.loads(listed.stdout) if r["name"] == "esm2-8m")
    assert not row["cached"] and row["other_revisions"] == [commit]
    table = CliRunner().invoke(app, ["models"]).stdout
    row_text = next(line for line in table.splitlines() if "esm2-8m" in line)
    assert "other revision" in row_text and commit in row_text  # whole, as --revision needs it offline


# --- no network at all ---------------------------------------------------------------------------------


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="did you mean esm2-650m"):
        resolve_model("esm2-650")
    result = CliRunner().invoke(app, ["download", "amplfy-120m"])
    assert result.exit_code == 1
    assert "unknown model 'amplfy-120m'; did you mean amplify-120m" in " ".join(result.output.split())


def test_a_file_given_as_the_model_is_named_as_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("proteins.fasta", "data/proteins.fasta", "./proteins.fasta"):  # 2nd: also a repo id
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).write_text(">a\nMKV\n")
        with pytest.raises(UnknownModelError, match="a file, not a model name or checkpoint folder"):
            resolve_model(name, download=False)


def test_paths_and_revisions_of_local_models(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["download", str(tmp_path / "no" / "such")])
    assert r.exit_code == 1 and "no such directory" in r.output
    (tmp_path / "file").write_text("")
    r = runner.invoke(app, ["download", str(tmp_path / "file")])
    assert r.exit_code == 1 and "a file, not a model name or checkpoint folder" in r.output
    os.mkfifo(tmp_path / "fifo")
    r = runner.invoke(app, ["download", str(tmp_path / "fifo")])
    assert r.exit_code == 1 and "not a directory" in r.output
    (tmp_path / "x.fa").write_text(">a\nMKV\n")
    for args in (["download", ""], ["embed", str(tmp_path / "x.fa"), "-m", ""]):  # not the current folder
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "unknown model ''; the model name is empty" in r.output, r.output
    local = str(fixture_dir("esm2_t3_h64") / "checkpoint")
    for args in (["download", local], ["embed", str(tmp_path / "x.fa"), "-m", local]):
        r = runner.invoke(app, [*args, "--revision", "v2"])
        assert r.exit_code == 1 and "--revision names a Hub revision" in r.output, r.output


def test_local_directory_is_used_as_is() -> None:
    ckpt = FIXTURES / "amplify_l3_h64" / "checkpoint"
    resolved = resolve_model(str(ckpt))
    assert (resolved.name, resolved.source, resolved.revision) == (None, str(ckpt.resolve()), "local")
    _, size = download_model(str(ckpt))
    assert size == sum(p.stat().st_size for p in ckpt.iterdir())
