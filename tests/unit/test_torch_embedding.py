"""The PyTorch bridge without a cluster (pserver.testing.TableKV: real store tables and rules):
the rows pulled and the gradients pushed equal what autograd gives a torch.nn.EmbeddingBag with the
same weights; prefetched rows are used; training with the servers' sgd rule equals torch SGD."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pserver.errors import ConfigError  # noqa: E402
from pserver.testing import TableKV  # noqa: E402
from pserver.torch import Embedding, EmbeddingBag, ids_to_keys  # noqa: E402
from pserver.torch.embedding import MAX_PREFETCHED  # noqa: E402

DIM = 4


def _reference(kv: TableKV, table: str, ids: torch.Tensor, mode: str) -> torch.nn.EmbeddingBag:
    """A torch EmbeddingBag over the distinct IDs, holding the server rows of each."""
    uniq = torch.unique(ids)
    ref = torch.nn.EmbeddingBag(len(uniq), DIM, mode=mode)
    rows = kv.tables[table].pull(np.unique(ids_to_keys(uniq)))
    order = np.argsort(np.argsort(ids_to_keys(uniq)))       # uniq's position among sorted keys
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(rows, np.float32).reshape(-1, DIM)[order]))
    return ref, uniq


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_pushed_gradients_equal_autograd_on_a_torch_embedding_bag(mode):
    kv = TableKV()
    bag = EmbeddingBag(kv, "emb", DIM, mode=mode, updater="sgd", updater_args={"lr": 1.0},
                       init="normal:0.5")
    ids = torch.tensor([3, 2**40 + 7, 3, -5, 9, 2**40 + 7, 9, 9], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 5], dtype=torch.int64)
    target = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    ref, uniq = _reference(kv, "emb", ids, mode)
    out = bag(ids, offsets)
    want = ref(torch.searchsorted(uniq, ids), offsets)
    torch.testing.assert_close(out, want)
    ((out - target) ** 2).sum().backward()
    ((want - target) ** 2).sum().backward()
    (_, keys, grads), = kv.pushes
    assert keys.size == 4 and np.all(np.diff(keys.astype(np.float64)) > 0)   # coalesced by ID
    ref_grad = ref.weight.grad.numpy()[np.argsort(ids_to_keys(uniq))]
    np.testing.assert_allclose(grads, ref_grad, rtol=1e-6, atol=1e-6)


def test_sgd_on_the_servers_trains_like_torch_sgd():
    kv = TableKV()
    emb = Embedding(kv, "e", DIM, updater="sgd", updater_args={"lr": 0.1}, init="normal:0.3")
    ids = torch.tensor([[1, 2], [2, 5], [5, 5]], dtype=torch.int64)
    ref, uniq = _reference(kv, "e", ids.ravel(), "sum")
    w = torch.nn.Parameter(ref.weight.detach().clone())
    opt = torch.optim.SGD([w], lr=0.1)
    idx = torch.searchsorted(uniq, ids)
    for _ in range(5):
        loss = (emb(ids).sum(dim=(1, 2)) - 1.0).pow(2).mean()
        loss.backward()
        opt.zero_grad()
        (torch.nn.functional.embedding(idx, w).sum(dim=(1, 2)) - 1.0).pow(2).mean().backward()
        opt.step()
    emb.flush()
    torch.testing.assert_close(emb(ids), torch.nn.functional.embedding(idx, w).detach())


def test_prefetched_rows_are_used_and_a_different_batch_is_pulled_afresh():
    kv = TableKV()
    emb = Embedding(kv, "e", DIM)
    a, b = torch.tensor([4, 4, 8]), torch.tensor([1, 2])
    emb.prefetch(a)
    pulled = emb.rows_pulled
    out = emb(a)
    assert emb.rows_pulled == pulled + 2 and out.shape == (3, DIM)
    torch.testing.assert_close(out[0], out[1])
    emb.prefetch(a)
    assert emb(b).shape == (2, DIM)             # not the prefetched batch: pulled itself
    with torch.no_grad():
        emb(b)
    assert len(kv.pushes) == 0                  # no backward, nothing pushed


def test_a_batch_prefetched_one_ahead_uses_its_rows_when_its_turn_comes():
    """The training loop's order: the next batch's rows are asked for, then this batch runs (its
    own rows pulled). The prefetch must wait for its batch, not be dropped by the one before."""
    kv = TableKV()
    emb = Embedding(kv, "e", DIM)
    waits = []
    pull = kv.pull
    kv.pull = lambda keys, table=None, wait=True, **kw: waits.append(wait) or pull(keys, table,
                                                                                  wait, **kw)
    b0, b1, b2 = torch.tensor([1, 2]), torch.tensor([3, 4, 3]), torch.tensor([5])
    emb.prefetch(b1)
    emb(b0)
    emb.prefetch(b2)
    out = emb(b1)
    emb(b2)
    assert waits == [False, True, False]    # b0 pulled itself; b1 and b2 used their prefetches
    torch.testing.assert_close(out[0], out[2])


def test_prefetched_rows_of_batches_that_never_come_are_bounded():
    kv = TableKV()
    emb = Embedding(kv, "e", DIM)
    for i in range(3 * MAX_PREFETCHED):
        emb.prefetch(torch.tensor([i]))
    assert len(emb._prefetched) == MAX_PREFETCHED


def test_bad_ids_and_modes_raise_config_errors():
    kv = TableKV()
    with pytest.raises(ConfigError, match="int64"):
        Embedding(kv, "e", DIM)(torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="mode"):
        EmbeddingBag(kv, "b", DIM, mode="max")
