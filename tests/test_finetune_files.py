"""`finetune` and `predict` around files a user gets wrong: saved heads that cannot be read, data
folders that cannot be searched, output paths that are folders, a --plot file that exists, stdout
on a full disk. Permission errors are simulated (tests may run as root, who reads everything)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import one_line_error
from tests.test_finetune import ESM2, finetune_json, run_cli
from tests.test_flip import TINY, TINY_SPLITS

GB1 = TINY / "gb1" / "two_vs_rest.fasta"


@pytest.fixture
def onehot_head(tmp_path: Path) -> Path:
    out_dir = tmp_path / "head"
    finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--head", "ridge", "--output", out_dir)
    return out_dir


def test_saved_head_that_cannot_be_read(onehot_head: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, weights = onehot_head / "config.json", onehot_head / "head.safetensors"
    saved = config.read_bytes()
    config.write_bytes(b"\xff\xfe{")
    one_line_error(run_cli("predict", onehot_head, GB1, "-q"), f"{config}: not UTF-8 text (byte 1)")
    config.write_bytes(saved)

    edited = json.loads(saved)
    config.write_text(json.dumps({**edited, "onehot_length": 10}))  # the ridge's weights expect more
    one_line_error(
        run_cli("predict", onehot_head, GB1, "-q"),
        "the head takes 5565 inputs, the one-hot features have 210",
    )
    config.write_bytes(saved)

    real_open = open

    def refuse(target: Path) -> Any:
        def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(path) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        return fake_open

    for target in (config, weights):
        monkeypatch.setattr("builtins.open", refuse(target))
        monkeypatch.setattr("io.open", refuse(target))  # Path.read_text's
        r = run_cli("predict", onehot_head, GB1, "-q")
        monkeypatch.undo()
        one_line_error(r, f"{target}: cannot read: Permission denied")


def test_predict_output_paths(onehot_head: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odir"
    folder.mkdir()
    one_line_error(
        run_cli("predict", onehot_head, GB1, "-o", folder, "--overwrite"),
        "odir: cannot write output: is a folder",
    )
    one_line_error(run_cli("predict", onehot_head, GB1, "-o", GB1 / "x.csv"), f"{GB1} is not a folder")
    to_stdout = run_cli("predict", onehot_head, GB1, "-o", "-", "-q")
    assert to_stdout.exit_code == 0 and to_stdout.stdout == run_cli("predict", onehot_head, GB1, "-q").stdout
    assert to_stdout.stdout.startswith("id,prediction\n") and not Path("-").exists()
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    link = tmp_path / "head.link"
    link.symlink_to(onehot_head / "head.safetensors")
    for target, what in [(fasta, "the input FASTA"), (onehot_head / "config.json", "the head's config"),
                         (link, "the head's weights")]:  # fmt: skip
        before = target.read_bytes()
        r = run_cli("predict", onehot_head, fasta, "-o", target, "--overwrite")
        one_line_error(r, f"{target}: the output is {what} (")
        assert target.read_bytes() == before


def test_onehot_predict_needs_no_scratch_folder(
    onehot_head: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-cache with a one-hot head: nothing to keep out of the cache, so nothing is made in it
    (a read-only cache is no obstacle)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "scratch")

    monkeypatch.setattr("tempfile.TemporaryDirectory", refuse)
    (tmp_path / "cache").mkdir(exist_ok=True)
    r = run_cli("predict", onehot_head, GB1, "--cache-dir", tmp_path / "cache", "--no-cache", "-q")
    assert r.exit_code == 0 and r.stdout.startswith("id,prediction\n"), r.output


def test_data_dir_that_cannot_be_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["finetune", "flip-gb1", "--features", "onehot", "-q"]
    one_line_error(run_cli(*base, "--data-dir", GB1), f"--data-dir {GB1}: not a folder")
    real_is_file = Path.is_file

    def is_file(path: Path) -> bool:
        if path.parent.name == "gb1":  # the folder can be listed but not entered
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    r = run_cli(*base, "--data-dir", TINY)
    one_line_error(r, f"{TINY / 'gb1' / 'two_vs_rest.fasta'}: cannot read: Permission denied")


def test_ridge_notes_training_options_it_does_not_use(tmp_path: Path) -> None:
    args = ["finetune", "flip-gb1", "--features", "onehot", "--head", "ridge", "--data-dir", TINY, "--json"]
    r = run_cli(*args, "--split", TINY_SPLITS["flip-gb1"], "--epochs", "7", "--lr", "0.5")
    assert r.exit_code == 0, r.output
    assert "note: --head ridge is fit in closed form; --epochs, --lr not used" in r.stderr
    training = json.loads(r.stdout)["training"]
    assert training["epochs"] is None and training["lr"] is None and training["ridge_alpha"] == 1.0
    quiet = run_cli(*args, "--epochs", "7", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr
    mlp = run_cli("finetune", "flip-gb1", "--model", ESM2, "--data-dir", TINY, "--cache-dir", tmp_path,
                  "--epochs", "1", "--json")  # fmt: skip
    assert (
        mlp.exit_code == 0 and "note:" not in mlp.stderr and json.loads(mlp.stdout)["training"]["epochs"] == 1
    )


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs protembed[plot]")
def test_plot_never_replaces_a_file_unasked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    png = tmp_path / "flip-gb1_two_vs_rest_ridge.png"
    png.write_text("precious")
    args = [
        "finetune",
        "flip-gb1",
        "--features",
        "onehot",
        "--head",
        "ridge",
        "--data-dir",
        TINY,
        "--plot",
        "-q",
    ]
    one_line_error(run_cli(*args), f"{png.name}: exists; pass --overwrite to replace it")
    assert png.read_text() == "precious"
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG", r.output


def test_results_table_on_a_full_disk(tmp_path: Path) -> None:
    """The table, like --json, reports which output failed."""
    args = ["finetune", "flip-gb1", "--features", "onehot", "--head", "ridge", "--data-dir", str(TINY), "-q"]
    cmd = [sys.executable, "-m", "protembed", *args]
    with open("/dev/full", "w") as full:
        r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert (
        r.returncode == 1
        and r.stderr.strip() == "error: cannot write to standard output: No space left on device"
    )


def test_output_link_to_nowhere(tmp_path: Path) -> None:
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")
    args = ["finetune", "flip-gb1", "--features", "onehot", "--head", "ridge", "--data-dir", TINY, "-o", link]
    message = f"{link}: cannot create output folder: it links to {tmp_path / 'gone'}, which does not exist"
    one_line_error(run_cli(*args), message)


def test_cache_dir_holds_the_weights_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "default-cache"
    monkeypatch.setenv("PROTEMBED_CACHE", str(default))
    finetune_json("flip-gb1", tmp_path, "--model", ESM2, "--head", "linear", "--epochs", "1")
    assert (tmp_path / "cache" / "weights-sha256.json").is_file()
    assert not default.exists()  # --cache-dir given: nothing written to the default cache


def test_control_characters_in_ids_are_escaped(onehot_head: Path, tmp_path: Path) -> None:
    """A NUL or an ESC sequence in a record id reaches the terminal escaped, never raw."""
    fasta = tmp_path / "odd.fasta"
    fasta.write_bytes(b">a\x00b\nMKV\n")
    one_line_error(
        run_cli("predict", onehot_head, fasta), "odd.fasta:1: record 'a\\x00b': NUL byte in the header"
    )
    fasta.write_bytes(b">a\x1b[31mb\nMK1\n")
    r = run_cli("predict", onehot_head, fasta)
    one_line_error(r, "odd.fasta:2: record 'a\\x1b[31mb': invalid residue '1' at position 3")
    assert "\x1b" not in r.output


def test_header_that_does_not_start_its_line(onehot_head: Path, tmp_path: Path) -> None:
    fasta = tmp_path / "in.fasta"
    fasta.write_bytes(b">a\nMKV\n\xef\xbb\xbf>b\nMKV\n")  # a BOM in the middle: two files concatenated
    r = run_cli("predict", onehot_head, fasta)
    one_line_error(
        r, "in.fasta:3: record 'a': '>' at column 2: a header must start at the beginning of its line"
    )


def test_a_mask_token_is_named_as_such(onehot_head: Path, tmp_path: Path) -> None:
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">m\nMKV<mask>AL\n")  # `embed` takes it; a head predicts from residue letters
    r = run_cli("predict", onehot_head, fasta)
    one_line_error(r, "in.fasta:2: record 'm': '<mask>' at column 4: only residue letters are read here")


def test_predict_finds_a_moved_checkpoint_with_model(onehot_head: Path, tmp_path: Path) -> None:
    """A head trained on a local checkpoint names its folder when it is gone; `--model` gives its
    new place, whose weights must still be the ones the head was trained on."""
    ckpt, moved, head = tmp_path / "ckpt", tmp_path / "moved", tmp_path / "model-head"
    shutil.copytree(ESM2, ckpt)
    finetune_json("flip-gb1", tmp_path, "--model", ckpt, "--head", "linear", "--epochs", "1", "-o", head)
    common = ["--cache-dir", tmp_path / "cache", "--device", "cpu", "-q"]
    before = run_cli("predict", head, GB1, *common)
    assert before.exit_code == 0, before.output
    ckpt.rename(moved)
    gone = f"the head was trained on the checkpoint folder {ckpt}, which is no longer there"
    one_line_error(run_cli("predict", head, GB1, *common), gone)
    one_line_error(run_cli("predict", head, GB1, "--model", "esm2-8m", *common), "esm2-8m: no such folder")
    one_line_error(run_cli("predict", head, GB1, "--model", GB1, *common), f"{GB1}: not a folder")
    ckpt.symlink_to(tmp_path / "nowhere")  # a link to nowhere where the folder was
    one_line_error(run_cli("predict", head, GB1, *common), gone)
    ckpt.unlink()
    after = run_cli("predict", head, GB1, "--model", moved, *common)
    assert after.exit_code == 0 and after.stdout == before.stdout, after.output

    weights = next(moved.glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # other weights in the same place
    weights.write_bytes(bytes(blob))
    changed = run_cli("predict", head, GB1, "--model", moved, *common)
    one_line_error(changed, f"the weights in {moved} (sha256:")
    assert "are not the ones the head was trained on (sha256:" in changed.output

    one_line_error(run_cli("predict", onehot_head, GB1, "--model", moved, *common), "one-hot features")
    config = head / "config.json"
    saved = json.loads(config.read_text())
    saved["model"].update(ref="facebook/esm2_t6_8M_UR50D", revision="0" * 40)  # as a Hub model records it
    config.write_text(json.dumps(saved))
    hub = run_cli("predict", head, GB1, "--model", moved, *common)
    one_line_error(hub, "--model: the head was trained on the Hub model facebook/esm2_t6_8M_UR50D")


def test_notes_count_in_words(onehot_head: Path, tmp_path: Path) -> None:
    """One truncated sequence is "1 sequence", not "1 sequences"."""
    long = tmp_path / "long.fasta"
    long.write_text(">a\n" + "M" * 1100 + "\n>b\nMKV\n")
    ckpt_head = tmp_path / "ckpt-head"
    finetune_json("flip-gb1", tmp_path, "--model", ESM2, "--head", "linear", "--epochs", "1", "-o", ckpt_head)
    r = run_cli("predict", ckpt_head, long, "--cache-dir", tmp_path / "cache", "--device", "cpu")
    assert r.exit_code == 0 and "note: truncated 1 sequence to the features' maximum length" in r.output
