"""Export files without a cluster: IDs recovered from keys, the files' checks, and the plain
PyTorch module that serves them (default row for IDs the export lacks)."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.apps.export import ids_of_keys, load_exported
from pserver.errors import ConfigError
from pserver.ring import mix64

torch = pytest.importorskip("torch")


def test_ids_are_recovered_from_the_keys_they_are_stored_under():
    ids = np.concatenate([np.arange(-5, 5), [np.iinfo(np.int64).min, np.iinfo(np.int64).max]])
    keys = mix64(ids.astype(np.int64).view(np.uint64))
    assert np.array_equal(ids_of_keys(keys).view(np.int64), ids)


def test_files_that_are_not_an_export_are_refused(tmp_path):
    with pytest.raises(ConfigError):
        load_exported(tmp_path)
    np.save(tmp_path / "ids.npy", np.array([3, 1], np.uint64))
    np.save(tmp_path / "rows.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match="sorted"):
        load_exported(tmp_path)
    np.save(tmp_path / "ids.npy", np.array([1, 3, 4], np.uint64))
    with pytest.raises(ConfigError):
        load_exported(tmp_path)


def test_the_exported_module_gives_each_id_its_row_and_unknown_ids_the_default():
    from pserver.torch import ExportedEmbedding

    ids = np.array([-7, 2, 5], np.int64).view(np.uint64)
    order = np.argsort(ids)
    rows = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], np.float32)
    emb = ExportedEmbedding(ids[order], rows[order], default=np.array([9.0, 9.0]))
    out = emb(torch.tensor([[5, -7], [4, 2]]))
    assert out.shape == (2, 2, 2)
    assert out[:, :, 0].tolist() == [[3.0, 1.0], [9.0, 2.0]]
    with pytest.raises(ConfigError):
        emb(torch.tensor([1.0]))
