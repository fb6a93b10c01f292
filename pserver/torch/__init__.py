"""PyTorch modules over pserver tables (optional extra: pip install 'pserver[torch]')."""

from .dense import DenseParameters
from .embedding import Embedding, EmbeddingBag, ids_to_keys

__all__ = ["DenseParameters", "Embedding", "EmbeddingBag", "ids_to_keys"]
