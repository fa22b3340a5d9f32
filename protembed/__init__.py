"""protembed: protein language model embeddings from FASTA to HDF5."""

__version__ = "0.1.0"
