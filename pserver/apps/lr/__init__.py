"""Sparse logistic regression on the parameter server: Delayed Block Proximal Gradient (DBPG).

Written only against the public worker API (pserver.KVWorker), as a user would write it.
Modules: hashing (feature keys), parsers + data (sharded readers), gen (synthetic data),
dbpg (the algorithm), model (export, prediction, metrics), worker (one training process),
cli (`pserver gen-data | train lr | predict | demo`).
"""
