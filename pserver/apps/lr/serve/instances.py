"""Decoding a /predict request into hashed keys, without I/O: JSON -> instances -> (keys, values)
per instance, hashed by the same compiled parsers and hash functions as `pserver train lr`
(parsers.py, hashing.py). Every mistake raises BadRequest(status, message)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ....serving.http import BadRequest, check_content_type, json_object
from ..data import BIAS_KEY, FORMATS
from ..hashing import int_keys
from ..parsers import CRITEO_CAT_COLUMNS, CRITEO_INT_COLUMNS, REASONS, parse_criteo, parse_libsvm

CRITEO_COLUMNS = CRITEO_INT_COLUMNS + CRITEO_CAT_COLUMNS
_MAX_INDEX = 1 << 63
_FORBIDDEN = ("\n", "\r")          # would split one instance into two lines
_FORBIDDEN_CRITEO = ("\n", "\r", "\t")


@dataclass(frozen=True)
class Limits:
    """Request limits (``--max-instances``, ``--max-body-bytes``)."""

    max_instances: int = 1000
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class Featurizer:
    """How raw features become keys: the data options of the training job (model.json's
    data_format, raw_keys, int_bins, bias)."""

    data_format: str = "libsvm"
    raw_keys: bool = False
    int_bins: str = "log"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.data_format not in FORMATS:
            raise ValueError(f"data_format must be one of {FORMATS}, got {self.data_format!r}")
        if self.int_bins not in ("log", "raw"):
            raise ValueError(f"int_bins must be 'log' or 'raw', got {self.int_bins!r}")


@dataclass
class Batch:
    """Instances as CSR rows: row i holds keys[start_i:start_i + row_nnz[i]] with vals alike."""

    row_nnz: np.ndarray   # int64, one per instance
    keys: np.ndarray      # uint64
    vals: np.ndarray      # float64

    @property
    def size(self) -> int:
        return int(self.row_nnz.size)


def decode_predict(body: bytes, content_type: str | None, limits: Limits,
                   featurizer: Featurizer) -> Batch:
    """The instances of a /predict body as hashed rows. Raises BadRequest (413: body or instance
    count over the limits; 415: not JSON; 400: malformed JSON or an invalid instance)."""
    check_content_type(content_type)
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"body of {len(body)} bytes exceeds the limit of "
                              f"{limits.max_body_bytes} (--max-body-bytes)")
    doc = json_object(body, content_type, "instances", '{"instances": [...]}')
    instances = doc["instances"]
    if len(instances) > limits.max_instances:
        raise BadRequest(413, f"{len(instances)} instances exceed the limit of "
                              f"{limits.max_instances} per request (--max-instances)")
    lines = [_line(i, inst, featurizer.data_format) for i, inst in enumerate(instances)]
    batch = _parse(lines, featurizer)
    return with_bias(batch) if featurizer.bias else batch


def _line(i: int, inst, fmt: str) -> bytes:
    """One instance as a line of the training format (label 0), for the training parsers."""
    if not isinstance(inst, dict) or len(inst) != 1:
        raise BadRequest(400, f"instance {i}: must be an object with exactly one of "
                              f'"features" or "{fmt}"')
    (kind, value), = inst.items()
    encode = _ENCODERS.get((fmt, kind))
    if encode is None:
        raise BadRequest(400, f"instance {i}: unknown field {kind!r} for a {fmt} model: use "
                              f'"features" or "{fmt}"')
    return encode(i, value)


def _libsvm_text(i: int, text) -> bytes:
    if not isinstance(text, str) or any(c in text for c in _FORBIDDEN):
        raise BadRequest(400, f'instance {i}: "libsvm" must be one line of idx:value pairs')
    return b"0 " + text.encode("utf-8")


def _libsvm_features(i: int, features) -> bytes:
    if not isinstance(features, dict):
        raise BadRequest(400, f'instance {i}: "features" must be an object {{"id": value}}')
    parts = []
    for k, v in features.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 19 and int(k) < _MAX_INDEX):
            raise BadRequest(400, f"instance {i}: feature id {k!r} must be a non-negative "
                                  f"integer below 2**63")
        if type(v) not in (int, float):
            raise BadRequest(400, f"instance {i}: value of feature {k} must be a number")
        parts.append(f"{k}:{float(v)!r}")
    return ("0 " + " ".join(parts)).encode()


def _criteo_text(i: int, text) -> bytes:
    if not isinstance(text, str) or "\n" in text or "\r" in text:
        raise BadRequest(400, f'instance {i}: "criteo" must be one line of {CRITEO_COLUMNS} '
                              f"tab-separated fields (no label)")
    return b"0\t" + text.encode("utf-8")


def _criteo_features(i: int, features) -> bytes:
    if not isinstance(features, dict):
        raise BadRequest(400, f'instance {i}: "features" must be an object {{"column": value}}')
    fields = [""] * CRITEO_COLUMNS
    for k, v in features.items():
        col = int(k) if k.isascii() and k.isdigit() and len(k) <= 2 else 0
        if not 1 <= col <= CRITEO_COLUMNS:
            raise BadRequest(400, f"instance {i}: feature {k!r} must be a column number "
                                  f"1..{CRITEO_COLUMNS}")
        if col <= CRITEO_INT_COLUMNS and type(v) is not int:
            raise BadRequest(400, f"instance {i}: column {col} takes an integer")
        if col > CRITEO_INT_COLUMNS and (type(v) is not str or any(c in v for c in
                                                                    _FORBIDDEN_CRITEO)):
            raise BadRequest(400, f"instance {i}: column {col} takes a string without tabs or "
                                  f"newlines")
        fields[col - 1] = str(v)
    return ("0\t" + "\t".join(fields)).encode("utf-8")


_ENCODERS = {("libsvm", "libsvm"): _libsvm_text, ("libsvm", "features"): _libsvm_features,
             ("criteo", "criteo"): _criteo_text, ("criteo", "features"): _criteo_features}


def _parse(lines: list[bytes], f: Featurizer) -> Batch:
    """Hash every line with the training parser in one compiled call."""
    n = len(lines)
    buf = np.frombuffer(b"\n".join(lines) + b"\n", np.uint8)
    cap = max(CRITEO_COLUMNS * n, buf.size // 2 + 1)
    labels, row_nnz = np.empty(n), np.zeros(n, np.int64)
    keys, vals, ones = np.empty(cap, np.uint64), np.empty(cap, np.float32), np.ones(1, np.uint8)
    if f.data_format == "libsvm":
        nr, ne, _, code, line, _ = parse_libsvm(buf, f.raw_keys, False, labels, row_nnz, keys,
                                                vals, ones)
    else:
        nr, ne, _, code, line, _ = parse_criteo(buf, f.int_bins == "log", False, labels, row_nnz,
                                                keys, vals, ones)
    if code:
        raise BadRequest(400, f"instance {line}: {REASONS[code]}")
    assert nr == n, "one row per line: every line starts with a label"
    values = np.ones(ne) if ones[0] else vals[:ne].astype(np.float64)
    return Batch(row_nnz, keys[:ne].copy(), values)


def with_bias(batch: Batch) -> Batch:
    """The batch with the constant feature BIAS_KEY (value 1) appended to every row, as training
    with --bias adds it to every example."""
    n = batch.size
    ends = np.cumsum(batch.row_nnz)
    keys = np.insert(batch.keys, ends, BIAS_KEY)
    vals = np.insert(batch.vals, ends, 1.0)
    return Batch(batch.row_nnz + 1, keys, vals) if n else batch


def feature_keys(indices: list[int], raw_keys: bool = False) -> np.ndarray:
    """Keys of libsvm feature indices as training makes them (for tests and clients)."""
    idx = np.asarray(indices, dtype=np.int64)
    return idx.view(np.uint64) if raw_keys else int_keys(idx, 0)


def margins(batch: Batch, weights: np.ndarray) -> np.ndarray:
    """x_i . w per row, given weights aligned with batch.keys (float64)."""
    rows = np.repeat(np.arange(batch.size), batch.row_nnz)
    return np.bincount(rows, weights=batch.vals * weights, minlength=batch.size)
