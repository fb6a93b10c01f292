"""`pserver serve lr`: an HTTP service answering predictions of the sparse LR model from the
servers' live weights. Modules: instances (request decoding, no I/O), cache (fresh weights, no
I/O), app (its routes), cli (its options). What every service shares (auth, batcher, the
KVWorker source, uvicorn) is pserver.serving. Design and numbers: docs/serve.md."""
