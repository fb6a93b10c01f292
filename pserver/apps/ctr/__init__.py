"""A DeepFM click-through-rate model whose embedding tables live on the servers (pserver.torch)."""
