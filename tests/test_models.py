"""The model core reproduces the reference implementations (fixtures) to float tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protembed.alphabet import ALPHABETS
from protembed.api import load_model
from protembed.errors import BackendError, InvalidSequenceError, OptionError
from protembed.models.encoder import Encoder, resolve_layers
from protembed.pooling import mean_pool
from tests.helpers import FIXTURE_NAMES, fixture_dir, reference, run_packed

TOL = 1e-4  # fixtures README: final representations within 1e-4 (a faithful port lands ~1e-5)


def family(name: str) -> str:
    return "esm2" if name.startswith("esm2") else "amplify"


def layer_of_hidden_state(name: str, j: int) -> int:
    """Our layer index of reference hidden_states[j] (ESM-2 includes the embedding, AMPLIFY not)."""
    return j if family(name) == "esm2" else j + 1


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_reference_array_of_single_runs(name: str, fixture_model: dict[str, Encoder]) -> None:
    model = fixture_model[name]
    meta, ref = reference(name)
    n = model.config.n_layers
    all_layers = list(range(model.config.top_layer + 1))
    worst = 0.0
    for seq in meta["sequences"]:
        k = seq["key"]
        ids = ref[f"{k}_input_ids"]
        [out], _ = run_packed(model, [ids], all_layers, logits=True)
        states = out.states
        checks = {
            "last_hidden_state": (states[n], ref[f"{k}_last_hidden_state"]),
            "mean": (mean_pool(states[n], _packing(ids))[0], ref[f"{k}_mean"]),
        }
        if f"{k}_hidden_states" in ref:
            for j, hs in enumerate(ref[f"{k}_hidden_states"]):
                checks[f"hidden_states[{j}]"] = (states[layer_of_hidden_state(name, j)], hs)
        if f"{k}_final_normed" in ref:
            checks["final_normed"] = (states[n + 1], ref[f"{k}_final_normed"])
        if f"{k}_mean_final_normed" in ref:
            checks["mean_final_normed"] = (
                mean_pool(states[n + 1], _packing(ids))[0],
                ref[f"{k}_mean_final_normed"],
            )
        for what, (got, want) in checks.items():
            diff = float(np.abs(got.numpy() - want).max())
            worst = max(worst, diff)
            assert diff <= TOL, f"{name} {k} {what}: max abs diff {diff:.2e}"
        np.testing.assert_allclose(out.logits.numpy(), ref[f"{k}_logits"], atol=TOL, rtol=1e-5)
    assert worst < 2e-5, f"{name}: worst diff {worst:.2e} (a faithful port lands ~1e-5)"


def _packing(ids: np.ndarray):
    from protembed.models.packing import Packing

    return Packing.from_lengths([len(ids)])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_padded_reference_batch_equals_packed_batch(name: str, fixture_model: dict[str, Encoder]) -> None:
    model = fixture_model[name]
    _, ref = reference(name)
    mask = ref["batch_attention_mask"].astype(bool)
    rows = [ids[m] for ids, m in zip(ref["batch_input_ids"], mask)]
    n = model.config.n_layers
    [out], cu = run_packed(model, rows, [n], logits=True)
    for b in range(len(rows)):
        got = out.states[n][cu[b] : cu[b + 1]].numpy()
        want = ref["batch_last_hidden_state"][b][mask[b]]
        assert np.abs(got - want).max() <= TOL
        logits = out.logits[cu[b] : cu[b + 1]].numpy()
        np.testing.assert_allclose(logits, ref["batch_logits"][b][mask[b]], atol=TOL, rtol=1e-5)
    batch = __import__("protembed.batching", fromlist=["pack"]).pack(rows)
    means = mean_pool(out.states[n], batch.packing).numpy()
    assert np.abs(means - ref["batch_mean"]).max() <= TOL


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tokenizer_matches_reference_ids(name: str) -> None:
    meta, ref = reference(name)
    alphabet = ALPHABETS[family(name)]
    for seq in meta["sequences"]:
        ids = alphabet.encode(seq["sequence"])
        if seq["name"].startswith("mixed_case"):
            # protembed upper-cases residues on purpose; the references do not (fixtures README).
            upper = alphabet.encode(seq["sequence"].upper())
            assert np.array_equal(ids, upper)
            assert len(ids) == len(seq["sequence"]) + 2
            continue
        assert np.array_equal(ids, ref[f"{seq['key']}_input_ids"]), seq["key"]


def test_layer_resolution() -> None:
    from protembed.models.checkpoints import registry_config

    esm = registry_config("esm2-8m")
    amp = registry_config("amplify-120m")
    assert resolve_layers([-1], esm) == [6]
    assert resolve_layers(["all"], esm) == list(range(7))
    assert resolve_layers([0, -1, 3, 3], esm) == [0, 3, 6]
    assert resolve_layers([-1], amp) == [24]
    assert resolve_layers(["final"], amp) == [25]
    assert resolve_layers(["final"], esm) == [6]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([7], esm)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([-8], esm)
    assert resolve_layers("all", esm) == list(range(7)) and resolve_layers(-1, esm) == [6]  # one item
    with pytest.raises(ValueError, match="layer 'x' is not a number, 'all' or 'final'"):
        resolve_layers(["x"], esm)
    assert resolve_layers("0, -1,3", esm) == [0, 3, 6]  # the command line's comma list
    assert resolve_layers(["final,0"], amp) == [0, 25]
    with pytest.raises(ValueError, match="layer '' is not a number"):
        resolve_layers("0,", esm)


def test_python_api_refuses_wrong_arguments() -> None:
    """Mistakes through the Python API are clear errors, not silent results or KeyErrors."""
    ckpt = fixture_dir("esm2_t3_h64") / "checkpoint"
    with pytest.raises(OptionError, match="dtype 'float64' is not one of float32, bfloat16, float16"):
        load_model(ckpt, dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            load_model(ckpt, device="cuda")
    with pytest.raises(OptionError, match="revision names a Hub revision"):
        load_model(ckpt, revision="main")
    model = load_model(ckpt, dtype=torch.float32, device="cpu")
    with pytest.raises(TypeError, match="a list of sequences, not one string"):
        model.embed("MKTAY")
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        model.embed(["MKV", ""])
    with pytest.raises(TypeError, match="item 1 is NoneType, not str"):
        model.embed(["MKV", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="pooling: name at least one"):
        model.embed(["MKV"], pooling=[])
    for bad in ([], True, [1.5]):
        with pytest.raises(ValueError, match="no layers given|is not a number"):
            model.embed(["MKV"], layers=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sequence 1 is empty once its final"):
        model.embed(["MKV", "*"])
    limit = model.encoder.config.max_residues
    for bad_limit in (-1, 0, limit + 1, 5.0):
        with pytest.raises(
            ValueError, match=rf"max_residues: {bad_limit} must be a whole number in 1\.\.{limit}"
        ):
            model.embed(["MKV"], max_residues=bad_limit)  # type: ignore[arg-type]
    cut = model.embed(["MKTAYIAK"], max_residues=3, per_residue=True)
    assert cut.truncated.tolist() == [True] and cut.residues is not None and cut.residues[0].shape[0] == 3
    for bad_budget in (0, 10.5, None, 1 << 30):
        with pytest.raises(
            ValueError, match=rf"tokens_per_batch: {bad_budget} is not a whole number in 1\.\.16777216"
        ):
            model.embed(["MKV"], tokens_per_batch=bad_budget)  # type: ignore[arg-type]
    assert model.embed(["MKV"], layers="all").pooled["mean"].shape == (1, 4, 64)
    for pooling in ("max", ["mean", "max"], "mean,"):  # refused before anything is computed
        with pytest.raises(OptionError, match=r"pooling: '(max|)' is not one of mean, cls"):
            model.embed([], pooling=pooling)
    both = model.embed(["MKV"], pooling=["mean,cls", "mean"])  # comma lists inside a list, each name once
    assert list(both.pooled) == ["mean", "cls"]
    with pytest.raises(
        OptionError, match="layers: layer 9 out of range"
    ):  # a ProtembedError, and a ValueError
        model.embed(["MKV"], layers=9)
    for device in ("meta", "mps", "cpu:2"):  # one real device: cpu, cuda or cuda:N
        with pytest.raises(OptionError, match=f"unknown device '{device}'"):
            load_model(ckpt, device=device)
    with pytest.raises(OptionError, match="layers: layer 7 out of range"):
        model.layers(7)
    with pytest.raises(InvalidSequenceError, match="sequences: sequence 1: invalid residue '8' at pos"):
        model.embed(["MKV", "MK8V"])
    for wrong, match in (
        ({"layers": None}, "layers: pass a layer, a comma list or a list of them, not NoneType"),
        ({"pooling": None}, "pooling: pass a name, a comma list or a list of them, not NoneType"),
        ({"per_residue": "no"}, "per_residue: pass True or False, not str"),
    ):
        with pytest.raises(TypeError, match=match):
            model.embed(["MKV"], **wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="device: pass a name such as 'cpu' or 'cuda:0', not int"):
        load_model(ckpt, device=0)  # type: ignore[arg-type]
    spaced = model.embed(["MK TAY\nIAK\r\n", "MKTAYIAK"], pooling="mean,cls")  # read as a FASTA record
    assert sorted(spaced.pooled) == ["cls", "mean"]
    assert np.array_equal(spaced.pooled["mean"][0], spaced.pooled["mean"][1])
    assert model.embed(iter(["MKV", "MKVL"]), layers=np.int64(2), pooling="cls").pooled["cls"].shape == (
        2,
        1,
        64,
    )


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_shallow_layers_stop_early_and_match(name: str, fixture_model: dict[str, Encoder]) -> None:
    model = fixture_model[name]
    _, ref = reference(name)
    ids = ref["s03_input_ids"]
    [full], _ = run_packed(model, [ids], list(range(model.config.top_layer + 1)))
    [part], _ = run_packed(model, [ids], [1])
    assert list(part.states) == [1]
    assert torch.equal(part.states[1], full.states[1])
