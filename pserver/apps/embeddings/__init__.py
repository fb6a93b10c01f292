"""`pserver serve embeddings`: the live rows of pserver.torch embedding tables over HTTP (POST
/lookup), for the IDs the training gave its modules. Modules: lookup (request decoding, the ID to
key mapping, which rows are the initializer; no I/O), app (routes), cli (options). The shared
serving machinery is pserver.serving. docs/torch.md, docs/serve.md."""
