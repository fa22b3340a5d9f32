"""The oneDNN projections equal the addmm ones, and run only where they may."""

from __future__ import annotations

import platform
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from protembed.models import layers as layer_module
from protembed.models import projections
from protembed.models.attention import Workspace
from protembed.models.encoder import Encoder
from protembed.models.projections import onednn_available, project, project_add, project_gelu
from tests.helpers import FIXTURE_NAMES, reference, run_packed

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="oneDNN path is x86-64 only")


@pytest.fixture
def addmm_only() -> Iterator[None]:
    projections.ONEDNN = False
    yield
    projections.ONEDNN = True


def layer(n_in: int, n_out: int, bias: bool, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(n_in + n_out + bias)
    return nn.Linear(n_in, n_out, bias=bias).to(dtype).requires_grad_(False)


def both(fn, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """`fn(*args)` through oneDNN and through addmm."""
    projections.ONEDNN = True
    fast = fn(*args)
    projections.ONEDNN = False
    try:
        slow = fn(*args)
    finally:
        projections.ONEDNN = True
    return fast, slow


@pytest.mark.skipif(not X86, reason="PyTorch's x86-64 CPU wheels are built with oneDNN")
def test_onednn_is_available_on_x86() -> None:
    assert onednn_available()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_float32_projections_match_addmm(bias: bool) -> None:
    lin = layer(96, 200, bias)
    x, residual = torch.randn(257, 96), torch.randn(257, 200)
    for fast, slow in (
        both(project, x, lin),
        both(project_gelu, x, lin),
        both(project_add, x, lin, residual),
    ):
        assert fast.dtype == torch.float32 and fast.shape == (257, 200)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert not torch.equal(project_add(x, lin, residual), project(x, lin)), "the residual is added"


@needs_onednn
def test_bfloat16_projections_match_addmm() -> None:
    lin = layer(64, 128, True, torch.bfloat16)
    x = torch.randn(33, 64, dtype=torch.bfloat16)
    for fast, slow in (both(project, x, lin), both(project_gelu, x, lin)):
        assert fast.dtype == torch.bfloat16
        torch.testing.assert_close(fast.float(), slow.float(), atol=2e-2, rtol=2e-2)


def test_workspace_buffer_is_used_on_the_addmm_path(addmm_only: None) -> None:
    lin, ws = layer(16, 24, True), Workspace()
    x = torch.randn(10, 16)
    first = project(x, lin, ws, "buf")
    second = project(x * 2, lin, ws, "buf")
    assert first.data_ptr() == second.data_ptr()
    torch.testing.assert_close(second, lin(x * 2))


def test_gradients_flow_through_the_addmm_path() -> None:
    lin = nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    project_add(x, lin, torch.zeros(5, 4)).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, x.detach().sum(0).expand(4, 8))


@needs_onednn
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_encoder_is_the_same_with_and_without_onednn(name: str, fixture_model: dict[str, Encoder]) -> None:
    model = fixture_model[name]
    meta, ref = reference(name)
    ids = [ref[f"{s['key']}_input_ids"] for s in meta["sequences"]]
    layers = [model.config.n_layers]
    fast, slow = both(lambda: run_packed(model, ids, layers)[0][0].states[layers[0]])
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=2e-5)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_ffn_in_row_chunks_equals_one_pass(
    name: str, fixture_model: dict[str, Encoder], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fixture_model[name]
    meta, ref = reference(name)
    ids = [ref[f"{s['key']}_input_ids"] for s in meta["sequences"]]
    layers = [model.config.n_layers]
    whole = run_packed(model, ids, layers)[0][0].states[layers[0]]
    monkeypatch.setattr(layer_module, "FFN_CHUNK_BYTES", 0)
    monkeypatch.setattr(layer_module, "FFN_MIN_ROWS", 7)  # 7 rows a chunk
    chunked = run_packed(model, ids, layers)[0][0].states[layers[0]]
    assert sum(len(i) for i in ids) > 7 * 3, "several chunks ran"
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), atol=1e-5)
