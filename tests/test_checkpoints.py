"""Strict, lazy checkpoint loading: every layout variant loads, every defect is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from protembed.errors import CheckpointError
from protembed.models.checkpoints import load_checkpoint, verify_checkpoint
from tests.helpers import fixture_dir

ESM = fixture_dir("esm2_t3_h64") / "checkpoint"
AMP = fixture_dir("amplify_l3_h64") / "checkpoint"


def copy_with(tmp: Path, src: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    out = tmp / "ckpt"
    shutil.copytree(src, out)
    if state is not None:
        save_file(state, str(out / "model.safetensors"))
    return out


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("src", [ESM, AMP])
def test_verify_reads_no_weights_and_agrees_with_load(src: Path) -> None:
    cfg = verify_checkpoint(src)
    model = load_checkpoint(src)
    assert model.config == cfg
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = load_file(str(ESM / "model.safetensors"))
    del state["esm.encoder.layer.1.intermediate.dense.weight"]
    state["esm.encoder.layer.1.surprise.weight"] = torch.zeros(2)
    path = copy_with(tmp_path, ESM, state)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing keys: esm.encoder.layer.1.intermediate.dense.weight" in msg
    assert "unexpected keys: esm.encoder.layer.1.surprise.weight" in msg


def test_shape_mismatch_is_an_error(tmp_path: Path) -> None:
    state = load_file(str(AMP / "model.safetensors"))
    state["transformer_encoder.0.ffn.w3.weight"] = torch.zeros(64, 170)
    with pytest.raises(CheckpointError, match=r"w3.weight \[64, 170\] != \[64, 176\]"):
        verify_checkpoint(copy_with(tmp_path, AMP, state))


def test_new_key_spellings_and_unprefixed_esmmodel_files_load(tmp_path: Path) -> None:
    state = load_file(str(ESM / "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        if k.startswith("lm_head."):
            continue  # EsmModel files have no LM head
        k = k.removeprefix("esm.")
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed[k] = v
    path = copy_with(tmp_path, ESM, renamed)
    with pytest.raises(CheckpointError, match="missing keys: lm_head"):
        load_checkpoint(path)  # strict: the LM head is part of the model
    for k, v in state.items():
        if k.startswith("lm_head."):
            renamed[k] = v
    save_file(renamed, str(path / "model.safetensors"))
    assert same_outputs(load_checkpoint(path), load_checkpoint(ESM))


def test_sharded_safetensors_and_pickled_bin(tmp_path: Path) -> None:
    state = load_file(str(ESM / "model.safetensors"))
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    shutil.copytree(ESM, sharded)
    (sharded / "model.safetensors").unlink()
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reference = load_checkpoint(ESM)
    assert same_outputs(load_checkpoint(sharded), reference)

    pickled = tmp_path / "pickled"
    shutil.copytree(ESM, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    assert same_outputs(load_checkpoint(pickled), reference)


def test_truncated_weights_are_detected(tmp_path: Path) -> None:
    path = copy_with(tmp_path, ESM)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_not_an_esm_or_amplify_config(tmp_path: Path) -> None:
    path = copy_with(tmp_path, ESM)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="not an ESM-2 or AMPLIFY checkpoint"):
        verify_checkpoint(path)


def test_no_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_directly_in_the_requested_dtype(dtype: torch.dtype) -> None:
    model = load_checkpoint(AMP, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.rotary.inv_freq.dtype == torch.float32  # frequencies are never rounded
