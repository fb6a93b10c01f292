"""`pserver train lda | lda-infer`: the LDA topic model's commands.

pserver/cli.py calls register(subparsers) after the LR app created `pserver train`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ...errors import ConfigError

HEARTBEAT_TIMEOUT = 10.0  # seconds: a worker may sample for seconds between requests


def register(subparsers) -> None:
    """Add the `lda` job to `pserver train`, and `pserver lda-infer`."""
    train = subparsers.choices["train"]
    jobs = next(a for a in train._actions if isinstance(a, argparse._SubParsersAction))
    p = jobs.add_parser("lda", help="LDA topic model (alias-table Metropolis-Hastings sampler)")
    p.add_argument("--data", nargs="+", help="text file(s), one document per line (default: the "
                                             "package descriptions of this machine's apt)")
    p.add_argument("--format", default="lines", choices=("lines", "debian"),
                   help="--data files hold one document per line, or Debian control stanzas "
                        "(`apt-cache dumpavail` output)")
    p.add_argument("--min-df", type=int, default=5, help="keep words in >= this many documents")
    p.add_argument("--max-df", type=float, default=0.1,
                   help="drop words in more than this share of the documents")
    p.add_argument("--max-vocab", type=int, default=50_000)
    p.add_argument("--held-out", type=float, default=0.05,
                   help="share of the documents kept out of training for perplexity")
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N (0: all)")
    from .worker import add_model_args
    add_model_args(p)
    p.add_argument("--servers", type=int, default=2, help="servers of the local cluster")
    p.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    p.add_argument("--insecure", action="store_true", help="local cluster without CURVE keys")
    p.set_defaults(fn=cmd_train_lda)

    p = subparsers.add_parser("lda-infer", help="topic mixtures of new documents under an LDA "
                                                "model (from train lda --model-out)")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, nargs="+", help="text file(s), one document a line")
    p.add_argument("--top", type=int, default=3, help="topics printed per document")
    p.add_argument("--out", help="write the full (documents x topics) mixtures here (.npy)")
    p.set_defaults(fn=cmd_infer)


def prepare(args: argparse.Namespace, path: str) -> str:
    """Read, tokenise and encode the corpus of the train options into ``path`` (.npz)."""
    from .corpus import apt_descriptions, build_corpus, read_dumpavail, read_lines

    if not args.data:
        docs = apt_descriptions()
    else:
        for f in args.data:
            if not os.path.isfile(f):
                raise ConfigError(f"data file {f!r} does not exist")
        if args.format == "debian":
            docs = []
            for f in args.data:
                with open(f, encoding="utf-8", errors="replace") as fh:
                    docs += read_dumpavail(fh)
        else:
            docs = [d for f in args.data for d in read_lines(f)]
    docs = docs[:args.max_docs] if args.max_docs > 0 else docs
    corpus = build_corpus(docs, min_df=args.min_df, max_df=args.max_df,
                          max_vocab=args.max_vocab, held_out=args.held_out, seed=args.seed)
    corpus.save(path)
    print(f"corpus: {corpus.num_docs:,} documents, {corpus.words.size:,} tokens, vocabulary "
          f"{len(corpus.vocab):,}, {corpus.held_out.size:,} documents held out", flush=True)
    return path


def _worker_argv(args: argparse.Namespace, corpus: str) -> list[str]:
    argv = ["--corpus", corpus]
    for name in ("topics", "alpha", "beta", "passes", "blocks", "tau", "mh_steps", "seed",
                 "table", "top_words", "eval_every"):
        argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    for name in ("model_out", "summary_json", "assignments_out"):
        if getattr(args, name):
            argv += ["--" + name.replace("_", "-"), os.path.abspath(getattr(args, name))]
    return argv


def cmd_train_lda(args: argparse.Namespace) -> int:
    from .worker import config_of

    if args.servers < 1 or args.workers < 1:
        raise ConfigError("train lda needs --servers >= 1 and --workers >= 1")
    config_of(args).check()
    with tempfile.TemporaryDirectory(prefix="pserver-lda-") as tmp:
        corpus = prepare(args, os.path.join(tmp, "corpus.npz"))
        argv = _worker_argv(args, corpus)
        if os.environ.get("PSERVER_SCHEDULER"):
            from . import worker  # join the existing cluster as one worker
            return worker.main(argv)
        from ...launch import LocalCluster

        with LocalCluster(args.servers, args.workers, insecure=args.insecure,
                          heartbeat_timeout=HEARTBEAT_TIMEOUT) as cluster:
            return cluster.run_workers([sys.executable, "-m", "pserver.apps.lda.worker", *argv])


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from .corpus import read_lines
    from .model import load_model

    model = load_model(args.model)
    for f in args.data:
        if not os.path.isfile(f):
            raise ConfigError(f"data file {f!r} does not exist")
    texts = [d for f in args.data for d in read_lines(f)]
    theta = model.infer(texts)
    if args.out:
        np.save(args.out, theta)
    top = model.top_words(5)
    for i, row in enumerate(theta):
        best = np.argsort(-row)[:args.top]
        print(f"doc {i}: " + "  ".join(f"topic {k} ({row[k]:.2f}: {' '.join(top[k][:3])})"
                                       for k in best))
    return 0
