"""LDA topic models on the parameter server, written only against the public worker API.

Modules: corpus (text, apt descriptions, vocabulary, encoding), kernels (numba: alias-table
Metropolis-Hastings sampler, fold-in), trainer (one worker's blocks with bounded delay),
model (export, perplexity, inference), worker (one training process), cli (`pserver train lda |
lda-infer`). docs/lda.md explains the choices.
"""
