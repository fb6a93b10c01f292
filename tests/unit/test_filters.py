"""Tests of the filter chain (pserver.filters): round trips, order, mismatches, key-cache misses,
hostile input, counters. Pure encode/decode, no sockets."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pserver.errors import (
    ConfigError,
    DTypeError,
    FilterMismatchError,
    InvalidKeysError,
    KeyCacheMiss,
    ProtocolError,
    PServerError,
    ValueShapeError,
)
from pserver.filters import (
    FP16,
    ActiveSet,
    Counters,
    Filter,
    FilterChain,
    FilterContext,
    FixedPoint,
    KeyCaching,
    KKTFilter,
    Payload,
    RandomSkip,
    SignificantlyModified,
    codec_bench,
    key_signature,
    kkt_mask,
    parse_filters,
    register_filter,
)

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- helpers ---------------------------------------------------------------------------------
def rand_keys(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64))
    assert keys.shape[0] == n  # collisions among 2**64 are not expected at test sizes
    return keys


def rand_values(n: int, seed: int = 0, zeros: float = 0.5, dtype=np.float32, cols: int = 0):
    rng = np.random.default_rng(seed + 1)
    shape = (n, cols) if cols else (n,)
    v = rng.standard_normal(shape).astype(dtype)
    v[rng.random(n) < zeros] = 0
    return v


def ctx_pair(direction: str = "push", **kw) -> tuple[FilterContext, FilterContext]:
    """Sender and receiver contexts with their own per-peer state."""
    return (FilterContext("server-0", direction, table="w", **kw),
            FilterContext("worker-0", direction, table="w", **kw))


def wire(p: Payload) -> Payload:
    """What the receiver gets: the sent fields through JSON, arrays read-only (as from zmq)."""
    def ro(a):
        if a is None:
            return None
        b = np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)
        return b
    return Payload(ro(p.keys), ro(p.values), json.loads(json.dumps(p.meta)),
                   [ro(f) for f in p.frames])


def roundtrip(chain: FilterChain, p: Payload, s: FilterContext, r: FilterContext) -> Payload:
    return chain.decode(wire(chain.encode(p, s)), r)


def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Bitwise equality (dtype, shape and bytes), so -0.0 vs 0.0 and NaN payloads count."""
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- chain, order, mismatch ------------------------------------------------------------------
def test_empty_chain_round_trip_and_meta():
    chain = parse_filters("")
    s, r = ctx_pair()
    k, v = rand_keys(100), rand_values(100)
    e = chain.encode(Payload(k, v, {"op": "x"}), s)
    assert e.meta == {"op": "x", "filters": []}
    d = chain.decode(wire(e), r)
    assert same(d.keys, k) and same(d.values, v) and d.meta == {"op": "x"}


class _Recorder(Filter):
    """Adds its name to meta["trace"] on encode and checks it is the last one on decode."""

    stage = 0

    def __init__(self, kind: str, stage: int = 0) -> None:
        self.kind, self.name, self.stage = kind, kind, stage

    def encode(self, p, ctx):
        trace = [*p.meta.get("trace", []), self.name]
        return Payload(p.keys, p.values, {**p.meta, "trace": trace, self.kind: {}}, p.frames)

    def decode(self, p, ctx):
        trace = list(p.meta["trace"])
        assert trace[-1] == self.name, "decode must run in reverse order"
        meta = {k: v for k, v in p.meta.items() if k not in ("trace", self.kind)}
        if trace[:-1]:
            meta["trace"] = trace[:-1]
        return Payload(p.keys, p.values, meta, p.frames)


def test_chain_applies_in_order_and_decodes_in_reverse():
    chain = FilterChain([_Recorder("a"), _Recorder("b"), _Recorder("c", stage=1)])
    s, r = ctx_pair()
    e = chain.encode(Payload(rand_keys(10), rand_values(10)), s)
    assert e.meta["trace"] == ["a", "b", "c"]
    assert e.meta["filters"] == ["a", "b", "c"]
    d = chain.decode(wire(e), r)
    assert d.meta == {}


def test_chain_rejects_bad_stage_order_and_duplicates():
    with pytest.raises(ConfigError, match="fp16,key_cache:64M,compress:zstd:1"):
        parse_filters("key_cache,compress:zstd,fp16")
    with pytest.raises(ConfigError, match="twice"):
        parse_filters("fp16,fp16")
    with pytest.raises(ConfigError):
        FilterChain(["fp16"])  # type: ignore[list-item]


def test_encode_does_not_modify_input():
    chain = parse_filters("significant:abs:0.5,fixed:2:-4:4,key_cache,compress")
    s, _ = ctx_pair()
    k, v = rand_keys(300), rand_values(300)
    meta = {"op": "push"}
    p = Payload(k, v, meta)
    k0, v0, meta0 = k.copy(), v.copy(), copy.deepcopy(meta)
    chain.encode(p, s)
    assert same(p.keys, k0) and same(p.values, v0) and p.meta == meta0 and p.frames == []


@pytest.mark.parametrize("sender,receiver", [
    ("fp16,compress", "compress"),
    ("compress:lz4", "compress:zstd"),
    ("fixed:3:-1:1", "fixed:3:-2:2"),
    ("key_cache:1M", "key_cache:2M"),
    ("", "fp16"),
])
def test_mismatched_chains_fail_loudly(sender, receiver):
    s, r = ctx_pair()
    e = parse_filters(sender).encode(Payload(rand_keys(50), rand_values(50)), s)
    with pytest.raises(FilterMismatchError, match="same filter setting") as info:
        parse_filters(receiver).decode(wire(e), r)
    assert isinstance(info.value, ProtocolError)


def test_decode_rejects_missing_filter_list_and_leftover_frames():
    s, r = ctx_pair()
    e = parse_filters("fp16").encode(Payload(rand_keys(5), rand_values(5)), s)
    del e.meta["filters"]
    with pytest.raises(FilterMismatchError):
        parse_filters("fp16").decode(wire(e), r)
    e = parse_filters("").encode(Payload(rand_keys(5), rand_values(5)), s)
    e.frames.append(np.zeros(3, np.uint8))
    with pytest.raises(ProtocolError, match="left over"):
        parse_filters("").decode(wire(e), r)


def test_encode_validates_the_callers_payload():
    chain = parse_filters("compress")
    s, _ = ctx_pair()
    k = rand_keys(10)
    with pytest.raises(InvalidKeysError, match="sorted"):
        chain.encode(Payload(k[::-1].copy(), rand_values(10)), s)
    with pytest.raises(DTypeError):
        chain.encode(Payload(k.astype(np.int64), rand_values(10)), s)
    with pytest.raises(ValueShapeError):
        chain.encode(Payload(k, rand_values(9)), s)
    with pytest.raises(DTypeError):
        chain.encode(Payload(k, np.array(["a"] * 10)), s)
    with pytest.raises(ConfigError, match="reserved"):
        chain.encode(Payload(k, rand_values(10), {"filters": 1}), s)
    with pytest.raises(ConfigError, match="push"):
        FilterContext("p", "sideways")


# -- specs and the registry ------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "gzip", "compress:gzip", "compress:zstd:99", "compress:zstd:x", "compress:lz4:3",
    "fixed:5:-1:1", "fixed:3:1:-1", "fixed:3:a:1", "fixed:3", "fixed:3:-1:inf",
    "random_skip:0", "random_skip:1.5", "random_skip:abc", "random_skip",
    "significant:foo:1", "significant:abs:-1", "significant:abs", "key_cache:12x",
    "key_cache:0", "fp16:1", "kkt", "kkt:-1", "kkt:1:x", "fp16,,compress",
])
def test_bad_specs_raise_config_error(spec):
    with pytest.raises(ConfigError):
        parse_filters(spec)


def test_spec_names_are_canonical():
    chain = parse_filters(" kkt:1.0:0.1 , fixed:3:-1.0:1, key_cache:64M,compress:zstd ")
    assert chain.names == ["kkt:1:0.1", "fixed:3:-1:1", "key_cache:64M", "compress:zstd:1"]
    assert parse_filters(["compress:lz4"]).names == ["compress:lz4"]
    assert parse_filters([FP16(), "compress"]).names == ["fp16", "compress:zstd:1"]
    assert parse_filters(None).names == []


class _Negate(Filter):
    """A user filter: sends -v (and checks its header field on the way back)."""

    kind = "negate"
    stage = 1

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.name = f"negate:{tag}"

    def encode(self, p, ctx):
        return Payload(p.keys, -p.values, {**p.meta, self.kind: {"tag": self.tag}}, p.frames)

    def decode(self, p, ctx):
        if p.meta.get(self.kind) != {"tag": self.tag}:
            raise ProtocolError("negate: bad header")
        meta = {k: v for k, v in p.meta.items() if k != self.kind}
        return Payload(p.keys, -p.values, meta, p.frames)


def test_user_filter_registration():
    register_filter("negate", lambda args: _Negate(*args), replace=True)
    with pytest.raises(ConfigError, match="already registered"):
        register_filter("negate", lambda args: _Negate(*args))
    with pytest.raises(ConfigError):
        register_filter("bad kind", lambda args: _Negate("x"))
    chain = parse_filters("negate:x,compress")
    s, r = ctx_pair()
    k, v = rand_keys(64), rand_values(64)
    e = chain.encode(Payload(k, v), s)
    assert e.meta["negate"] == {"tag": "x"}
    d = chain.decode(wire(e), r)
    assert same(d.keys, k) and same(d.values, v)


# -- key caching -----------------------------------------------------------------------------
def test_key_cache_sends_signature_once_cached():
    chain = parse_filters("key_cache")
    s, r = ctx_pair()
    k, v = rand_keys(1000), rand_values(1000, zeros=0)
    e1 = chain.encode(Payload(k, v), s)
    assert e1.meta["key_cache"]["mode"] == "store" and same(e1.keys, k)
    assert same(chain.decode(wire(e1), r).keys, k)
    e2 = chain.encode(Payload(k, v * 2), s)
    assert e2.keys is None and e2.meta["key_cache"] == {"mode": "sig", "n": 1000,
                                                         "sig": key_signature(k)}
    d2 = chain.decode(wire(e2), r)
    assert same(d2.keys, k) and same(d2.values, v * 2)
    assert not d2.keys.flags.writeable  # cached lists cannot be changed under the cache
    # key_cache nearly halves the traffic of 8-byte keys with 8-byte values
    assert e2.nbytes() < 0.55 * Payload(k, v.astype(np.float64)).nbytes()
    assert r.counters.event("key_cache.hit") == 1


def test_key_cache_short_lists_and_keyless_payloads_pass_plainly():
    chain = parse_filters("key_cache")
    s, r = ctx_pair()
    k = rand_keys(5)
    for _ in range(2):
        e = chain.encode(Payload(k, rand_values(5)), s)
        assert e.meta["key_cache"]["mode"] == "plain" and same(e.keys, k)
        assert same(chain.decode(wire(e), r).keys, k)
    e = chain.encode(Payload(None, rand_values(5)), s)
    assert e.meta["key_cache"] == {"mode": "none"}
    assert chain.decode(wire(e), r).keys is None


def test_key_cache_evicts_least_recently_used_on_both_sides():
    # room for two lists of 100 keys (800 bytes + 64 overhead each), not three
    kc = KeyCaching(capacity_bytes=2 * 864 + 100)
    chain = FilterChain([kc])
    s, r = ctx_pair()
    a, b, c = rand_keys(100, 1), rand_keys(100, 2), rand_keys(100, 3)
    modes = []
    for keys in (a, b, a, c, b, a):  # c evicts b (a was used more recently), then b evicts a...
        e = chain.encode(Payload(keys, rand_values(100)), s)
        modes.append(e.meta["key_cache"]["mode"])
        d = chain.decode(wire(e), r)
        assert same(d.keys, keys)
    assert modes == ["store", "store", "sig", "store", "store", "store"]
    assert r.counters.event("key_cache.miss") == 0  # the mirror tracked the receiver exactly


def test_key_cache_miss_after_receiver_restart_then_resend():
    chain = parse_filters("significant:abs:0.5,fp16,key_cache,compress")
    s, r = ctx_pair()
    k = rand_keys(500)
    v = rand_values(500, zeros=0)
    v[np.abs(v) <= 0.5] = 1e-6  # held back both times, so both messages carry the same keys
    chain.decode(wire(chain.encode(Payload(k, v), s)), r)
    e = chain.encode(Payload(k, v), s)
    assert e.meta["key_cache"]["mode"] == "sig"
    held_after = s.state[("significant", "push", "w")]
    restarted = FilterContext("worker-0", "push", table="w")  # empty cache
    with pytest.raises(KeyCacheMiss) as info:
        chain.decode(wire(e), restarted)
    assert info.value.signature == key_signature(e.local["chain.inputs"][2].keys)
    again = chain.resend_with_keys(e, s)
    assert again.meta["key_cache"]["mode"] == "store"
    # the SELECT stage did not run again: same residuals, same values sent
    assert s.state[("significant", "push", "w")] is held_after
    d1 = chain.decode(wire(again), restarted)
    assert same(d1.values, chain.decode(wire(e), r).values)
    # and the next message uses the signature again
    e3 = chain.encode(Payload(k, v), s)
    assert e3.meta["key_cache"]["mode"] == "sig"
    chain.decode(wire(e3), restarted)


def test_key_cache_wrong_or_forged_signature_is_a_miss():
    chain = parse_filters("key_cache")
    s, r = ctx_pair()
    k = rand_keys(100)
    chain.decode(wire(chain.encode(Payload(k, rand_values(100)), s)), r)
    e = chain.encode(Payload(k, rand_values(100)), s)
    good = e.meta["key_cache"]["sig"]
    flipped = format(int(good, 16) ^ 1, "032x")
    for sig, n in ((flipped, 100), ("0" * 32, 100), (good, 99)):
        bad = wire(e)
        bad.meta["key_cache"]["sig"] = sig
        bad.meta["key_cache"]["n"] = n
        if n != 100:
            bad.values = bad.values[:n]
        with pytest.raises(KeyCacheMiss):
            chain.decode(bad, r)
    for sig in ("XYZ", 5, "G" * 32):
        bad = wire(e)
        bad.meta["key_cache"]["sig"] = sig
        with pytest.raises(ProtocolError):
            chain.decode(bad, r)
    assert same(chain.decode(wire(e), r).keys, k)  # the genuine one still hits


def test_key_cache_rejects_inconsistent_messages():
    chain = parse_filters("key_cache")
    s, r = ctx_pair()
    k = rand_keys(100)
    e = chain.encode(Payload(k, rand_values(100)), s)
    for mutate in (lambda p: setattr(p, "keys", None),
                   lambda p: p.meta["key_cache"].update(n=101),
                   lambda p: p.meta["key_cache"].update(mode="zip"),
                   lambda p: p.meta.pop("key_cache"),
                   lambda p: setattr(p, "keys", p.keys[::-1].copy())):
        bad = wire(e)
        mutate(bad)
        with pytest.raises(ProtocolError):
            chain.decode(bad, r)


# -- compression -----------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["compress:lz4", "compress:zstd", "compress:zstd:5"])
@pytest.mark.parametrize("zeros,cols,dtype", [
    (0.5, 0, np.float32), (0.0, 0, np.float64), (1.0, 0, np.float32), (0.99, 0, np.float32),
    (0.5, 4, np.float32), (0.9, 3, np.float64), (0.5, 0, np.float16),
])
def test_compress_round_trip_is_exact(codec, zeros, cols, dtype):
    chain = parse_filters(codec)
    s, r = ctx_pair()
    n = 5000
    k, v = rand_keys(n), rand_values(n, zeros=zeros, dtype=dtype, cols=cols)
    e = chain.encode(Payload(k, v), s)
    assert e.keys is None and e.values is None
    d = chain.decode(wire(e), r)
    assert same(d.keys, k) and same(d.values, v)
    pos = e.meta["compress"]["vals"]["pos"]
    # positions: none when all rows are non-zero, else the form smaller once compressed
    assert pos == {0.0: "all", 1.0: "index", 0.99: "index"}.get(zeros, pos)
    assert pos in ("all", "bitmap", "index")


def test_compress_keeps_negative_zero_and_nan_bits():
    chain = parse_filters("compress")
    s, r = ctx_pair()
    v = np.array([0.0, -0.0, np.nan, 0.0, np.inf, 0.0, 0.0, 1.0] * 20, dtype=np.float32)
    k = rand_keys(v.shape[0])
    d = roundtrip(chain, Payload(k, v), s, r)
    assert same(d.values, v)


@pytest.mark.parametrize("vals,form", [
    ([1.0, 2.0, 0.0, 5.0, 255.0], "|u1"),          # counts: one byte each
    ([-3.0, 0.0, 127.0, -128.0], "|i1"),
    ([1.0, 300.0, 65535.0], "<u2"),
    ([-1.0, 40000.0], None),                       # no integer form holds both
    ([1.0, 2.5], None),                            # a fraction
    ([1.0, -0.0, 2.0], None),                      # -0.0 would come back as +0.0
    ([1.0, np.nan], None),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_compress_sends_small_integer_floats_as_integers_exactly(vals, form, dtype):
    chain = parse_filters("compress")
    s, r = ctx_pair()
    with np.errstate(over="ignore"):               # 65535 is inf in float16: stays float
        v = np.tile(np.array(vals, dtype=dtype), 40)
    v = v.reshape(-1, 2) if len(vals) % 2 == 0 else v
    k = rand_keys(v.shape[0])
    e = chain.encode(Payload(k, v), s)
    if np.dtype(form or "f8").itemsize >= np.dtype(dtype).itemsize:
        form = None                                # never wider than the floats themselves
    assert e.meta["compress"]["vals"].get("int") == form
    d = chain.decode(wire(e), r)
    assert d.values.dtype == v.dtype and same(d.values, v)   # bitwise


def test_compress_rejects_a_bad_integer_form():
    chain = parse_filters("compress")
    s, r = ctx_pair()
    v = np.tile(np.array([1.0, 2.0, 3.0], np.float32), 50)
    e = chain.encode(Payload(rand_keys(v.shape[0]), v), s)
    assert e.meta["compress"]["vals"]["int"] == "|u1"
    for bad in ("<u4", "<f2", 7, "<i2x"):
        forged = wire(e)
        forged.meta["compress"]["vals"]["int"] = bad
        with pytest.raises(ProtocolError):
            chain.decode(forged, r)
    forged = wire(e)   # values that claim to be integers already
    forged.meta["compress"]["vals"]["dtype"] = "<u4"
    with pytest.raises(ProtocolError):
        chain.decode(forged, r)


def test_compress_picks_the_smaller_position_form():
    chain = parse_filters("compress:zstd")
    s, r = ctx_pair()
    rng = np.random.default_rng(5)
    n = 200_000
    v = np.zeros(n, np.float32)
    v[rng.choice(n, n // 20, replace=False)] = 1.5     # 5% non-zero: gaps compress best
    e = chain.encode(Payload(rand_keys(n), v), s)
    sec = e.meta["compress"]
    assert sec["vals"]["pos"] == "index"
    bitmap = chain.filters[0]._pack(np.packbits(v != 0))[0].nbytes
    assert e.frames[1].nbytes < bitmap
    assert same(chain.decode(wire(e), r).values, v)


def test_compress_skips_frames_that_do_not_pay_and_compresses_those_that_do():
    chain = parse_filters("compress:zstd")
    s, r = ctx_pair()
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 2**32, size=4096, dtype=np.uint32).view(np.float32)
    noise = np.where(noise == 0, np.float32(1), noise)  # no zero rows
    k = np.arange(4096, dtype=np.uint64) * 7  # perfectly regular keys
    e = chain.encode(Payload(k, noise), s)
    (kraw, kcoded, _), (vraw, vcoded, _) = e.meta["compress"]["f"]
    assert kcoded == 1 and e.frames[0].nbytes < kraw / 20
    assert vcoded == 0 and e.frames[1].nbytes == vraw
    assert same(chain.decode(wire(e), r).values, noise)


def test_compress_payload_without_values_or_keys():
    chain = parse_filters("compress:lz4")
    s, r = ctx_pair()
    k = rand_keys(1000)
    d = roundtrip(chain, Payload(k, None), s, r)  # a pull request
    assert same(d.keys, k) and d.values is None
    v = rand_values(10, cols=2)
    d = roundtrip(chain, Payload(None, v), s, r)
    assert d.keys is None and same(d.values, v)
    d = roundtrip(chain, Payload(np.empty(0, np.uint64), np.empty(0, np.float32)), s, r)
    assert d.keys.shape == (0,) and d.values.shape == (0,)


def _compressed(codec: str = "compress:zstd", n: int = 2000, zeros: float = 0.5):
    chain = parse_filters(codec)
    s, r = ctx_pair()
    e = chain.encode(Payload(rand_keys(n), rand_values(n, zeros=zeros)), s)
    return chain, wire(e), r


@pytest.mark.parametrize("codec", ["compress:lz4", "compress:zstd"])
def test_compress_rejects_corrupt_and_truncated_frames(codec):
    chain, e, r = _compressed(codec)
    assert e.meta["compress"]["f"][0][1] == 1  # the keys frame is compressed
    for cut in (e.frames[0][: len(e.frames[0]) // 2], e.frames[0][:0],
                np.frombuffer(bytes(len(e.frames[0])), np.uint8),
                np.concatenate([e.frames[0], np.zeros(7, np.uint8)])):
        bad = wire(e)
        bad.frames[0] = cut
        with pytest.raises(ProtocolError):
            chain.decode(bad, r)


def test_compress_rejects_lying_sizes_before_allocating():
    chain, e, r = _compressed()
    # declared size larger than the frame's real content
    bad = wire(e)
    bad.meta["compress"]["f"][0][0] += 8
    with pytest.raises(ProtocolError):
        chain.decode(bad, r)
    # n inflated consistently everywhere, beyond the receiver's limit: rejected from the header
    bad = wire(e)
    sec = bad.meta["compress"]
    sec["n"] = 1 << 40
    with pytest.raises(ProtocolError, match=r"integer in|limit"):
        chain.decode(bad, r)
    small = FilterContext("worker-0", "push", max_bytes=10_000)
    with pytest.raises(ProtocolError, match="limit"):
        chain.decode(wire(e), small)


def test_compress_rejects_a_zstd_bomb_without_decompressing_it(monkeypatch):
    chain, e, r = _compressed("compress:zstd", zeros=0.0)
    assert e.meta["compress"]["f"][0][1] == 1
    bomb = zstandard.ZstdCompressor().compress(bytes(200 << 20))  # declares 200 MiB of zeros
    bad = wire(e)
    bad.frames[0] = np.frombuffer(bomb, np.uint8)
    called = []
    orig = zstandard.ZstdDecompressor.decompress
    monkeypatch.setattr(zstandard.ZstdDecompressor, "decompress",
                        lambda self, *a, **k: called.append(1) or orig(self, *a, **k))
    with pytest.raises(ProtocolError, match="zstd frame size"):
        chain.decode(bad, r)
    assert not called


def test_compress_rejects_inconsistent_headers():
    chain, e, r = _compressed()
    mutations = [
        lambda m: m.update(codec="gzip"),
        lambda m: m.update(n=-1),
        lambda m: m.update(n=True),
        lambda m: m.update(keys="yes"),
        lambda m: m["vals"].update(dtype="|O"),
        lambda m: m["vals"].update(dtype="<f8"),
        lambda m: m["vals"].update(nnz=m["n"] + 1),
        lambda m: m["vals"].update(pos="all"),
        lambda m: m["vals"].update(pos="index"),
        lambda m: m["vals"].update(cols=0),
        lambda m: m["vals"].update(cols=3),
        lambda m: m.update(f=m["f"][:-1]),
        lambda m: m["f"][1].__setitem__(2, 3),
        lambda m: m.update(vals="x"),
    ]
    for mutate in mutations:
        bad = wire(e)
        mutate(bad.meta["compress"])
        with pytest.raises(ProtocolError):
            chain.decode(bad, r)
    bad = wire(e)
    bad.frames = bad.frames[1:]
    with pytest.raises(ProtocolError):
        chain.decode(bad, r)
    bad = wire(e)
    bad.keys = np.arange(3, dtype=np.uint64)
    with pytest.raises(ProtocolError):
        chain.decode(bad, r)


def test_compress_rejects_bad_positions():
    chain = parse_filters("compress")
    s, r = ctx_pair()
    v = np.zeros(1001, np.float32)
    v[[3, 500, 999]] = 1  # sparse: index list
    e = wire(chain.encode(Payload(rand_keys(1001), v), s))
    assert e.meta["compress"]["vals"]["pos"] == "index"
    bad = wire(e)
    bad.frames[1] = np.array([3, 0, 0, 0, 0, 0, 0, 0, 0xF0, 0xFF, 0xFF, 0xFF], np.uint8)
    with pytest.raises(ProtocolError):  # second position 3 + 0 is not increasing
        chain.decode(bad, r)
    bad.frames[1] = np.array([3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1], np.uint8)
    with pytest.raises(ProtocolError):  # third position beyond n
        chain.decode(bad, r)
    v = rand_values(1001)  # half zeros: bitmap, 1001 rows leave 7 padding bits
    e = wire(chain.encode(Payload(rand_keys(1001), v), s))
    assert e.meta["compress"]["vals"]["pos"] == "bitmap"
    assert e.meta["compress"]["f"][1][1] == 0  # a random bitmap does not compress
    bad = wire(e)
    bits = bad.frames[1].copy()
    bits[-1] |= 1  # a padding bit
    bad.frames[1] = bits
    with pytest.raises(ProtocolError, match=r"past the last row|population"):
        chain.decode(bad, r)


def test_codec_measurement_on_typical_payloads():
    """Ratios of the codec benchmark at 1/10 of its size (speeds are reported, not asserted)."""
    res = codec_bench.run(n=100_000, repeat=1)["results"]
    for payload in res.values():
        for m in payload.values():
            assert m["exact"]
    for codec in ("lz4", "zstd:1"):
        assert res["keys_sorted_u64"][codec]["ratio"] > 1.2  # delta + shuffle work
        assert res["values_f32_half_zero"][codec]["ratio"] > 1.9  # zeros dropped
        assert res["values_f32_90pct_zero"][codec]["ratio"] > 6
    assert res["keys_sorted_u64"]["zstd:1"]["ratio"] > res["keys_sorted_u64"]["lz4"]["ratio"]


# -- precision -------------------------------------------------------------------------------
def test_fp16_error_bound_clipping_and_nan():
    chain = parse_filters("fp16")
    s, r = ctx_pair()
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(10_000) * 100).astype(np.float32)
    v[:3] = [1e6, -np.inf, np.nan]
    d = roundtrip(chain, Payload(rand_keys(10_000), v), s, r)
    assert d.values.dtype == np.float32
    assert d.values[0] == 65504 and d.values[1] == -65504 and np.isnan(d.values[2])
    normal = np.abs(v[3:]) >= 6.2e-5
    rel = np.abs(d.values[3:] - v[3:])[normal] / np.abs(v[3:][normal])
    assert rel.max() <= 2**-11
    assert s.counters.event("fp16.clipped") == 2


def test_bf16_round_to_nearest_even_and_error_bound():
    chain = parse_filters("bf16")
    s, r = ctx_pair()
    one = np.float32(1.0)
    ulp = np.float32(2**-7)
    ties = np.array([one + ulp / 2, one + ulp * 1.5, one + ulp * 0.51, -(one + ulp / 2), 3.4e38,
                     np.nan], dtype=np.float32)
    d = roundtrip(chain, Payload(rand_keys(6), ties), s, r).values
    assert d[0] == one and d[1] == one + 2 * ulp and d[2] == one + ulp and d[3] == -one
    assert np.isfinite(d[4]) and np.isnan(d[5])
    rng = np.random.default_rng(1)
    v = rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)
    d = roundtrip(chain, Payload(rand_keys(10_000), v), s, r).values
    assert d.dtype == np.float64
    assert (np.abs(d - v) / np.abs(v)).max() <= 2**-8


@pytest.mark.parametrize("nbytes,lo,hi", [(3, -1, 1), (1, -1, 1), (2, 0, 10), (4, -3, 0.5),
                                          (2, 1, 2)])
def test_fixed_point_error_within_one_step(nbytes, lo, hi):
    f = FixedPoint(nbytes, lo, hi, seed=1)
    chain = FilterChain([f])
    s, r = ctx_pair()
    rng = np.random.default_rng(2)
    v = rng.uniform(lo, hi, size=(2000, 3)).astype(np.float64)
    v[0] = [lo, hi, lo]
    d = roundtrip(chain, Payload(rand_keys(2000), v), s, r)
    assert d.values.shape == v.shape and d.values.dtype == v.dtype
    assert np.abs(d.values - v).max() < f.step * (1 + 1e-9)
    if lo <= 0 <= hi:
        z = roundtrip(chain, Payload(rand_keys(5), np.zeros(5)), s, r)
        assert np.all(z.values == 0)  # zero is on the grid: stays exactly zero


def test_fixed_point_reference_setting_and_clipping():
    chain = parse_filters("fixed:3:-1:1")
    f = chain.filters[0]
    assert f.step == pytest.approx(2 / (2**24 - 3))
    s, r = ctx_pair()
    v = np.array([0.5, -2.0, 3.0, np.nan, 0.25], dtype=np.float32)
    e = chain.encode(Payload(rand_keys(5), v), s)
    assert e.values.dtype == np.uint8 and e.values.shape == (5, 3)  # 3 bytes per value
    assert e.meta["fixed"]["clipped"] == 3 and s.counters.event("fixed.clipped") == 3
    d = chain.decode(wire(e), r).values
    assert abs(d[1] + 1) <= f.step and abs(d[2] - 1) <= f.step and d[3] == 0
    assert abs(d[0] - 0.5) <= f.step and d.dtype == np.float32


def test_fixed_point_stochastic_rounding_is_unbiased():
    f = FixedPoint(1, -1, 1, seed=7)  # coarse grid (step 0.0079) makes bias visible if any
    chain = FilterChain([f])
    s, r = ctx_pair()
    x = np.array([0.3, -0.777, 0.001, 0.9999], dtype=np.float64)
    trials = 20_000
    v = np.tile(x, trials)
    d = roundtrip(chain, Payload(np.arange(v.shape[0], dtype=np.uint64), v), s, r).values
    err = (d - v).reshape(trials, x.shape[0])
    mean = err.mean(axis=0)
    # std of one error <= step/2, so the mean's std <= step / (2 sqrt(trials)); allow 5 sigma
    assert np.all(np.abs(mean) < 5 * f.step / (2 * np.sqrt(trials)))
    assert np.abs(err).max() < f.step
    # deterministic rounding would show a bias of up to step/2 here
    assert np.abs(mean).max() < f.step / 20


def test_precision_decode_rejects_bad_input():
    chain = parse_filters("fixed:2:-1:1")
    s, r = ctx_pair()
    e = chain.encode(Payload(rand_keys(10), rand_values(10)), s)
    for mutate in (lambda p: setattr(p, "values", p.values[:, :1].copy()),
                   lambda p: setattr(p, "values", p.values.view(np.int8)),
                   lambda p: p.meta["fixed"].update(dtype="<i4"),
                   lambda p: p.meta["fixed"].update(cols=2),
                   lambda p: setattr(p, "values", None)):
        bad = wire(e)
        mutate(bad)
        with pytest.raises(ProtocolError):
            chain.decode(bad, r)
    with pytest.raises(DTypeError):
        chain.encode(Payload(rand_keys(3), np.arange(3, dtype=np.int32)), s)
    bf = parse_filters("bf16")
    e = bf.encode(Payload(rand_keys(4), rand_values(4)), s)
    bad = wire(e)
    bad.values = bad.values.astype(np.float16)
    with pytest.raises(ProtocolError):
        bf.decode(bad, r)


def test_fixed_point_rejects_codes_outside_its_range():
    f = FixedPoint(1, 0.5, 1.0)  # anchor 0.5: codes 0..253 are valid, 254..255 are not
    chain = FilterChain([f])
    s, r = ctx_pair()
    e = wire(chain.encode(Payload(rand_keys(3), np.array([0.5, 0.7, 1.0])), s))
    assert (f.kmin, f.kmax) == (0, 253)
    e.values = np.array([[0], [100], [254]], dtype=np.uint8)
    with pytest.raises(ProtocolError, match="outside"):
        chain.decode(e, r)


# -- significantly modified ------------------------------------------------------------------
def _scatter_sum(total: dict, p: Payload) -> None:
    for k, v in zip(p.keys.tolist(), p.values.tolist(), strict=True):
        total[k] = total.get(k, 0.0) + v


def test_significant_delays_but_never_loses():
    chain = parse_filters("significant:abs:1.5,compress")
    s, r = ctx_pair()
    rng = np.random.default_rng(0)
    universe = np.arange(200, dtype=np.uint64) * 11
    pushed: dict = {}
    received: dict = {}
    sent_pairs = 0
    for _ in range(30):
        keys = np.sort(rng.choice(universe, size=80, replace=False))
        vals = rng.integers(-2, 3, size=80).astype(np.float64) * 0.5  # exact in binary
        _scatter_sum(pushed, Payload(keys, vals))
        d = chain.decode(wire(chain.encode(Payload(keys, vals), s)), r)
        assert np.all(np.abs(d.values) > 1.5)  # only significant entries travel
        sent_pairs += d.keys.shape[0]
        _scatter_sum(received, d)
    sig = chain.filters[0]
    assert sig.pending(s) > 0
    assert sent_pairs < 30 * 80  # something was held back
    d = chain.decode(wire(chain.flush(s)), r)
    _scatter_sum(received, d)
    assert sig.pending(s) == 0 and chain.flush(s) is None
    keys = sorted(set(pushed) | set(received))
    assert [received.get(k, 0.0) for k in keys] == [pushed.get(k, 0.0) for k in keys]


def test_significant_accumulates_until_threshold():
    f = SignificantlyModified("abs", 1.0)
    s = FilterContext("p", "push", table="t")
    k = np.array([1, 2, 3], dtype=np.uint64)
    out = f.encode(Payload(k, np.array([0.6, 2.0, -0.6])), s)
    assert out.keys.tolist() == [2] and out.values.tolist() == [2.0]
    out = f.encode(Payload(k[[0, 2]], np.array([0.6, 0.5])), s)
    assert out.keys.tolist() == [1] and out.values.tolist() == [pytest.approx(1.2)]
    assert f.pending(s) == 1  # key 3 holds -0.1
    other_table = FilterContext("p", "push", table="u", state=s.state)
    assert f.pending(other_table) == 0
    rest = f.flush(s)
    assert rest.keys.tolist() == [3] and rest.values.tolist() == [pytest.approx(-0.1)]


def test_significant_relative_uses_weights_and_2d_rows():
    f = SignificantlyModified("rel", 0.1)
    k = np.array([1, 2, 3], dtype=np.uint64)
    w = {1: 10.0, 2: 0.0, 3: -1.0}
    s = FilterContext("p", "push", weights=lambda keys: np.array([w[int(x)] for x in keys]))
    v = np.array([[0.5, 0.0], [0.0, 1e-9], [0.0, -0.2]])
    out = f.encode(Payload(k, v), s)
    assert out.keys.tolist() == [2, 3]  # 0.5 < 0.1*10; any change of a zero weight counts
    with pytest.raises(ConfigError, match="weights"):
        f.encode(Payload(k, v), FilterContext("p", "push"))
    with pytest.raises(ValueShapeError):
        f.encode(Payload(k, v[:, :1]), s)


def test_significant_residuals_are_bounded():
    f = SignificantlyModified("abs", 100.0, max_keys=50)
    s = FilterContext("p", "push")
    rng = np.random.default_rng(0)
    total_out = 0.0
    total_in = 0.0
    for _ in range(5):
        k = np.sort(rng.choice(10_000, size=40, replace=False)).astype(np.uint64)
        v = rng.uniform(0.1, 1.0, size=40)
        total_in += v.sum()
        out = f.encode(Payload(k, v), s)
        total_out += out.values.sum()
        assert f.pending(s) <= 50
        assert np.all(np.diff(out.keys.astype(np.float64)) > 0)
    assert s.counters.event("significant.sent_early") > 0
    total_out += f.flush(s).values.sum()
    assert total_out == pytest.approx(total_in)


# -- random skip -----------------------------------------------------------------------------
def test_random_skip_is_unbiased_with_the_documented_variance():
    p = 0.25
    f = RandomSkip(p, seed=3)
    s = FilterContext("p", "push")
    n, trials = 50, 4000
    k = np.arange(n, dtype=np.uint64)
    v = np.linspace(-2, 2, n)
    acc = np.zeros((trials, n))
    for t in range(trials):
        out = f.encode(Payload(k, v), s)
        acc[t, out.keys.astype(np.int64)] = out.values
    assert np.abs(acc.mean(axis=0) - v).max() < 5 * np.sqrt(4 * (1 - p) / p / trials)
    var = acc.var(axis=0)
    expected = v**2 * (1 - p) / p
    assert np.allclose(var, expected, rtol=0.15, atol=1e-9)
    kept = np.count_nonzero(acc) / acc.size
    assert kept == pytest.approx(p, abs=0.01)
    out = f.encode(Payload(k, v), FilterContext("p", "push", flush=True))
    assert same(out.values, v)


# -- KKT -------------------------------------------------------------------------------------
def test_kkt_mask_truth_table():
    w = np.array([0.0, 0.0, 0.0, 0.5, -0.0, 0.0])
    g = np.array([0.5, 0.95, -1.2, 0.0, -0.89, np.nan])
    assert kkt_mask(w, g, l1=1.0, delta=0.1).tolist() == [False, True, True, True, False, True]
    with pytest.raises(ValueShapeError):
        kkt_mask(w, g[:3], 1.0)


def test_kkt_filter_drops_rows_using_context_weights():
    chain = parse_filters("kkt:1:0.1,compress")
    k = np.array([10, 20, 30, 40], dtype=np.uint64)
    weights = {10: 0.0, 20: 0.3, 30: 0.0, 40: 0.0}

    def lookup(keys):
        return np.array([weights[int(x)] for x in keys])

    s = FilterContext("server-0", "push", weights=lookup)
    r = FilterContext("worker-0", "push")
    gu = np.array([[0.2, 5.0], [0.2, 5.0], [-1.5, 5.0], [0.9, 5.0]])  # columns g, u
    d = chain.decode(wire(chain.encode(Payload(k, gu), s)), r)
    assert d.keys.tolist() == [20, 30] and same(d.values, gu[[1, 2]])
    assert s.counters.event("kkt.dropped") == 2
    assert s.counters.get("push", "kkt:1:0.1").pairs_sent == 2
    s2 = FilterContext("server-0", "push", weights=np.array([0.0, 0.3, 0.0, 0.0]))
    assert chain.encode(Payload(k, gu[:, 0].copy()), s2).meta["compress"]["n"] == 2
    with pytest.raises(ConfigError, match="weights"):
        chain.encode(Payload(k, gu), FilterContext("x", "push"))
    with pytest.raises(ValueShapeError):
        chain.encode(Payload(k, gu), FilterContext("x", "push", weights=np.zeros(3)))
    with pytest.raises(ValueShapeError):
        FilterChain([KKTFilter(1.0, grad_col=2)]).encode(Payload(k, gu), s)


def test_active_set_bookkeeping():
    a = ActiveSet()
    k = np.array([1, 2, 3, 4], dtype=np.uint64)
    n = a.update(k, w=np.array([0.0, 0.0, 1.0, 0.0]), g=np.array([0.1, 2.0, 0.0, -0.5]), l1=1.0)
    assert n == 2 and a.inactive_keys().tolist() == [1, 4]
    assert a.active_mask(np.array([4, 1, 2, 9], dtype=np.uint64)).tolist() == [False, False,
                                                                                True, True]
    a.update(k[:1], w=np.zeros(1), g=np.array([3.0]), l1=1.0)  # KKT violated: active again
    assert a.inactive_keys().tolist() == [4]
    assert a.on_converged() is False and len(a) == 0  # reset: one more full pass
    assert a.on_converged() is True


# -- counters and the full chain -------------------------------------------------------------
def test_counters_add_up_between_sender_and_receiver():
    spec = "kkt:0.5,fp16,key_cache,compress:lz4"
    chain = parse_filters(spec)
    workers = []
    server = FilterContext("server", "push")
    k = rand_keys(2000)
    rng = np.random.default_rng(5)
    for w in range(3):
        weights = np.where(rng.random(2000) < 0.5, 0.0, 1.0)
        s = FilterContext(f"worker-{w}", "push", weights=weights)
        recv = FilterContext(s.peer, "push", counters=server.counters)
        workers.append(s)
        for _ in range(4):
            v = rng.standard_normal(2000).astype(np.float32)
            # KKT drops the same coordinates every time, so the key cache can send signatures
            v[weights == 0] = np.clip(v[weights == 0], -0.4, 0.4)
            d = chain.decode(wire(chain.encode(Payload(k, v), s)), recv)
            assert d.values.shape[0] == d.keys.shape[0]
    total = Counters()
    for s in workers:
        total.merge(s.counters)
    for stage in ["raw", *chain.names]:
        sent, got = total.get("push", stage), server.counters.get("push", stage)
        assert sent.messages_sent == got.messages_received == 12
        if stage != "raw":  # the receiver's raw stage lacks what KKT dropped
            assert sent.pairs_sent == got.pairs_received
            assert sent.bytes_sent == got.bytes_received
    raw = total.get("push", "raw")
    assert raw.pairs_sent == 12 * 2000 and raw.bytes_sent == 12 * 2000 * 12
    stages = [total.get("push", st).bytes_sent for st in ["raw", *chain.names]]
    assert stages == sorted(stages, reverse=True)  # every filter reduced the traffic
    again = Counters.from_json(json.loads(json.dumps(total.to_json())))
    assert again.to_json() == total.to_json()
    assert total.event("key_cache.sig_sent") == 3 * 3


def test_all_filters_together_reduce_traffic_a_lot():
    chain = parse_filters("kkt:1,significant:abs:0.05,fixed:2:-4:4,key_cache,compress")
    rng = np.random.default_rng(0)
    n = 20_000
    k = rand_keys(n)
    w = np.where(rng.random(n) < 0.9, 0.0, 1.0)  # sparse model: most weights zero
    s = FilterContext("server", "push", weights=w)
    r = FilterContext("worker", "push")
    for _ in range(5):
        g = (rng.standard_normal(n) * 0.5).astype(np.float32)
        chain.decode(wire(chain.encode(Payload(k, g), s)), r)
    raw = s.counters.get("push", "raw").bytes_sent
    sent = s.counters.get("push", chain.names[-1]).bytes_sent
    assert raw / sent > 10


# -- property tests --------------------------------------------------------------------------
keys_st = st.lists(st.integers(0, 2**64 - 1), max_size=300, unique=True).map(
    lambda xs: np.array(sorted(xs), dtype=np.uint64))


@st.composite
def payloads(draw):
    keys = draw(keys_st)
    n = keys.shape[0]
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    cols = draw(st.sampled_from([0, 1, 3]))
    shape = (n, cols) if cols else (n,)
    elements = st.one_of(st.just(0.0), st.floats(width=np.dtype(dtype).itemsize * 8))
    values = draw(hnp.arrays(dtype, shape, elements=elements))
    has_keys, has_values = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    return Payload(keys if has_keys else None, values if has_values else None)


@FAST
@given(p=payloads(), spec=st.sampled_from(["compress:lz4", "compress:zstd", "key_cache",
                                           "key_cache:4k,compress:zstd:3", ""]))
def test_lossless_chains_round_trip_exactly(p, spec):
    chain = parse_filters(spec)
    s, r = ctx_pair()
    for _ in range(2):  # the second time the key cache sends a signature
        d = roundtrip(chain, p, s, r)
        assert same(d.keys, p.keys) and same(d.values, p.values)


@FAST
@given(data=st.data())
def test_mutated_messages_raise_only_pserver_errors(data):
    chain = parse_filters("fixed:2:-1:1,key_cache:64k,compress:zstd")
    s, r = ctx_pair()
    n = data.draw(st.integers(0, 200))
    k = rand_keys(n, seed=n) if n else np.empty(0, np.uint64)
    v = rand_values(n, zeros=0.5)
    chain.decode(wire(chain.encode(Payload(k, v), s)), r)
    e = wire(chain.encode(Payload(k, v), s))
    what = data.draw(st.sampled_from(["frame", "meta", "truncate", "swap"]))
    if what == "frame" and e.frames:
        i = data.draw(st.integers(0, len(e.frames) - 1))
        fr = e.frames[i].copy()
        if fr.size:
            j = data.draw(st.integers(0, fr.size - 1))
            fr[j] ^= data.draw(st.integers(1, 255))
        e.frames[i] = fr
    elif what == "meta":
        sec = data.draw(st.sampled_from(["fixed", "key_cache", "compress"]))
        field = data.draw(st.sampled_from(sorted(e.meta[sec])))
        e.meta[sec][field] = data.draw(st.one_of(
            st.none(), st.booleans(), st.integers(-2, 2**40), st.text(max_size=5),
            st.lists(st.integers(0, 10), max_size=3)))
    elif what == "truncate" and e.frames:
        e.frames[-1] = e.frames[-1][: data.draw(st.integers(0, e.frames[-1].size))]
    elif what == "swap":
        e.frames = e.frames[::-1]
    try:
        d = chain.decode(e, r)
    except PServerError:
        return
    # an undetected change (e.g. in a raw values frame) still yields a well-formed payload
    assert d.keys.dtype == np.uint64 and d.values.shape[0] == d.keys.shape[0]
    assert np.all(d.keys[1:] > d.keys[:-1])
