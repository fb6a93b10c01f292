"""The regularisation path's decisions without a cluster: parsing --l1, the validation split,
which value is kept and when "auto" stops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pserver.apps.lr.data import Shard
from pserver.apps.lr.path import (
    AUTO_PATIENCE,
    AUTO_POINTS,
    auto_done,
    l1_values,
    parse_l1,
    pick,
    split_validation,
)
from pserver.errors import ConfigError


@pytest.mark.parametrize("text,values", [("2", [2.0]), ("1,10,3", [10.0, 3.0, 1.0]),
                                         ("3,3,1", [3.0, 1.0]), (" auto ", None), ("0", [0.0])])
def test_parse_l1(text, values):
    assert parse_l1(text) == values


@pytest.mark.parametrize("text", ["", "x", "1,,2", "-1", "1,-2", "nan", "inf", "auto,1"])
def test_parse_l1_rejects_what_it_cannot_use(text):
    with pytest.raises(ConfigError, match="--l1"):
        parse_l1(text)


def test_only_dbpg_runs_a_path():
    assert l1_values("3", "ftrl") == [3.0] and l1_values("auto", "dbpg") is None
    for text in ("auto", "1,2"):
        with pytest.raises(ConfigError, match="needs --solver dbpg"):
            l1_values(text, "ftrl")


def test_validation_split_holds_out_the_last_rows_over_their_own_keys():
    rng = np.random.default_rng(3)
    X = sp.random(40, 30, density=0.15, format="csc", random_state=3, dtype=np.float32)
    keys = np.sort(rng.choice(1 << 40, 30, replace=False)).astype(np.uint64)
    y = np.where(rng.random(40) < 0.5, 1, -1).astype(np.int8)
    train, valid = split_validation(Shard(X=X, y=y, keys=keys), 0.25)
    assert (train.num_examples, valid.num_examples) == (30, 10)
    assert np.array_equal(valid.y, y[30:]) and np.array_equal(train.y, y[:30])
    for part, rows in ((train, slice(0, 30)), (valid, slice(30, 40))):
        dense = X.toarray()[rows]
        assert set(np.searchsorted(keys, part.keys)) == set(np.flatnonzero(dense.any(axis=0)))
        assert np.array_equal(part.X.toarray(), dense[:, np.searchsorted(keys, part.keys)])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="--validation"):
            split_validation(Shard(X=X, y=y, keys=keys), bad)


def test_pick_keeps_the_lowest_validation_loss_and_the_sparser_model_on_a_tie():
    assert pick([0.6, 0.5, 0.55]) == 1
    assert pick([0.5, 0.5, 0.7]) == 0


def test_auto_stops_after_enough_values_worse_than_the_best():
    losses = [0.7, 0.6, 0.5]
    assert not auto_done(losses)
    losses += [0.52] * (AUTO_PATIENCE - 1)
    assert not auto_done(losses)
    assert auto_done([*losses, 0.53])
    assert auto_done(list(np.linspace(1, 0.5, AUTO_POINTS)))    # still improving: the cap
