"""`finetune` and `predict` end to end on the tiny FLIP folder; heads, ridge, metrics, the feature cache."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from protembed.api import Model, load_model
from protembed.cli import app
from protembed.errors import BackendError, require_matplotlib
from protembed.features import cache_path, model_features, onehot_flat, onehot_residues
from protembed.flip import IGNORE
from protembed.heads import CNNHead, fit_ridge, predict
from protembed.metrics import floor, rankdata, sequence_accuracy, spearman
from tests.helpers import fixture_dir
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
    model = load_model(ESM2, device="cpu")
    seqs = ["MKTAYIAKQR", "MSEQ", "MKTAYIAKQR", "GGGHHH"]
    calls: list[int] = []
    real = Model.embed

    def counting(self: Model, sequences: list[str], **kw: Any) -> Any:
        calls.append(len(sequences))
        return real(self, sequences, **kw)

    monkeypatch.setattr(Model, "embed", counting)
    first = model_features(seqs, model, -1, False, tmp_path)
    assert calls == [3]  # the duplicate is embedded once
    both = model_features(seqs, model, -1, True, tmp_path)  # residues were not cached yet
    assert calls == [3, 3]
    again = model_features(seqs[::-1], model, 3, True, tmp_path)  # layer 3 == -1: 0 is the embedding
    assert calls == [3, 3]
    assert first.pooled is not None and both.pooled is not None and again.pooled is not None
    np.testing.assert_array_equal(first.pooled, both.pooled)
    np.testing.assert_array_equal(again.pooled, both.pooled[::-1])
    assert both.residues is not None and both.residues.lengths().tolist() == [10, 4, 10, 6]
    direct = real(model, ["MSEQ"], layers=[-1], per_residue=True)
    assert direct.residues is not None
    np.testing.assert_allclose(
        both.residues[1].astype(np.float32), direct.residues[0][:, 0], atol=2e-2, rtol=1e-2
    )
    with h5py.File(cache_path(tmp_path, model, 3)) as h5:
        assert h5.attrs["layer"] == 3 and h5.attrs["source"] == str(ESM2.resolve())
        assert h5["pooled/keys"].shape == (3,)


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


def get_name(task: str) -> str:
    return "flip-secondary-structure" if task == "flip-ss3" else task


def test_cli_errors(tmp_path: Path) -> None:
    base = ["finetune", "flip-gb1", "--data-dir", TINY, "--cache-dir", tmp_path, "--device", "cpu", "-q"]
    r = run_cli(*base, "--features", "onehot", "--model", ESM2)
    assert r.exit_code == 2 and "exclude each other" in r.output
    r = run_cli(*base, "--features", "onehot", "--head", "cnn")
    assert r.exit_code == 1 and "error: head 'cnn' does not fit sequence-level task flip-gb1" in r.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    r = run_cli(*base, "--features", "onehot", "--output", tmp_path / "out")
    assert r.exit_code == 1 and "not empty (pass --overwrite" in r.output
    r = run_cli(*base, "--features", "onehot", "--split", "nope")
    assert r.exit_code == 1 and "no nope.fasta[.gz] in" in r.output
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
    f = floor(
        "classification", [np.array([0, 1, 1, IGNORE])], [np.array([1, 1, 0, IGNORE]), np.array([1])], True
    )
    assert f["accuracy"] == pytest.approx(75.0) and f["n"] == 4
    assert f["accuracy_per_sequence"] == pytest.approx((200 / 3 + 100) / 2)
    r = floor("regression", [np.array(1.0), np.array(3.0)], [np.array(2.0), np.array(4.0)])
    assert r["rmse"] == pytest.approx(np.sqrt(2.0)) and np.isnan(r["spearman"])
    assert np.isnan(sequence_accuracy([np.array([0])], [np.array([IGNORE])]))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs protembed[plot]")
@pytest.mark.parametrize("task", ["flip-gb1", "flip-ss3"])
def test_plot_png(task: str, tmp_path: Path) -> None:
    finetune_json(task, tmp_path, "--features", "onehot", "--plot", "--output", tmp_path / "out")
    assert (tmp_path / "out" / "test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
