"""Training the DeepFM CTR model: on a cluster (each worker a shard; ID tables and dense parameters
on the servers, per-row adagrad) or in one process with torch alone (the baseline: nn.Embedding with
sparse gradients and torch's Adagrad, the same model, seed, batches and learning rates).
Run a worker with `python -m pserver.apps.ctr.train --train F --test F` under `pserver launch`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..lr.model import auc
from .data import DENSE, FIELDS, CTRData, read
from .model import DeepFM, LocalTable

TABLES = ("ctr_first", "ctr_factors")  # the first-order weights and the factors of every ID


@dataclass
class CTRConfig:
    k: int = 8
    batch: int = 512
    epochs: int = 2
    lr_embedding: float = 0.05
    lr_dense: float = 0.01
    init_std: float = 0.01
    seed: int = 0


def batches(n: int, batch: int, epoch: int, seed: int):
    """Index arrays of the minibatches of one pass (a fixed shuffle per pass)."""
    order = np.random.default_rng((seed, epoch)).permutation(n)
    for i in range(0, n, batch):
        yield np.sort(order[i:i + batch])


def _tensors(d: CTRData, sel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(d.dense[sel]), torch.from_numpy(d.ids[sel]),
            torch.from_numpy(d.labels[sel]))


def predict(model: DeepFM, d: CTRData, batch: int = 4096) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(d), batch):
            dense, ids, _ = _tensors(d, slice(i, i + batch))
            out.append(torch.sigmoid(model(dense, ids)).numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def train_local(train: CTRData, test: CTRData, cfg: CTRConfig) -> dict:
    """The single-process baseline. Returns held-out AUC, logloss and examples/s."""
    torch.manual_seed(cfg.seed)
    vocab = np.unique(np.concatenate([train.ids.ravel(), test.ids.ravel()]))
    first = LocalTable(vocab, 1, cfg.init_std, cfg.seed + 1)
    factors = LocalTable(vocab, cfg.k, cfg.init_std, cfg.seed + 2)
    torch.manual_seed(cfg.seed)
    model = DeepFM(first, factors, DENSE, FIELDS, cfg.k)
    sparse = torch.optim.Adagrad([first.table.weight, factors.table.weight], lr=cfg.lr_embedding)
    dense_params = [p for n, p in model.named_parameters() if ".table." not in n]
    dense_opt = torch.optim.Adagrad(dense_params, lr=cfg.lr_dense)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0, seen = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        for sel in batches(len(train), cfg.batch, epoch, cfg.seed):
            dense, ids, y = _tensors(train, sel)
            sparse.zero_grad()
            dense_opt.zero_grad()
            loss_fn(model(dense, ids), y).backward()
            sparse.step()
            dense_opt.step()
            seen += len(sel)
    seconds = time.perf_counter() - t0
    p = predict(model, test)
    return {"test_auc": auc(test.labels * 2 - 1, p), "test_logloss": logloss(test.labels, p),
            "examples_per_s": seen / seconds, "train_seconds": seconds}


def train_worker(kv, train: CTRData, test: CTRData | None, cfg: CTRConfig,
                 export_dir: str | None = None) -> dict:
    """One worker's part: its shard (rank r of n: every n-th batch of a pass), tables on the
    servers. Returns this worker's figures; with ``test``, held-out AUC after a barrier; with
    ``export_dir`` (rank 0), the trained model for serving (see export_model)."""
    from ...torch import DenseParameters, Embedding

    first = Embedding(kv, TABLES[0], 1, init=f"normal:{cfg.init_std}", updater="adagrad",
                      updater_args={"lr": cfg.lr_embedding})
    factors = Embedding(kv, TABLES[1], cfg.k, init=f"normal:{cfg.init_std}",
                        updater="adagrad", updater_args={"lr": cfg.lr_embedding})
    torch.manual_seed(cfg.seed)       # the same starting dense weights on every worker
    model = DeepFM(first, factors, DENSE, FIELDS, cfg.k)
    shared = DenseParameters(kv, model, "ctr_dense", updater="adagrad",
                             updater_args={"lr": cfg.lr_dense})
    kv.barrier("ctr_tables")
    shared.pull()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    t0, seen = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        mine = [b for i, b in enumerate(batches(len(train), cfg.batch, epoch, cfg.seed))
                if i % kv.num_workers == kv.rank]
        if mine:
            first.prefetch(torch.from_numpy(train.ids[mine[0]]))
            factors.prefetch(torch.from_numpy(train.ids[mine[0]]))
        for i, sel in enumerate(mine):
            if i + 1 < len(mine):      # the next batch's rows travel while this one computes
                nxt = torch.from_numpy(train.ids[mine[i + 1]])
                first.prefetch(nxt)
                factors.prefetch(nxt)
            dense, ids, y = _tensors(train, sel)
            loss_fn(model(dense, ids), y).backward()   # the ID tables' gradients go out here
            shared.step()
            seen += len(sel)
    first.flush()
    factors.flush()
    seconds = time.perf_counter() - t0
    out = {"rank": kv.rank, "examples": seen, "train_seconds": seconds,
           "examples_per_s": seen / seconds,
           "rows_pulled": first.rows_pulled + factors.rows_pulled,
           "rows_pushed": first.rows_pushed + factors.rows_pushed}
    kv.barrier("ctr_trained")
    if test is not None:
        shared.pull()
        p = predict(model, test)
        out.update(test_auc=auc(test.labels * 2 - 1, p), test_logloss=logloss(test.labels, p))
    if export_dir is not None and kv.rank == 0:
        shared.pull()
        export_model(kv, model, export_dir)
        np.save(Path(export_dir) / "train_pred.npy", predict(model, train.rows(slice(0, 2000))))
    return out


def export_model(kv, model: DeepFM, out: str) -> None:
    """Write the trained model for serving without pserver: both ID tables as exports
    (pserver.apps.export: ids.npy + rows.npy) and the dense weights (dense.pt, a state dict)."""
    from ..export import export_table

    for name in TABLES:
        export_table(kv, name, Path(out) / name)
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith(("first.", "factors."))}
    torch.save(dense, Path(out) / "dense.pt")


def load_model(path: str, cfg: CTRConfig) -> DeepFM:
    """The model export_model wrote, as plain PyTorch modules (no cluster needed)."""
    from ...torch import load_exported

    model = DeepFM(load_exported(Path(path) / TABLES[0]), load_exported(Path(path) / TABLES[1]),
                   DENSE, FIELDS, cfg.k)
    model.load_state_dict(torch.load(Path(path) / "dense.pt", weights_only=True), strict=False)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    import pserver

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", required=True)
    p.add_argument("--test")
    p.add_argument("--out", help="write this worker's figures as JSON here (RANK in the name "
                                 "is replaced by the rank)")
    p.add_argument("--export", help="rank 0: write the trained model here for serving "
                                    "(load_model reads it without a cluster)")
    for name, value in asdict(CTRConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    cfg = CTRConfig(**{k: getattr(args, k) for k in asdict(CTRConfig())})
    torch.set_num_threads(1)
    train = read(args.train)
    test = read(args.test) if args.test else None
    with pserver.KVWorker() as kv:
        res = train_worker(kv, train, test if kv.rank == 0 else None, cfg, args.export)
    print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out.replace("RANK", str(res["rank"])), "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
