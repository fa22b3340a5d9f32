"""Shared pytest fixtures."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from protembed.models.checkpoints import load_checkpoint
from protembed.models.encoder import Encoder
from tests.helpers import fixture_dir

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
