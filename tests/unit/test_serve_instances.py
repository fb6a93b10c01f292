"""`pserver serve lr`: request decoding (every bad request's status and message) and hashing equal
to training's (the same files read by read_shard)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pserver.apps.lr.data import BIAS_KEY, read_shard
from pserver.apps.lr.serve.instances import (
    BadRequest,
    Featurizer,
    Limits,
    decode_predict,
    feature_keys,
    margins,
)

JSON = "application/json"
LIBSVM = Featurizer()
LIMITS = Limits()


def decode(doc, featurizer=LIBSVM, limits=LIMITS, content_type=JSON):
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return decode_predict(body, content_type, limits, featurizer)


def refused(doc, status, text, **kw):
    with pytest.raises(BadRequest) as e:
        decode(doc, **kw)
    assert e.value.status == status
    assert text in e.value.message
    return e.value.message


def rows(batch):
    ends = np.cumsum(batch.row_nnz)
    starts = ends - batch.row_nnz
    return [(batch.keys[s:e].tolist(), batch.vals[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/jsonx", ""])
def test_wrong_content_type_is_415(content_type):
    refused({"instances": []}, 415, "Content-Type must be application/json",
            content_type=content_type)


def test_content_type_parameters_are_accepted():
    assert decode({"instances": []}, content_type="application/json; charset=utf-8").size == 0


def test_malformed_json_is_400():
    refused(b'{"instances": [', 400, "not valid JSON")
    refused(b"\xff\xfe", 400, "not valid JSON")


@pytest.mark.parametrize("doc", [[], {"instance": []}, {"instances": {}}, {"instances": "x"}, 3])
def test_missing_instances_is_400(doc):
    refused(doc, 400, '{"instances": [...]}')


def test_oversized_body_is_413():
    refused({"instances": [{"libsvm": "1:1 " * 100}]}, 413, "--max-body-bytes",
            limits=Limits(max_body_bytes=100))


def test_too_many_instances_is_413():
    refused({"instances": [{"libsvm": ""}] * 3}, 413, "3 instances exceed the limit of 2",
            limits=Limits(max_instances=2))


@pytest.mark.parametrize("inst, text", [
    (3, "exactly one of"),
    ({}, "exactly one of"),
    ({"libsvm": "1:1", "features": {}}, "exactly one of"),
    ({"criteo": "x"}, "unknown field 'criteo' for a libsvm model"),
    ({"libsvm": 5}, '"libsvm" must be one line'),
    ({"libsvm": "1:1\n2:1"}, '"libsvm" must be one line'),
    ({"libsvm": "1:x"}, "feature value is not a number"),
    ({"libsvm": "-1:1"}, "idx:value with idx a non-negative integer"),
    ({"features": [1, 2]}, '"features" must be an object'),
    ({"features": {"a": 1}}, "feature id 'a' must be a non-negative integer"),
    ({"features": {"-3": 1}}, "feature id '-3'"),
    ({"features": {"9" * 5000: 1}}, "below 2**63"),
    ({"features": {str(1 << 63): 1}}, "below 2**63"),
    ({"features": {"3": "1"}}, "value of feature 3 must be a number"),
    ({"features": {"3": True}}, "value of feature 3 must be a number"),
    ({"features": {"3": None}}, "value of feature 3 must be a number"),
])
def test_invalid_libsvm_instance_is_400_and_names_it(inst, text):
    msg = refused({"instances": [{"libsvm": "1:1"}, inst]}, 400, text)
    assert msg.startswith("instance 1:")


@pytest.mark.parametrize("inst, text", [
    ({"libsvm": "1:1"}, "unknown field 'libsvm' for a criteo model"),
    ({"features": {"0": 1}}, "column number 1..39"),
    ({"features": {"40": "a"}}, "column number 1..39"),
    ({"features": {"2": "a"}}, "column 2 takes an integer"),
    ({"features": {"2": 1.5}}, "column 2 takes an integer"),
    ({"features": {"20": 3}}, "column 20 takes a string"),
    ({"features": {"20": "a\tb"}}, "column 20 takes a string"),
    ({"criteo": "1\t2"}, "expected 40 tab-separated fields"),
    ({"criteo": "1\n2"}, '"criteo" must be one line'),
])
def test_invalid_criteo_instance_is_400(inst, text):
    refused({"instances": [inst]}, 400, text, featurizer=Featurizer("criteo"))


def test_libsvm_hashing_equals_training(tmp_path):
    lines = ["1 3:1 17:0.5 123456789:2", "0 5:1", "1", "0 9:1 9:1"]
    path = tmp_path / "d.libsvm"
    path.write_text("\n".join(lines) + "\n")
    for raw in (False, True):
        shard = read_shard(str(path), raw_keys=raw)
        want = shard.X.toarray()
        f = Featurizer(raw_keys=raw)
        text = decode({"instances": [{"libsvm": ln.split(" ", 1)[1] if " " in ln else ""}
                                     for ln in lines]}, featurizer=f)
        feats = decode({"instances": [{"features": {"3": 1, "17": 0.5, "123456789": 2}},
                                      {"features": {"5": 1}}, {"features": {}},
                                      {"libsvm": "9:1 9:1"}]}, featurizer=f)
        for batch in (text, feats):
            got = np.zeros_like(want)
            col = {int(k): j for j, k in enumerate(shard.keys)}
            for i, (ks, vs) in enumerate(rows(batch)):
                for k, v in zip(ks, vs):
                    got[i, col[k]] += v
            np.testing.assert_array_equal(got, want)
        assert rows(feats)[0][0] == feature_keys([3, 17, 123456789], raw).tolist()


def test_criteo_hashing_equals_training(tmp_path):
    ints = ["1", "", "300", "-2"] + [""] * 9
    cats = ["68fd1e64", "", "a b"] + [""] * 23
    line = "\t".join(["1", *ints, *cats])
    path = tmp_path / "d.tsv"
    path.write_text(line + "\n")
    for bins in ("log", "raw"):
        shard = read_shard(str(path), "criteo", int_bins=bins)
        f = Featurizer("criteo", int_bins=bins)
        feats = {"1": 1, "3": 300, "4": -2, "14": "68fd1e64", "16": "a b"}
        for inst in ({"criteo": line.split("\t", 1)[1]}, {"features": feats}):
            batch = decode({"instances": [inst]}, featurizer=f)
            assert sorted(batch.keys.tolist()) == shard.keys.tolist()


def test_bias_is_appended_to_every_row():
    batch = decode({"instances": [{"libsvm": "3:1"}, {"libsvm": ""}]},
                   featurizer=Featurizer(bias=True))
    assert batch.row_nnz.tolist() == [2, 1]
    assert batch.keys[[1, 2]].tolist() == [int(BIAS_KEY)] * 2
    assert batch.vals.tolist() == [1.0, 1.0, 1.0]


def test_margins_sum_each_row():
    batch = decode({"instances": [{"libsvm": "1:2 2:1"}, {"libsvm": ""}, {"libsvm": "1:1"}]})
    w = np.array([0.5, -1.0, 0.5])   # aligned with batch.keys: 1, 2, 1
    np.testing.assert_allclose(margins(batch, w), [0.0, 0.0, 0.5])
