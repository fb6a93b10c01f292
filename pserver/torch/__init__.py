"""PyTorch modules over pserver tables (optional extra: pip install 'pserver[torch]')."""

from .dense import DenseParameters
from .embedding import Embedding, EmbeddingBag, ids_to_keys
from .exported import ExportedEmbedding, load_exported

__all__ = ["DenseParameters", "Embedding", "EmbeddingBag", "ExportedEmbedding", "ids_to_keys",
           "load_exported"]
