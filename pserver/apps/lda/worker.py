"""One worker of `pserver train lda`: join the cluster, take this worker's share of the prepared
corpus, sample, and on rank 0 report held-out perplexity per pass, the top words, the summary and
the exported model.

Run as ``python -m pserver.apps.lda.worker ARGS`` with PSERVER_* set (the launcher does that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from ...errors import PServerError
from . import kernels
from .corpus import Corpus, shard_bounds
from .model import LDAModel, perplexity, save_model, topic_word
from .trainer import LDAConfig, LDATrainer


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options of the sampler and outputs (shared by `pserver train lda` and this module)."""
    d = LDAConfig()
    p.add_argument("--topics", type=int, default=d.topics, help="number of topics K")
    p.add_argument("--alpha", type=float, default=d.alpha, help="document-topic prior")
    p.add_argument("--beta", type=float, default=d.beta, help="topic-word prior")
    p.add_argument("--passes", type=int, default=d.passes, help="sweeps over the corpus")
    p.add_argument("--blocks", type=int, default=d.blocks,
                   help="blocks per pass and worker: one pull and one push of counts each")
    p.add_argument("--tau", type=int, default=d.tau,
                   help="bounded delay: block t samples against counts read when block t-tau "
                        "began; at most tau+1 pushes of a worker unacknowledged")
    p.add_argument("--mh-steps", type=int, default=d.mh_steps,
                   help="Metropolis-Hastings cycles (word + document proposal) per token")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--table", default=d.table, help="name of the counts table")
    p.add_argument("--model-out", help="directory to export the model to")
    p.add_argument("--summary-json", help="rank 0 writes the summary and per-pass history here")
    p.add_argument("--top-words", type=int, default=10, help="top words printed per topic")
    p.add_argument("--eval-every", type=int, default=1,
                   help="held-out perplexity every N passes (0: only at the end)")
    p.add_argument("--assignments-out", metavar="DIR",
                   help="every worker writes DIR/rank<r>.npz: its tokens' words and topics")


def config_of(args: argparse.Namespace) -> LDAConfig:
    return LDAConfig(topics=args.topics, alpha=args.alpha, beta=args.beta, passes=args.passes,
                     blocks=args.blocks, tau=args.tau, mh_steps=args.mh_steps, table=args.table,
                     seed=args.seed)


def train(kv, corpus: Corpus, args: argparse.Namespace) -> dict | None:
    """Train as one worker of kv's cluster; returns the summary on rank 0, else None."""
    cfg = config_of(args)
    num_words = len(corpus.vocab)
    train_docs = corpus.training_docs()
    bounds = shard_bounds(corpus.subset(train_docs)[0], kv.num_workers)
    ptr, words = corpus.subset(train_docs[bounds[kv.rank]:bounds[kv.rank + 1]])
    trainer = LDATrainer(kv, ptr, words, num_words, cfg)
    report = kv.rank == 0
    test_ptr, test_words = corpus.subset(corpus.held_out)
    t0 = time.perf_counter()
    trainer.initialize()
    history, eval_s = [], 0.0
    for epoch in range(cfg.passes):
        s = trainer.run_pass(epoch)
        row = {"epoch": epoch, "seconds": s.seconds, "tokens_per_s_worker": s.tokens_per_s,
               "wait_seconds": s.wait_seconds, "elapsed_s": time.perf_counter() - t0 - eval_s}
        last = epoch == cfg.passes - 1
        if report and (last or (args.eval_every and (epoch + 1) % args.eval_every == 0)):
            e0 = time.perf_counter()
            phi = topic_word(trainer.pull_model()[:num_words], cfg.beta)
            row["perplexity"] = perplexity(phi, cfg.alpha, test_ptr, test_words)
            eval_s += time.perf_counter() - e0
        if report:
            ppl = f"  held-out perplexity {row['perplexity']:,.1f}" if "perplexity" in row else ""
            print(f"pass {epoch + 1:3d}  {s.tokens_per_s:,.0f} tokens/s on worker 0  idle "
                  f"{100 * s.wait_seconds / max(s.seconds, 1e-9):.0f}%{ppl}", flush=True)
        history.append(row)
    train_s = time.perf_counter() - t0 - eval_s
    if args.assignments_out:
        os.makedirs(args.assignments_out, exist_ok=True)
        np.savez(os.path.join(args.assignments_out, f"rank{kv.rank}.npz"), words=trainer.words,
                 z=trainer.z)
    summary = None
    if report:
        counts = trainer.pull_model()
        model = LDAModel(corpus.vocab, counts[:num_words], cfg.alpha, cfg.beta,
                         {"passes": cfg.passes})
        summary = {"workers": kv.num_workers, "servers": kv.num_servers,
                   "documents": int(train_docs.size), "tokens": int(corpus.words.size
                                                                    - test_words.size),
                   "held_out_documents": int(corpus.held_out.size), "vocabulary": num_words,
                   "train_seconds": train_s, "config": vars(cfg), "history": history,
                   "perplexity": history[-1].get("perplexity") if history else None,
                   "totals_match_rows": bool((counts[num_words] == counts[:num_words].sum(0)).all())}
        for k, top in enumerate(model.top_words(args.top_words)):
            print(f"topic {k:3d}: {' '.join(top)}")
        print(f"trained on {summary['tokens']:,} tokens of {summary['documents']:,} documents "
              f"with {kv.num_workers} workers x {kv.num_servers} servers: {cfg.passes} passes in "
              f"{train_s:.2f} s; held-out perplexity {summary['perplexity'] or float('nan'):,.1f}",
              flush=True)
        if args.model_out:
            save_model(args.model_out, model)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
    kv.barrier(cfg.table + "-done")
    return summary


def main(argv: list[str] | None = None) -> int:
    import pserver

    p = argparse.ArgumentParser(prog="python -m pserver.apps.lda.worker")
    p.add_argument("--corpus", required=True, help="prepared corpus (.npz, corpus.Corpus.save)")
    add_model_args(p)
    p.add_argument("--group", help="worker group to join (default: PSERVER_GROUP, else 'default')")
    args = p.parse_args(argv)
    kernels.warm_up()
    corpus = Corpus.load(args.corpus)
    kv = pserver.KVWorker(group=args.group)
    try:
        train(kv, corpus, args)
    except PServerError as e:
        print(f"worker {kv.rank}: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        kv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
