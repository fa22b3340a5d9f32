"""Shared pytest fixtures."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from protembed.models.checkpoints import load_checkpoint
from protembed.models.encoder import Encoder
from tests.flip_server import FlipServer
from tests.helpers import fixture_dir
from tests.hub_server import FakeHub, default_repos

torch.set_num_threads(1)  # the fixture references were computed single-threaded; keeps CI steady


@pytest.fixture(scope="session")
def fixture_model() -> dict[str, Encoder]:
    """The two fixture checkpoints, loaded once per session in float32."""
    return {
        name: load_checkpoint(fixture_dir(name) / "checkpoint") for name in ("esm2_t3_h64", "amplify_l3_h64")
    }


# protembed's own cache (weight digests, FLIP downloads, features) goes to a throwaway folder,
# for this process and every subprocess the tests start.
os.environ["PROTEMBED_CACHE"] = tempfile.mkdtemp(prefix="protembed-test-cache-")


# --- a fake Hub on 127.0.0.1 (tests/hub_server.py) ---------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeHub]:
    hub = FakeHub(default_repos()).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(server: FakeHub) -> FakeHub:
    server.faults.clear()
    server.requests.clear()
    return server


@pytest.fixture
def cache(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In process: huggingface_hub pointed at the fake Hub, online, no token, an empty cache."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def flip_server() -> Iterator[FlipServer]:
    """The FLIP FASTA server's layout, served on 127.0.0.1 from the shared fasta_layout folder."""
    s = FlipServer()
    yield s
    s.close()
