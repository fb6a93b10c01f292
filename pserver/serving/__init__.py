"""HTTP serving of live tables (`pserver serve lr`, `pserver serve embeddings`): what every kind of
service shares - http (bearer check, body limit, JSON errors, the app's lifespan), batcher (one
pull for concurrent requests), source (the KVWorker of a read-only group), cli (options,
uvicorn). The kinds: pserver.apps.lr.serve, pserver.apps.embeddings. docs/serve.md."""
