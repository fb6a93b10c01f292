"""Fault tolerance: checkpoints and restore (checkpoint), detection of lost key ranges (loss);
replication and failover live beside them."""
