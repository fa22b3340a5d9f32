"""protembed: protein language model embeddings from FASTA to HDF5."""

__version__ = "0.1.0"

from protembed.api import Embeddings, Model, load_model  # noqa: E402

__all__ = ["Embeddings", "Model", "__version__", "load_model"]
