"""`finetune` and `predict` end to end on the tiny FLIP folder; heads, ridge, metrics, the feature cache."""

from __future__ import annotations

import csv
import errno
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from protembed.api import load_model
from protembed.cache import held_lock
from protembed.cli import app
from protembed.embed_setup import locate_model
from protembed.errors import BackendError, require_matplotlib
from protembed.feature_cache import model_features, model_folder, seq_key
from protembed.features import onehot_flat, onehot_residues
from protembed.flip import IGNORE, FlipError
from protembed.heads import CNNHead, fit_ridge, predict
from protembed.metrics import confusion, floor, rankdata, sequence_accuracy, spearman
from protembed.reader import open_embeddings
from tests.helpers import fixture_dir, one_line_error
from tests.test_flip import TINY, TINY_SPLITS

ESM2, AMPLIFY = fixture_dir("esm2_t3_h64") / "checkpoint", fixture_dir("amplify_l3_h64") / "checkpoint"
runner = CliRunner()


def run_cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def finetune_json(task: str, tmp_path: Path, *extra: object) -> dict[str, Any]:
    split = TINY_SPLITS[get_name(task)]
    common = ["--data-dir", TINY, "--cache-dir", tmp_path / "cache", "--device", "cpu", "--epochs", "3"]
    result = run_cli("finetune", task, "--split", split, *common, "--json", "-q", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("flip-meltome", ESM2),
        ("flip-gb1", AMPLIFY),
        ("flip-secondary-structure", ESM2),
        ("flip-conservation", AMPLIFY),
        ("flip-scl", ESM2),
        ("flip-bind", ESM2),
    ],
)
def test_every_task_with_fixture_model(task: str, model: Path, tmp_path: Path) -> None:
    out = finetune_json(task, tmp_path, "--model", model)
    m = out["metrics"]
    assert out["counts"] == {"train": 64, "validation": 16, "test": 16}
    assert (
        out["model"]["layer"] == -1
        and out["model"]["layer_index"] == 3
        and out["model"]["source"] == str(model.resolve())
    )
    assert out["head"] == ("cnn" if out["level"] == "residue" else "mlp")
    keys = {"rmse", "spearman"} if out["kind"] == "regression" else {"accuracy"}
    assert keys <= set(m["test"]) and keys <= set(m["floor"]) and keys <= set(m["validation"])
    if out["kind"] == "classification":
        assert 0.0 <= m["test"]["accuracy"] <= 100.0
    if task == "flip-secondary-structure":  # unresolved residues are not scored
        resolved = sum(
            line.count("1")
            for line in (TINY / "secondary_structure" / "resolved.fasta").read_text().split("\n")
            if not line.startswith(">")
        )
        assert m["test"]["n"] + m["validation"]["n"] < resolved


@pytest.mark.parametrize("task", sorted(TINY_SPLITS))
def test_every_task_onehot(task: str, tmp_path: Path) -> None:
    out = finetune_json(task, tmp_path, "--features", "onehot")
    assert out["features"] == "onehot" and out["model"] is None
    assert out["metrics"]["floor_kind"] in ("train mean", "majority class")


def test_ridge_fits_train_plus_validation(tmp_path: Path) -> None:
    out = finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--head", "ridge")
    assert out["training"]["fit_on"] == "train+validation" and out["metrics"]["validation"] is None
    assert out["onehot_length"] == 265


def test_deterministic_under_seed(tmp_path: Path) -> None:
    runs = [
        finetune_json("flip-ss3", tmp_path, "--model", ESM2, "--seed", s)["metrics"] for s in ("1", "1", "2")
    ]
    assert runs[0] == runs[1]
    a = finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--seed", "1")["metrics"]["test"]
    b = finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--seed", "2")["metrics"]["test"]
    assert a != b


def test_feature_cache_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import protembed.feature_cache as fc

    ref = locate_model(str(ESM2))
    seqs = ["MKTAYIAKQR", "MSEQ", "MKTAYIAKQR", "GGGHHH"]
    calls: list[int] = []
    real = fc.embed_fasta

    def counting(fasta: Path, *args: Any, **kw: Any) -> Any:
        calls.append(Path(fasta).read_text().count(">"))
        return real(fasta, *args, **kw)

    monkeypatch.setattr(fc, "embed_fasta", counting)
    folder = model_folder(tmp_path, ref, 3, "float32") / "pooled"
    folder.mkdir(parents=True)
    (folder / "part-0.h5").write_text("not an embeddings file: removed")
    first = model_features(seqs, ref, 3, False, tmp_path)
    assert calls == [3]  # the duplicate is embedded once
    both = model_features(seqs, ref, 3, True, tmp_path)  # residues were not cached yet
    assert calls == [3, 3]
    again = model_features(seqs[::-1], ref, 3, True, tmp_path)
    more = model_features([*seqs, "MKV"], ref, 3, False, tmp_path)  # only the new one is embedded
    assert calls == [3, 3, 1]
    assert first.pooled is not None and more.pooled is not None
    assert both.residues is not None and again.residues is not None
    np.testing.assert_array_equal(more.pooled[:4], first.pooled)
    assert both.residues.lengths().tolist() == [10, 4, 10, 6]
    np.testing.assert_array_equal(again.residues[0], both.residues[3])
    direct = load_model(ESM2, device="cpu").embed(["MSEQ", "MKV"], layers=[-1], per_residue=True)
    assert direct.residues is not None
    np.testing.assert_allclose(first.pooled[1], direct.pooled["mean"][0, 0], atol=1e-5)
    np.testing.assert_allclose(more.pooled[4], direct.pooled["mean"][1, 0], atol=1e-5)
    np.testing.assert_allclose(
        both.residues[1].astype(np.float32), direct.residues[0][:, 0], atol=2e-2, rtol=1e-2
    )
    parts = sorted(folder.glob("part-*.h5"))
    assert len(parts) == 2 and not list(folder.glob("*.fasta"))
    with open_embeddings(parts[0]) as emb:  # an ordinary embeddings file, ids = sequence sha256
        assert list(emb.layers) == [3] and emb.attrs["model_source"] == str(ESM2.resolve())
        assert len(emb) in (1, 3) and all(len(i) == 64 for i in emb.ids)


def test_backend_checked_even_when_features_are_cached(tmp_path: Path) -> None:
    finetune_json("flip-gb1", tmp_path, "--model", ESM2, "--head", "ridge")  # fills the cache
    common = ["--split", "two_vs_rest", "--data-dir", TINY, "--cache-dir", tmp_path / "cache", "-q"]
    for backend, code, message in [
        ("foo", 2, "Invalid value for '--backend'"),
        ("te", 1, "Transformer Engine"),  # not installed, or no CUDA device
    ]:
        r = run_cli("finetune", "flip-gb1", "--model", ESM2, "--device", "cpu", "--backend", backend, *common)
        assert r.exit_code == code and message in r.output, r.output
    r = run_cli("finetune", "flip-gb1", "--features", "onehot", "--backend", "torch", *common)
    assert r.exit_code == 2 and "one-hot features are not computed by a model" in r.output


def test_damaged_feature_cache_is_recomputed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A part that cannot be read or resumed is computed again, with a notice; the features are the same."""
    ref = locate_model(str(ESM2))
    seqs = ["MKTAYIAKQR", "MSEQ", "GGGHHH"]
    good = model_features(seqs, ref, 3, True, tmp_path)
    assert good.residues is not None
    (part,) = (model_folder(tmp_path, ref, 3, "float32") / "residues").glob("part-*.h5")

    def damage_and_check(damage: Callable[[], None], notice: str) -> None:
        damage()
        again = model_features(seqs, ref, 3, True, tmp_path)
        assert again.residues is not None
        np.testing.assert_array_equal(again.residues.data, good.residues.data)  # type: ignore[union-attr]
        assert notice in capfd.readouterr().err

    def truncate() -> None:
        os.truncate(part, 3000)

    def lose_residues() -> None:  # ids and flags still read; the data does not
        with h5py.File(part, "r+") as h5:
            del h5["residues"]

    def older_unfinished() -> None:  # interrupted by a protembed that wrote other attributes
        with h5py.File(part, "r+") as h5:
            h5.attrs["complete"], h5.attrs["protembed_version"] = False, "0.0.1"
            h5.attrs["dtype"] = "float16"

    def misshapen() -> None:  # readable, but fewer residues than the offsets say
        with h5py.File(part, "r+") as h5:
            rows = h5["residues"][:5]
            del h5["residues"]
            h5["residues"] = rows

    def folder_in_its_place() -> None:
        part.unlink()
        (part / "x").mkdir(parents=True)

    def bytes_overwritten() -> None:  # still a readable file, but the data is no longer numbers
        with h5py.File(part, "r+") as h5:
            h5["residues"][2:4] = np.inf

    damage_and_check(misshapen, f"feature cache: {part.name} is damaged (residues (5, 64), expected")
    damage_and_check(folder_in_its_place, f"feature cache: removing {part.name}")
    damage_and_check(truncate, f"feature cache: removing {part.name}")
    damage_and_check(lose_residues, f"feature cache: {part.name} is damaged")
    damage_and_check(older_unfinished, f"feature cache: computing {part.name} again (an unfinished output")
    damage_and_check(bytes_overwritten, f"feature cache: {part.name} is damaged (values that are not finite")


def test_features_that_overflow_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Values beyond float16 (the residue cache's type) even when computed again: name the layer."""
    ref = locate_model(str(ESM2))
    real = open_embeddings

    def overflowing(path: Path, **kwargs: Any) -> Any:
        emb = real(path, **kwargs)
        if "residues" in emb.h5 and emb.attrs.get("complete"):
            emb.h5.close()
            with h5py.File(path, "r+") as h5:
                h5["residues"][0] = np.inf  # what float16 stores for values over 65504
            emb = real(path, **kwargs)
        return emb

    monkeypatch.setattr("protembed.feature_cache.open_embeddings", overflowing)
    with pytest.raises(FlipError, match=r"layer 3 of .* gives values beyond float16.*try another --layer"):
        model_features(["MKTAYIAKQR"], ref, 3, True, tmp_path)
    assert "computing it again" not in capfd.readouterr().err  # computed once, not blamed on the cache


def test_damaged_rows_of_a_resumed_part_are_computed_again(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A part this call only finished holds rows an earlier run wrote: damage there is the cache's."""
    ref = locate_model(str(ESM2))
    seqs = ["MKTAYIAKQR", "MSEQ", "GGGHHH"]
    good = model_features(seqs, ref, 3, False, tmp_path).pooled
    (part,) = (model_folder(tmp_path, ref, 3, "float32") / "pooled").glob("part-*.h5")
    with h5py.File(part, "r+") as h5:  # as if interrupted before its last row, then damaged
        h5.attrs["complete"] = False
        h5["written"][-1] = False
        h5["mean"][0] = np.nan
    (part.with_suffix(".fasta")).write_text("".join(f">{seq_key(s)}\n{s}\n" for s in seqs))
    again = model_features(seqs, ref, 3, False, tmp_path).pooled
    np.testing.assert_array_equal(again, good)
    assert f"{part.name} is damaged (values that are not finite numbers)" in capfd.readouterr().err


def test_several_damaged_parts_are_all_computed_again(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    ref = locate_model(str(ESM2))
    first, second = ["MKTAYIAKQR", "MSEQ"], ["GGGHHH"]
    for seqs in (first, second):
        model_features(seqs, ref, 3, False, tmp_path)
    good = model_features(first + second, ref, 3, False, tmp_path).pooled
    parts = sorted((model_folder(tmp_path, ref, 3, "float32") / "pooled").glob("part-*.h5"))
    assert len(parts) == 2
    for part in parts:
        with h5py.File(part, "r+") as h5:
            h5["mean"][0] = np.nan
    again = model_features(first + second, ref, 3, False, tmp_path).pooled
    np.testing.assert_array_equal(again, good)
    assert capfd.readouterr().err.count("is damaged (values that are not finite numbers)") == 2


def test_save_and_predict_round_trip(tmp_path: Path) -> None:
    cases: list[tuple[str, list[object]]] = [
        ("flip-ss3", ["--model", ESM2]),
        ("flip-gb1", ["--features", "onehot", "--head", "ridge"]),
        ("flip-scl", ["--model", AMPLIFY, "--head", "linear"]),
    ]
    for task, extra in cases:
        out_dir = tmp_path / task
        finetune_json(task, tmp_path, "--output", out_dir, *extra)
        assert sorted(p.name for p in out_dir.iterdir()) == [
            "config.json",
            "head.safetensors",
            "predictions.csv",
        ]
        with open(out_dir / "predictions.csv") as fh:
            saved = list(csv.DictReader(fh))
        fasta = tmp_path / f"{task}.fasta"
        fasta.write_text("".join(f">{r['id']}\n{r['sequence']}\n" for r in saved))
        result = run_cli("predict", out_dir, fasta, "-o", tmp_path / f"{task}.csv", "--device", "cpu",
                         "--cache-dir", tmp_path / "cache", "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        with open(tmp_path / f"{task}.csv") as fh:
            got = list(csv.DictReader(fh))
        assert [g["id"] for g in got] == [r["id"] for r in saved]
        assert [g["prediction"] for g in got] == [r["predicted"] for r in saved]
        config = json.loads((out_dir / "config.json").read_text())
        assert config["task"] == get_name(task) and "test" in config["metrics"]
    # --no-cache: the same predictions from features that are not kept
    new_cache = tmp_path / "new-cache"
    result = run_cli("predict", tmp_path / "flip-ss3", tmp_path / "flip-ss3.fasta", "-o", tmp_path / "nc.csv",
                     "--device", "cpu", "--cache-dir", new_cache, "--no-cache", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "nc.csv").read_text() == (tmp_path / "flip-ss3.csv").read_text()
    assert [p.name for p in new_cache.iterdir()] == ["weights-sha256.json"]  # no features, the digest kept
    config_path = tmp_path / "flip-ss3" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["layer"] = 99  # a hand edit: the error names the file, not an option predict lacks
    config_path.write_text(json.dumps(config))
    result = run_cli("predict", tmp_path / "flip-ss3", tmp_path / "flip-ss3.fasta", "--device", "cpu",
                     "--cache-dir", tmp_path / "cache", "-q")  # fmt: skip
    one_line_error(result, f"{config_path}: model layer: layer 99 out of range")


def test_outputs_are_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (full disk) is a one-line error naming the file and leaves no part of it;
    an output that is a link or a device is written through, never replaced."""
    out_dir, fasta = tmp_path / "head", tmp_path / "in.fasta"
    finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--head", "ridge", "--output", out_dir)
    fasta.write_text(">a\nMKV\n")
    (tmp_path / "real.csv").write_text("old")
    (tmp_path / "plain.csv").write_text("old")
    (tmp_path / "plain.csv").chmod(0o600)
    r = run_cli("predict", out_dir, fasta, "-o", tmp_path / "plain.csv", "--overwrite", "-q")
    assert r.exit_code == 0 and (tmp_path / "plain.csv").stat().st_mode & 0o777 == 0o600, r.output
    assert [p.name for p in tmp_path.glob(".*")] == []  # no temporary file left
    os.link(tmp_path / "plain.csv", tmp_path / "hard.csv")  # written in place: both names see it
    (tmp_path / "plain.csv").write_text("old")
    r = run_cli("predict", out_dir, fasta, "-o", tmp_path / "plain.csv", "--overwrite", "-q")
    assert r.exit_code == 0 and (tmp_path / "hard.csv").read_text().startswith("id,"), r.output
    long_name = tmp_path / ("p" * 250 + ".csv")  # no room left in the name for a temporary suffix
    r = run_cli("predict", out_dir, fasta, "-o", long_name, "-q")
    assert r.exit_code == 0 and long_name.read_text().startswith("id,"), r.output
    again = tmp_path / "again"
    again.mkdir()
    (again / ".protembed-x1y2.tmp").write_text("")  # left by a save killed before its rename
    r = run_cli("finetune", "flip-gb1", "--features", "onehot", "--head", "ridge", "--data-dir", TINY,
                "--output", again, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "head.safetensors", "predictions.csv"]
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    r = run_cli("predict", out_dir, fasta, "-o", tmp_path / "link.csv", "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "real.csv").read_text().startswith("id,")
    if Path("/dev/full").is_char_device():
        r = run_cli("predict", out_dir, fasta, "-o", "/dev/full", "--overwrite", "-q")
        assert r.exit_code == 1 and "/dev/full: cannot write output: No space left on device" in r.output
        assert Path("/dev/full").is_char_device()

    def disk_full(*args: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("protembed.saved_head.format_value", disk_full)  # while predictions.csv is written
    r = run_cli("finetune", "flip-gb1", "--features", "onehot", "--head", "ridge", "--data-dir", TINY,
                "--output", out_dir, "--overwrite", "-q")  # fmt: skip
    assert r.exit_code == 1, r.output
    assert f"{out_dir / 'predictions.csv'}: cannot write output: No space left on device" in r.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["head.safetensors", "predictions.csv"]  # no config


def get_name(task: str) -> str:
    return "flip-secondary-structure" if task == "flip-ss3" else task


def test_cli_errors(tmp_path: Path) -> None:
    base = ["finetune", "flip-gb1", "--data-dir", TINY, "--cache-dir", tmp_path, "--device", "cpu", "-q"]
    r = run_cli(*base, "--features", "onehot", "--model", ESM2)
    assert r.exit_code == 2 and "Invalid value for '--model': excludes --features onehot" in r.output
    r = run_cli(*base, "--features", "onehot", "--head", "cnn")
    assert r.exit_code == 1 and "error: head 'cnn' does not fit sequence-level task flip-gb1" in r.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    r = run_cli(*base, "--features", "onehot", "--output", tmp_path / "out")
    assert r.exit_code == 1 and "not empty (pass --overwrite" in r.output
    r = run_cli(*base, "--features", "onehot", "--split", "nope")
    assert r.exit_code == 1 and "no nope.fasta[.gz] in" in r.output
    r = run_cli(*base, "--features", "onehot", "--split", "nope", "--output", tmp_path / "new" / "head")
    assert r.exit_code == 1 and "no nope.fasta[.gz] in" in r.output
    assert not (tmp_path / "new").exists()  # made before the data was read, removed again
    r = run_cli("predict", tmp_path, TINY / "gb1" / "sampled.fasta")
    assert r.exit_code == 1 and "is not a saved head" in r.output


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    r = run_cli("finetune", "flip-gb1", "--features", "onehot", "--data-dir", TINY, "--plot", "-q")
    assert r.exit_code == 1 and "error: --plot needs matplotlib: pip install 'protembed[plot]'" in r.output
    with pytest.raises(BackendError) as info:
        require_matplotlib()
    assert str(info.value) == "--plot needs matplotlib: pip install 'protembed[plot]'"


# --- units ----------------------------------------------------------------------------------------


def test_ridge_closed_form_matches_normal_equations() -> None:
    rng = np.random.default_rng(0)
    for n, d in ((40, 7), (7, 40)):  # primal and dual paths
        x, y = rng.normal(size=(n, d)), rng.normal(size=n)
        head = fit_ridge(x, y, alpha=0.5)
        xc, yc = x - x.mean(0), y - y.mean()
        w = np.linalg.solve(xc.T @ xc + 0.5 * np.eye(d), xc.T @ yc)
        np.testing.assert_allclose(head.proj.weight.detach().numpy()[0], w, atol=1e-5)
        np.testing.assert_allclose(head.proj.bias.item(), y.mean() - x.mean(0) @ w, atol=1e-5)


def test_cnn_ignores_padding() -> None:
    torch.manual_seed(0)
    head = CNNHead(21, 3).eval()
    feats = onehot_residues(["MKTAYIAKQR", "MSE"])
    assert feats.residues is not None
    together = predict(head, feats.residues)
    alone = predict(head, onehot_residues(["MSE"]).residues)  # type: ignore[arg-type]
    np.testing.assert_allclose(together[1], alone[0], atol=1e-6)
    assert together[0].shape == (10, 3)


def test_onehot_features() -> None:
    flat = onehot_flat(["AC", "Y", "ACDX"], 3)
    assert flat.pooled is not None and flat.pooled.shape == (3, 63)
    assert flat.truncated.tolist() == [False, False, True]
    rows = flat.pooled.reshape(3, 3, 21)
    assert rows[0, 0, 0] == 1 and rows[0, 1, 1] == 1 and rows[0, 2].sum() == 0 and rows[1, 0, 19] == 1
    res = onehot_residues(["AXu"])
    assert res.residues is not None and res.residues[0].argmax(1).tolist() == [0, 20, 20]


def test_metrics() -> None:
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 2, 3]), np.array([4, 3, 2, 1])) == pytest.approx(-0.9486832980505138)
    assert np.isnan(spearman(np.array([np.nan, np.nan, np.nan]), np.array([3.0, 1.0, 2.0])))
    f = floor(
        "classification", [np.array([0, 1, 1, IGNORE])], [np.array([1, 1, 0, IGNORE]), np.array([1])], True
    )
    assert f["accuracy"] == pytest.approx(75.0) and f["n"] == 4
    assert f["accuracy_per_sequence"] == pytest.approx((200 / 3 + 100) / 2)
    r = floor("regression", [np.array(1.0), np.array(3.0)], [np.array(2.0), np.array(4.0)])
    assert r["rmse"] == pytest.approx(np.sqrt(2.0)) and np.isnan(r["spearman"])
    assert np.isnan(sequence_accuracy([np.array([0])], [np.array([IGNORE])]))
    # a residue past the features' reach has a label but no prediction (IGNORE): not counted
    cm = confusion(np.array([0, 1, IGNORE, 2]), np.array([0, 2, 1, IGNORE]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs protembed[plot]")
@pytest.mark.parametrize("task", ["flip-gb1", "flip-ss3"])
def test_plot_png(task: str, tmp_path: Path) -> None:
    finetune_json(task, tmp_path, "--features", "onehot", "--plot", "--output", tmp_path / "out")
    assert (tmp_path / "out" / "test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- user mistakes and odd inputs (found in review) ------------------------------------------------


def copy_task(tmp_path: Path, folder: str) -> Path:
    """A writable copy of one tiny task folder; returns the data dir holding it."""
    data = tmp_path / "data"
    shutil.copytree(TINY / folder, data / folder)
    return data


def test_cli_option_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    base = ["finetune", "flip-gb1", "--data-dir", TINY, "--cache-dir", tmp_path / "c", "-q"]
    onehot = [*base, "--features", "onehot"]
    for extra, code, message in [
        (["--lr", "inf"], 2, "must be a positive number"),
        (["--lr", "0"], 2, "Invalid value for '--lr': must be a positive number"),
        (["--seed", "-1"], 2, "--seed"),
        (["--layer", "1"], 2, "one-hot features have no layers"),
        (["--device", "foo"], 1, "error: unknown --device 'foo' (use cpu, cuda or cuda:N)"),
        (["--split", "../gb1/two_vs_rest"], 1, "is not a split name"),
    ]:
        r = run_cli(*onehot, *extra)
        assert r.exit_code == code and message in r.output, (extra, r.output)
    r = run_cli(*base, "--model", ESM2, "--device", "cpu", "--layer", "9")
    assert r.exit_code == 1 and "error: --layer: layer 9 out of range" in r.output
    (tmp_path / "afile").write_text("")
    r = run_cli(*onehot, "--device", "cpu", "--output", tmp_path / "afile" / "x")
    assert r.exit_code == 1 and "cannot create output folder" in r.output and "Traceback" not in r.output
    for lr in ("1e30", "1e300"):  # a huge loss; a step beyond float range
        r = run_cli(*onehot, "--device", "cpu", "--lr", lr, "--epochs", "2")
        assert r.exit_code == 1 and "error: training diverged" in r.output, r.output


def test_undefined_metrics_saved_as_null(tmp_path: Path) -> None:
    """Constant targets make every Spearman undefined: null in config.json, which stays strict JSON."""
    data = copy_task(tmp_path, "gb1")
    path = data / "gb1" / "two_vs_rest.fasta"
    path.write_text(re.sub(r"TARGET=\S+", "TARGET=1.0", path.read_text()))
    out = tmp_path / "head"
    r = run_cli("finetune", "flip-gb1", "--features", "onehot", "--data-dir", data, "--epochs", "2",
                "--device", "cpu", "--output", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    config = json.loads((out / "config.json").read_text(), parse_constant=refuse)
    assert config["metrics"]["test"]["spearman"] is None
    assert [h["spearman"] for h in config["history"]] == [None, None]


def test_non_finite_target_is_an_error(tmp_path: Path) -> None:
    data = copy_task(tmp_path, "gb1")
    path = data / "gb1" / "two_vs_rest.fasta"
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "TARGET=" in line)
    lines[first] = re.sub(r"TARGET=\S+", "TARGET=nan", lines[first])
    path.write_text("\n".join(lines) + "\n")
    r = run_cli("finetune", "flip-gb1", "--features", "onehot", "--data-dir", data, "-q")
    assert r.exit_code == 1 and "TARGET 'nan' is not a finite number" in r.output
    assert f"{path}:{first + 1}" in r.output


def test_large_targets_are_scaled_without_overflow(tmp_path: Path) -> None:
    """Targets near 1e37 sum and square to beyond float32: the same metrics as in ordinary units."""
    data = copy_task(tmp_path, "gb1")
    path = data / "gb1" / "two_vs_rest.fasta"
    plain = finetune_json("flip-gb1", tmp_path, "--data-dir", data, "--features", "onehot", "--head", "ridge")
    path.write_text(re.sub(r"TARGET=(\S+)", r"TARGET=\1e37", path.read_text()))
    big = finetune_json("flip-gb1", tmp_path, "--data-dir", data, "--features", "onehot", "--head", "ridge")
    assert big["target_scale"][1] == pytest.approx(plain["target_scale"][1] * 1e37, rel=1e-5)
    for row in ("test", "floor"):
        assert big["metrics"][row]["rmse"] == pytest.approx(plain["metrics"][row]["rmse"] * 1e37, rel=1e-4)
    assert big["metrics"]["test"]["spearman"] == pytest.approx(plain["metrics"]["test"]["spearman"], abs=1e-6)


def test_saved_measured_values_are_the_files_targets(tmp_path: Path) -> None:
    """Targets are standardized in float32 for training; what is saved and scored is what was read."""
    data = copy_task(tmp_path, "gb1")
    path = data / "gb1" / "two_vs_rest.fasta"
    # small values with many digits, as in FLIP's gb1 file (TARGET=0.00189022989525)
    path.write_text(re.sub(r"TARGET=(\S+)", lambda m: f"TARGET={float(m[1]) / 529.1:.12g}", path.read_text()))
    written = {m[1]: float(m[2]) for m in re.finditer(r">(\S+).*TARGET=(\S+)", path.read_text())}
    out = finetune_json("flip-gb1", tmp_path, "--data-dir", data, "--features", "onehot", "--head", "linear",
                        "--output", tmp_path / "out")  # fmt: skip
    with open(tmp_path / "out" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["measured"] == f"{written[r['id']]:.6g}" for r in rows)
    pred = np.array([float(r["predicted"]) for r in rows])
    true = np.array([written[r["id"]] for r in rows])
    assert out["metrics"]["test"]["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)), rel=1e-5)


def test_predict_reads_ordinary_fasta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "head"
    finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--head", "ridge", "--output", out_dir)
    text = ">sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens\nMVLSPADKTNVKAAW*\n>b\nmvlspadk\n"
    fasta = tmp_path / "uni.fasta"
    fasta.write_text(text)
    from_file = run_cli("predict", out_dir, fasta, "--device", "cpu", "-q")
    assert from_file.exit_code == 0, from_file.output
    rows = list(csv.reader(from_file.stdout.splitlines()))
    assert [r[0] for r in rows] == ["id", "sp|P69905|HBA_HUMAN", "b"]
    assert "\r" not in from_file.stdout
    from_stdin = runner.invoke(app, ["predict", str(out_dir), "-", "--device", "cpu", "-q"], input=text)
    assert from_stdin.exit_code == 0, from_stdin.output
    assert from_stdin.stdout == from_file.stdout
    fasta.write_bytes(b">a\nMKV\n>b\nMK\xe9V\n")  # Latin-1, not UTF-8: an error, not a traceback
    bad = run_cli("predict", out_dir, fasta, "--device", "cpu", "-q")
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert f"{fasta}:4: record 'b': byte 0xe9 at position 3 is not UTF-8 text" in bad.output


def test_onehot_from_data_dir_needs_no_cache_folder(tmp_path: Path) -> None:
    """Nothing is downloaded or embedded, so a cache folder that cannot be made is not in the way."""
    (tmp_path / "afile").write_text("")
    unusable = tmp_path / "afile" / "cache"
    base = ["--data-dir", TINY, "--split", TINY_SPLITS["flip-gb1"], "--cache-dir", unusable, "-q"]
    out_dir, fasta = tmp_path / "head", tmp_path / "in.fasta"
    r = run_cli("finetune", "flip-gb1", "--features", "onehot", "--head", "ridge", "-o", out_dir, *base)
    assert r.exit_code == 0, r.output
    fasta.write_text(">a\nMKV\n")
    for extra in ([], ["--no-cache"]):
        r = run_cli("predict", out_dir, fasta, "--cache-dir", unusable, "-q", *extra)
        assert r.exit_code == 0 and r.stdout.startswith("id,prediction\na,"), r.output
    r = run_cli("finetune", "flip-gb1", "--model", ESM2, "--epochs", "1", *base)  # features go there
    assert r.exit_code == 1 and f"{unusable}: cannot create cache folder" in r.output


def test_predict_input_defects_and_gzip_stdin(tmp_path: Path) -> None:
    """predict reads FASTA as `embed` does: gzip from its bytes, spaces dropped, defects one line each."""
    out_dir = tmp_path / "head"
    finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--head", "ridge", "--output", out_dir)
    args = ["predict", str(out_dir), "-", "--device", "cpu", "-q"]
    plain = runner.invoke(app, args, input=b">a\nMKT AYI\nAK\n")
    zipped = runner.invoke(app, args, input=gzip.compress(b">a\nMKTAYIAK\n"))
    assert plain.exit_code == zipped.exit_code == 0, plain.output + zipped.output
    assert plain.stdout == zipped.stdout and "a," in plain.stdout
    for data, message in [
        (b">a\nMKV\n>b\n*\n", "<stdin>:3: record 'b': empty record (only a stop codon)"),
        (b">\nMKV\n", "<stdin>:1: record '': header without an id"),
        (b">a\nMKTAYIAK\nQR1S\n", "<stdin>:3: record 'a': invalid residue '1' at position 11"),
    ]:
        bad = runner.invoke(app, args, input=data)
        assert bad.exit_code == 1 and message in bad.output, bad.output
        assert "Traceback" not in bad.output


def test_predict_rejects_weights_of_another_head(tmp_path: Path) -> None:
    out_dir = tmp_path / "head"
    finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--head", "ridge", "--output", out_dir)
    weights = out_dir / "head.safetensors"
    (tmp_path / "mlp").mkdir()
    finetune_json(
        "flip-gb1", tmp_path / "mlp", "--features", "onehot", "--epochs", "1", "-o", tmp_path / "mlp/h"
    )
    for blob, why in [
        (b"junk", ""),
        ((tmp_path / "mlp/h/head.safetensors").read_bytes(), "(no tensor "),  # an MLP's in a linear's place
    ]:
        weights.write_bytes(blob)
        r = run_cli("predict", out_dir, TINY / "gb1" / "two_vs_rest.fasta", "--device", "cpu", "-q")
        assert r.exit_code == 1 and f"not the weights of the head in config.json {why}" in r.output, r.output
    for name in ("config.json", "head.safetensors"):  # a file of the head, not its folder
        r = run_cli("predict", out_dir / name, TINY / "gb1" / "two_vs_rest.fasta", "-q")
        assert r.exit_code == 1 and f"is a file of a saved head: pass its folder, {out_dir}" in r.output
    r = run_cli("predict", ESM2 / "config.json", TINY / "gb1" / "two_vs_rest.fasta", "-q")  # a model's
    assert r.exit_code == 1 and "config.json is not a saved head" in r.output, r.output


def test_predict_rejects_an_edited_config(tmp_path: Path) -> None:
    out_dir = tmp_path / "head"
    finetune_json("flip-gb1", tmp_path, "--features", "onehot", "--head", "ridge", "--output", out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    for field, value, message in [
        ("classes", ["C", "E"], "classes ['C', 'E'] are not those of flip-gb1"),
        ("task", "flip-nope", "task 'flip-nope' is not a FLIP task"),
        ("target_scale", [1.0], "target_scale [1.0] is not two finite numbers"),
        ("target_scale", [True, False], "is not two finite numbers"),
        ("target_scale", [1.0, float("nan")], "target_scale [1.0, nan] is not two finite numbers"),
        ("target_scale", [0, 0], "has a scale (its second number) that is not above 0"),
        ("head_config", None, "head_config None is not a head's settings"),
        (
            "head_config",
            {**saved["head_config"], "extra": 1},
            "config.json: head_config is not a head's settings (",
        ),
        (
            "head_config",
            {**saved["head_config"], "module": "lstm"},
            "config.json: head_config is not a head's",
        ),
        ("model", {"ref": "x", "layer": 3}, "is set, but the features are one-hot"),
        ("onehot_length", "x", "onehot_length 'x' is not a positive whole number"),
        ("features", "model", "model None is not a model with ref, layer and revision"),
        ("features", "esm", "features 'esm' is neither"),
    ]:
        (out_dir / "config.json").write_text(json.dumps({**saved, field: value}))
        r = run_cli("predict", out_dir, TINY / "gb1" / "two_vs_rest.fasta", "--device", "cpu", "-q")
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output


def test_local_checkpoint_revision_follows_its_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ESM2, ckpt)
    before = locate_model(str(ckpt))
    assert before.revision.startswith("sha256:")
    weights = next(ckpt.glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(blob))
    after = locate_model(str(ckpt))
    assert after.revision != before.revision
    assert model_folder(tmp_path, after, 3, "float32") != model_folder(tmp_path, before, 3, "float32")


def test_saved_residue_predictions_cover_long_sequences(tmp_path: Path) -> None:
    data = copy_task(tmp_path, "conservation")
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 1100))
    labels = "".join(rng.choice(list("123456789"), 1100))
    with open(data / "conservation" / "sequences.fasta", "a") as fh:
        fh.write(f">long\n{seq}\n")
    with open(data / "conservation" / "sampled.fasta", "a") as fh:
        fh.write(f">long SET=test VALIDATION=False\n{labels}\n")
    out_dir = tmp_path / "out"
    r = run_cli("finetune", "flip-conservation", "--model", ESM2, "--data-dir", data, "--device", "cpu",
                "--cache-dir", tmp_path / "c", "--epochs", "1", "-o", out_dir, "--json", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dropped_residue_labels"] == 1100 - 1022
    with open(out_dir / "predictions.csv") as fh:
        row = next(row for row in csv.DictReader(fh) if row["id"] == "long")
    assert row["measured"] == labels
    assert len(row["predicted"]) == 1100 and set(row["predicted"][1022:]) == {"-"}
    assert "-" not in row["predicted"][:1022]


def test_feature_cache_waits_for_another_run(tmp_path: Path) -> None:
    lock = str(tmp_path / ".lock")
    code = f"import fcntl, time; f = open({lock!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    code += "print('held', flush=True); time.sleep(1.5)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with held_lock(tmp_path / ".lock", "the feature cache", wait_s=30):
        assert time.monotonic() - t0 > 0.5, "it waited for the lock"
    holder.wait()
