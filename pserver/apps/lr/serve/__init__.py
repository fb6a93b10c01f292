"""`pserver serve lr`: an HTTP service answering predictions of the sparse LR model from the
servers' live weights. Modules: instances (request decoding, no I/O), cache (fresh weights, no
I/O), batcher (one pull for concurrent requests), source (the KVWorker), auth (bearer token),
app (Starlette routes), cli (options, uvicorn). Design and numbers: docs/serve.md."""
