"""Sparse logistic regression on the parameter server: Delayed Block Proximal Gradient (DBPG) or
FTRL-proximal.

Written only against the public worker API (pserver.KVWorker), as a user would write it.
Modules: hashing (feature keys), parsers + data (sharded readers), gen (synthetic data),
dbpg (the batch algorithm), ftrl (the online one), path (--l1 auto: the regularisation path),
model (export, prediction, metrics), worker (one training process), cli (`pserver gen-data |
train lr | predict | demo`).
"""
