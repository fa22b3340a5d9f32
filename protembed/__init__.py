"""protembed: protein language model embeddings from FASTA to HDF5."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Embeddings", "Model", "__version__", "load_model"]

if TYPE_CHECKING:
    from protembed.api import Embeddings, Model, load_model


def __getattr__(name: str) -> Any:
    """The Python API (`protembed.load_model` etc.), imported on first use: importing torch takes
    1-2 s, which `protembed --help` and other commands that do not need it should not pay."""
    if name in ("Embeddings", "Model", "load_model"):
        from protembed import api

        return getattr(api, name)
    raise AttributeError(f"module 'protembed' has no attribute {name!r}")
