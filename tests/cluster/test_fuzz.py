"""Property-based fuzzing of a live, secure cluster (hypothesis).

A real LocalCluster (CURVE keys, one server, no workers) is attacked from this process through
real authenticated DEALER sockets holding the worker key. Two sockets talk to the server:

* ``valid`` (identity n9001) sends only well-formed pushes and pulls, with increasing timestamps;
  every pull is compared exactly with a model of the store built from those pushes;
* ``fuzz`` (identity n9002) sends random bytes, random JSON headers and mutated valid messages
  (truncated, bit-flipped, lying about shapes/dtypes/sizes/layout, wrong ops and tables, unsorted
  or overlapping keys, huge declared runs, bad table specs ...).

Every message must get exactly one reply. A mutation can still be a valid request (a flipped
value byte, a flipped digit of ts): when the server acknowledges a push from ``fuzz``, the model
applies that push too, decoded with the same codec. At the end of each example the whole model is
pulled and compared bit for bit (NaN and infinity are valid values), and at the end of the test
the server is alive, answers correctly, and its error counters (total and per reason) equal the
error replies this test received.

A second test sends mutated control messages (heartbeat, leave, barrier naming the server,
scheduler-only ops, random headers) to the scheduler from a worker's socket: it answers every one,
stays up, counts its rejections, and the server stays a live member of the cluster.
"""

from __future__ import annotations

import json
import struct
from collections import Counter

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pserver import wire
from pserver.errors import PServerError
from pserver.kv import keys as keyfmt
from pserver.launch import LocalCluster
from pserver.security import Credentials
from pserver.store.spec import TableSpec
from pserver.wire import Message

TABLES = {"default": 1, "emb": 3}  # name -> dim (float32, "sum", zeros)
REPLY_TIMEOUT_MS = 10_000
MAX_EXAMPLES = 70  # x 25..50 actions: a few thousand messages in well under 30 s
MIN_ACTIONS = 25

# Ops a peer might send: data path, membership, control and made-up ones.
OPS = ["push", "pull", "pull_range", "declare_table", "ping", "stats", "status", "shutdown",
       "register", "heartbeat", "leave", "barrier", "report", "view", "ring", "set_consistency",
       "replicate", "replicate_agg", "repl_load", "repl_batch", "migrate_data", "migrate_range",
       "checkpoint_write", "frobnicate", "PUSH", "push\x00"]
DTYPE_CODES = [*wire.DTYPES, ">f4", ">u8", "O", "<U4", "<c8", "|b1", "<f16", "V8", ""]
META_KEYS = ["fc", "fl", "orig", "kf", "rnd", "lo", "hi", "spec", "p", "rv", "id", "v", "name", "group"]


# ------------------------------------------------------------------------------ message bytes
def _pad(n: int) -> bytes:
    return bytes(-n & 7)


def build(header: object, payloads: list[bytes], inline: bool) -> list[bytes]:
    """Frames of a message with this (possibly lying) header and these array payloads, in the
    layout of pserver.wire (checked against wire.encode by test_builder_matches_the_codec)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = wire.MAGIC + struct.pack("<I", len(head)) + head
    if not inline:
        return [prefix, *payloads]
    out = [prefix, _pad(len(prefix))]
    for p in payloads:
        out += [p, _pad(len(p))]
    return [b"".join(out)]


def parts(msg: Message) -> tuple[dict, list[bytes], bool]:
    """(header, array payloads, inline) of wire.encode(msg): the material mutations start from."""
    frames = [_bytes(f) for f in wire.encode(msg)]
    (hlen,) = struct.unpack_from("<I", frames[0], len(wire.MAGIC))
    start = len(wire.MAGIC) + 4
    header = json.loads(frames[0][start:start + hlen])
    payloads = [np.ascontiguousarray(a).tobytes() for a in msg.arrays]
    return header, payloads, header.get("i") == 1


def _bytes(frame) -> bytes:
    return frame.tobytes() if isinstance(frame, np.ndarray) else bytes(frame)


# ------------------------------------------------------------------------------ strategies
FLOAT32 = st.floats(width=32)  # NaN, +-inf, -0.0 and subnormals included: all valid values
KEY = st.one_of(st.integers(0, 63), st.sampled_from([2**32, 2**63, 2**64 - 2, 2**64 - 1]))
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                 st.text(max_size=6), st.lists(st.integers(-5, 5), max_size=3),
                 st.dictionaries(st.sampled_from(META_KEYS), st.integers(-5, 5), max_size=2))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)


@st.composite
def key_arrays(draw, min_size: int = 0) -> np.ndarray:
    """Sorted unique uint64 keys: a contiguous run (sent as runs) or a scattered set."""
    if draw(st.booleans()):
        start = draw(st.integers(0, 200))
        return np.arange(start, start + draw(st.integers(max(1, min_size), 40)), dtype=np.uint64)
    return np.array(sorted(draw(st.sets(KEY, min_size=min_size, max_size=12))), dtype=np.uint64)


@st.composite
def pushes(draw) -> Message:
    table = draw(st.sampled_from(sorted(TABLES)))
    keys = draw(key_arrays())
    vals = draw(hnp.arrays(np.float32, (len(keys), TABLES[table]), elements=FLOAT32))
    meta, arrays = keyfmt.pack_keys(keys)
    return Message("push", 0, table, meta, [*arrays, vals])


@st.composite
def pulls(draw) -> Message:
    table = draw(st.sampled_from(sorted(TABLES)))
    meta, arrays = keyfmt.pack_keys(draw(key_arrays(min_size=1)))
    return Message("pull", 0, table, meta, arrays)


@st.composite
def base_messages(draw) -> Message:
    """Valid requests that mutations start from."""
    kind = draw(st.sampled_from(["push", "push", "push", "pull", "pull_range", "declare", "ping"]))
    if kind == "push":
        return draw(pushes())
    if kind == "pull":
        return draw(pulls())
    if kind == "pull_range":
        lo = draw(st.integers(0, 100))
        return Message("pull_range", 0, draw(st.sampled_from(sorted(TABLES))),
                       {"lo": lo, "hi": lo + draw(st.integers(0, 100))})
    if kind == "declare":
        spec = TableSpec(name="f" + draw(st.text("abcxyz", min_size=1, max_size=4)),
                         dim=draw(st.integers(1, 4)))
        return Message("declare_table", 0, meta={"spec": spec.to_json()})
    return Message("ping", 0)


def _mutate_header(draw, header: dict, ops: list[str]) -> object:
    field = draw(st.sampled_from(["op", "ts", "t", "m", "m_key", "a_dtype", "a_shape", "a_len",
                                  "i", "extra", "whole"]))
    h = dict(header)
    if field == "op":
        h["op"] = draw(st.one_of(st.sampled_from(ops), JUNK))
    elif field == "ts":
        h["ts"] = draw(st.one_of(st.sampled_from([2**62, -(2**62), 2**200, 1.5]), JUNK))
    elif field == "t":
        h["t"] = draw(st.one_of(st.sampled_from(["nope", "x" * 300, "", "emb", "default"]), JUNK))
    elif field == "m":
        h["m"] = draw(JUNK)
    elif field == "m_key":
        m = dict(h.get("m") or {})
        m[draw(st.sampled_from(META_KEYS))] = draw(st.one_of(JUNK, st.sampled_from(["r", "k", "x"])))
        h["m"] = m
    elif field in ("a_dtype", "a_shape") and h.get("a"):
        specs = [list(s) for s in h["a"]]
        j = draw(st.integers(0, len(specs) - 1))
        if field == "a_dtype":
            specs[j][0] = draw(st.one_of(st.sampled_from(DTYPE_CODES), JUNK))
        else:
            shape = list(specs[j][1])
            specs[j][1] = draw(st.one_of(
                st.just([shape[0] + draw(st.sampled_from([-1, 1, 2, 1000])), *shape[1:]]),
                st.just(shape[::-1]), st.just([*shape, 1]), st.just([2**40]), st.just([2**62, 2]),
                st.lists(st.integers(-3, 2**45), max_size=3), JUNK))
        h["a"] = specs
    elif field == "a_len":
        specs = list(h.get("a") or [])
        h["a"] = specs[:-1] if specs and draw(st.booleans()) else [*specs, ["<u8", [1]]]
    elif field == "i":
        h["i"] = draw(st.one_of(st.sampled_from([0, 1, True, 2]), JUNK))
    elif field == "extra":
        h[draw(st.text(max_size=3))] = draw(JUNK)
    else:
        return draw(st.one_of(JSON, JUNK))
    return h


@st.composite
def fuzz_messages(draw, bases: st.SearchStrategy[Message] | None = None,
                  ops: tuple[str, ...] = tuple(OPS)) -> tuple[str, list[bytes]]:
    """(description, frames) of a random or mutated message: mutations of ``bases``, random
    headers naming ``ops``."""
    how = draw(st.sampled_from(["bytes", "json", "deep", "truncate", "flip", "append", "frames", "hlen",
                                "header", "header", "header", "layout", "semantic", "semantic"]))
    if how == "bytes":
        frames = draw(st.lists(st.one_of(st.binary(max_size=64),
                                          st.binary(max_size=32).map(lambda b: wire.MAGIC + b)),
                               min_size=1, max_size=3))
        return how, frames
    if how == "json":
        head = draw(st.one_of(JSON, st.fixed_dictionaries(
            {"op": st.sampled_from(ops), "ts": st.integers(0, 9)},
            optional={"t": st.sampled_from(sorted(TABLES)), "m": JSON,
                      "a": st.lists(st.tuples(st.sampled_from(DTYPE_CODES),
                                              st.lists(st.integers(0, 9), max_size=2)), max_size=3),
                      "i": st.just(1)})))
        return how, build(head, draw(st.lists(st.binary(max_size=24), max_size=3)), False)
    if how == "semantic":
        return draw(semantic_errors())
    if how == "deep":  # nesting deeper than the JSON parser's recursion limit, within 64 KiB
        depth = draw(st.sampled_from([500, 5_000, 30_000]))
        head = draw(st.sampled_from(["[" * depth, '{"op":"ping","m":' + '{"a":' * depth]))
        return how, [wire.MAGIC + struct.pack("<I", len(head)) + head.encode()]
    header, payloads, inline = parts(draw(base_messages() if bases is None else bases))
    frames = build(header, payloads, inline)
    if how == "truncate":
        i = draw(st.integers(0, len(frames) - 1))
        frames[i] = frames[i][:draw(st.integers(0, max(0, len(frames[i]) - 1)))]
    elif how == "flip":
        i = draw(st.integers(0, len(frames) - 1))
        buf = bytearray(frames[i])
        for _ in range(draw(st.integers(1, 4))):
            if buf:
                buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        frames[i] = bytes(buf)
    elif how == "append":
        i = draw(st.integers(0, len(frames) - 1))
        frames[i] += draw(st.binary(min_size=1, max_size=16))
    elif how == "frames":
        if len(frames) > 1 and draw(st.booleans()):
            del frames[draw(st.integers(1, len(frames) - 1))]
        else:
            frames.insert(draw(st.integers(1, len(frames))), draw(st.binary(max_size=32)))
    elif how == "hlen":
        declared = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 2**32 - 1, 1 << 16])))
        frames[0] = frames[0][:3] + struct.pack("<I", declared) + frames[0][7:]
    elif how == "header":
        frames = build(_mutate_header(draw, header, list(ops)), payloads, inline)
    elif how == "layout":  # the other layout, with or without telling the header
        tell = draw(st.booleans())
        if tell:
            header = {k: v for k, v in header.items() if k != "i"} if inline else {**header, "i": 1}
        frames = build(header, payloads, not inline)
    return how, frames


@st.composite
def semantic_errors(draw) -> tuple[str, list[bytes]]:
    """Well-formed frames whose content is invalid for the server."""
    kind = draw(st.sampled_from(["unsorted", "duplicate", "keys_i8", "keys_2d", "vals_f8",
                                 "vals_shape", "runs_overlap", "runs_zero", "runs_wrap",
                                 "runs_huge", "runs_uneven", "range_bounds", "spec", "table",
                                 "dim_huge", "kf"]))
    k = np.array([3, 9, 27], np.uint64)
    v = np.ones(3, np.float32)
    runs = {"kf": "r"}
    msgs = {
        "unsorted": Message("push", 1, "", {"kf": "k"}, [k[::-1].copy(), v]),
        "duplicate": Message("pull", 1, "", {"kf": "k"}, [np.array([4, 4], np.uint64)]),
        "keys_i8": Message("pull", 1, "", {"kf": "k"}, [k.astype(np.int64)]),
        "keys_2d": Message("pull", 1, "", {"kf": "k"}, [k.reshape(1, 3)]),
        "vals_f8": Message("push", 1, "", {"kf": "k"}, [k, v.astype(np.float64)]),
        "vals_shape": Message("push", 1, "emb", {"kf": "k"}, [k, np.ones((3, 2), np.float32)]),
        "runs_overlap": Message("pull", 1, "", runs, [np.array([0, 5], np.uint64),
                                                      np.array([10, 3], np.uint64)]),
        "runs_zero": Message("pull", 1, "", runs, [np.array([0], np.uint64), np.array([0], np.uint64)]),
        "runs_wrap": Message("pull", 1, "", runs, [np.array([2**64 - 2, 3], np.uint64)[:1],
                                                   np.array([5], np.uint64)]),
        "runs_huge": Message("pull", 1, draw(st.sampled_from(["", "emb"])), runs,
                             [np.array([0, 2**62], np.uint64),
                              np.array([draw(st.sampled_from([2**40, 2**61, 2**36])), 2**62],
                                       np.uint64)]),
        "runs_uneven": Message("pull", 1, "", runs, [np.array([0, 9], np.uint64),
                                                     np.array([1], np.uint64)]),
        "range_bounds": Message("pull_range", 1, "", draw(st.sampled_from(
            [{"lo": 5, "hi": 1}, {"lo": -1, "hi": 3}, {"lo": 0, "hi": 2**65}, {"lo": "0"}, {}]))),
        "spec": Message("declare_table", 1, meta={"spec": draw(st.sampled_from(
            [{"name": "s", "dim": 0}, {"name": "s", "dim": 2**40}, {"name": "s", "updater": "nope"},
             {"name": "s", "bogus": 1}, {"name": ""}, {"name": "s", "dtype": "int8"}, [], None,
             {"name": "s", "init": "normal:-1"}, {"name": "s", "updater_args": {"lr": float("nan")}}]))}),
        "table": Message("push", 1, "nope", {"kf": "k"}, [k, v]),
        "dim_huge": Message("declare_table", 1, meta={"spec": {"name": "big", "dim": 2**30}}),
        "kf": Message("pull", 1, "", {"kf": draw(st.sampled_from(["x", "", 1, None]))}, [k]),
    }
    return kind, [_bytes(f) for f in wire.encode(msgs[kind])]


ACTIONS = st.one_of(
    st.tuples(st.just("push"), pushes()),
    st.tuples(st.just("pull"), pulls()),
    st.tuples(st.just("fuzz"), fuzz_messages()),
    st.tuples(st.just("fuzz"), fuzz_messages()),
    st.tuples(st.just("fuzz"), fuzz_messages()),
)


# ------------------------------------------------------------------------------ the live server
class Model:
    """What the server's tables must hold: zeros, plus every push it acknowledged (float32)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, np.ndarray]] = {t: {} for t in TABLES}

    def push(self, table: str, keys: np.ndarray, vals: np.ndarray) -> None:
        rows = self.rows[table]
        dim = TABLES[table]
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf and overflow are valid
            for key, row in zip(keys.tolist(), vals.reshape(len(keys), dim)):
                rows[key] = rows.get(key, np.zeros(dim, np.float32)) + row

    def keys(self, table: str) -> np.ndarray:
        """Every key ever written to ``table``, sorted."""
        return np.array(sorted(self.rows[table]), dtype=np.uint64)


def same_values(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal as stored floats: NaN where NaN, the same sign of zero, equal elsewhere."""
    return (got.shape == want.shape and np.array_equal(got, want, equal_nan=True)
            and np.array_equal(np.signbit(got) | np.isnan(got), np.signbit(want) | np.isnan(want)))


class Harness:
    """The attacker's and the checker's sockets at the cluster's server, and the model."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        status = cluster.wait_scheduler()
        server = _server_node(cluster, status)
        self.ctx = zmq.Context()
        self.creds = Credentials.load(cluster.keys, "worker")
        self.valid = self._dealer(b"n9001", server)
        self.fuzz = self._dealer(b"n9002", server)
        self.ts = {self.valid: 0, self.fuzz: 0}
        self.model = Model()
        self.errors = Counter()  # kind -> error replies received
        self.fuzz_acks = 0
        for name, dim in TABLES.items():
            if name != "default":
                reply = self.request(self.valid, Message(
                    "declare_table", 0, meta={"spec": TableSpec(name=name, dim=dim).to_json()}))
                assert reply.op == "ok", reply

    def _dealer(self, identity: bytes, server: dict) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = identity
        self.creds.configure_client(sock, "server")
        sock.connect(f"tcp://{server['host']}:{server['port']}")
        return sock

    def next_ts(self, sock: zmq.Socket) -> int:
        self.ts[sock] += 1
        return self.ts[sock]

    def exchange(self, sock: zmq.Socket, frames: list, what: str) -> Message:
        assert self.cluster.procs["server 0"].poll() is None, "the server process died"
        sock.send_multipart(frames)
        assert sock.poll(REPLY_TIMEOUT_MS), f"no reply within {REPLY_TIMEOUT_MS} ms to {what}"
        reply = wire.decode(sock.recv_multipart())
        assert not sock.poll(0), f"more than one reply to {what}"
        if reply.op == "error":
            self.errors[reply.meta.get("kind")] += 1
        return reply

    def request(self, sock: zmq.Socket, msg: Message) -> Message:
        msg.ts = self.next_ts(sock)
        return self.exchange(sock, wire.encode(msg), msg.op)

    def valid_push(self, msg: Message) -> None:
        reply = self.request(self.valid, msg)
        assert reply.op == "ack" and reply.ts == msg.ts and not reply.meta.get("dup"), reply
        self._apply(msg)

    def _apply(self, msg: Message) -> None:
        keys, vals = keyfmt.unpack_push(msg, TABLES[msg.table or "default"], np.dtype(np.float32))
        self.model.push(msg.table or "default", keys.as_array(), vals)

    def check_pull(self, table: str, keys: np.ndarray) -> None:
        meta, arrays = keyfmt.pack_keys(keys)
        reply = self.request(self.valid, Message("pull", 0, table, meta, arrays))
        assert reply.op == "vals", reply
        rows = self.model.rows[table]
        dim = TABLES[table]
        want = np.array([rows.get(k, np.zeros(dim, np.float32)) for k in keys.tolist()],
                        np.float32).reshape(len(keys), dim)
        got = reply.arrays[0].reshape(len(keys), dim)
        assert same_values(got, want), (table, keys, got, want)

    def check_all(self) -> None:
        for table in TABLES:
            keys = self.model.keys(table)
            if len(keys):
                self.check_pull(table, keys)

    def fuzz_message(self, how: str, frames: list[bytes]) -> None:
        reply = self.exchange(self.fuzz, frames, f"fuzz message ({how}) {frames!r:.300}")
        if reply.op != "ack":
            return
        # The mutation left a valid push: the server applied it, so the model must too.
        self.fuzz_acks += 1
        msg = wire.decode(frames)
        assert msg.op == "push", (how, msg)
        if reply.meta.get("dup") or (msg.table or "default") not in TABLES:
            return  # a resend the server recognised, or a table this test does not model
        self._apply(msg)

    def stats(self) -> dict:
        reply = self.request(self.valid, Message("stats", 0))
        assert reply.op == "stats", reply
        return reply.meta

    def close(self) -> None:
        self.valid.close(0)
        self.fuzz.close(0)
        self.creds.close()
        self.ctx.term()


def _server_node(cluster: LocalCluster, status: dict) -> dict:
    from pserver.membership.client import scheduler_request

    for _ in range(200):
        servers = [n for n in status["nodes"] if n["role"] == "server" and n["alive"]]
        if servers:
            return servers[0]
        status = scheduler_request(cluster.config(), "status", role="worker", timeout=2.0).meta
    raise AssertionError("the server never joined")


@pytest.fixture(scope="module")
def harness():
    cluster = LocalCluster(1, 0, log_level="ERROR").start()  # secure: ephemeral CURVE keys
    h = None
    try:
        h = Harness(cluster)
        yield h
    finally:
        if h is not None:
            h.close()
        cluster.stop()


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(("msg", "one_frame"), [
    (Message("push", 7, "emb", {"kf": "k"}, [np.array([1, 5], np.uint64), np.ones((2, 3), np.float32)]),
     True),
    (Message("push", 8, "", {"kf": "k"}, [np.arange(9000, dtype=np.uint64), np.ones(9000, np.float32)]),
     False),
    (Message("ping", 9), False),
])
def test_builder_matches_the_codec(msg, one_frame):
    header, payloads, inline = parts(msg)
    assert build(header, payloads, inline) == [_bytes(f) for f in wire.encode(msg)]
    assert inline == one_frame


@pytest.mark.slow
def test_fuzzed_server_stays_up_and_keeps_exact_values(harness):
    h = harness
    before = h.stats()
    proc = h.cluster.procs["server 0"]
    sent = Counter()

    @settings(max_examples=MAX_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(actions=st.lists(ACTIONS, min_size=MIN_ACTIONS, max_size=2 * MIN_ACTIONS))
    def run(actions):
        for kind, arg in actions:
            sent[kind] += 1
            if kind == "push":
                h.valid_push(arg)
            elif kind == "pull":
                h.check_pull(arg.table, _keys_of(arg))
            else:
                how, frames = arg
                h.fuzz_message(how, frames)
        assert proc.poll() is None, "the server process died"
        h.check_all()  # stored values are exactly those of the acknowledged pushes

    run()
    assert proc.poll() is None
    assert sum(sent.values()) >= 1500, sent  # thousands of messages, not a handful
    assert h.fuzz_acks > 0  # some mutations stayed valid pushes: the model followed them
    pong = h.request(h.valid, Message("ping", 0))
    assert pong.op == "pong", pong
    h.check_all()
    after = h.stats()
    # every rejection was counted by the server, in total and per reason
    assert after["errors"] - before["errors"] == sum(h.errors.values())
    rejected = Counter(after["rejected"])
    rejected.subtract(before["rejected"])
    assert +rejected == +h.errors, (rejected, h.errors)
    assert sum(h.errors.values()) > sent["fuzz"] // 2  # most fuzz messages were invalid
    # nothing received made the server fail in an unplanned way
    assert set(h.errors) <= _pserver_error_names(), h.errors


def _keys_of(msg: Message) -> np.ndarray:
    return keyfmt.unpack_keys(msg).as_array()


def _pserver_error_names() -> set[str]:
    names, todo = set(), [PServerError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


# ------------------------------------------------------------------------------ the scheduler
# Bases for the scheduler: node-id ops name the server (id 1), which this socket must not speak
# for; no "register" anywhere, since a phantom worker would end the job when it is declared dead.
SCHEDULER_BASES = [Message("heartbeat", 0, meta={"id": 1, "v": 0}), Message("leave", 0, meta={"id": 1}),
                   Message("barrier", 0, meta={"id": 1, "name": "b", "group": "worker"}),
                   Message("status", 0), Message("shutdown", 0), Message("ring", 0, meta={"v": 1})]
SCHEDULER_OPS = tuple(op for op in OPS if op != "register")
SCHEDULER_EXPECTED_KINDS = {"ValueError", "KeyError", "TypeError", "OverflowError"}


@pytest.mark.slow
def test_fuzzed_scheduler_stays_up_and_keeps_the_cluster(harness):
    h = harness
    sock = h.ctx.socket(zmq.DEALER)
    sock.linger = 0
    h.creds.configure_client(sock, "scheduler")
    sock.connect(f"tcp://{h.cluster.scheduler}")
    errors: Counter[str] = Counter()

    def exchange(frames: list, what: str) -> Message:
        assert h.cluster.procs["scheduler"].poll() is None, "the scheduler process died"
        sock.send_multipart(frames)
        assert sock.poll(REPLY_TIMEOUT_MS), f"no reply within {REPLY_TIMEOUT_MS} ms to {what}"
        reply = wire.decode(sock.recv_multipart())
        assert not sock.poll(0), f"more than one reply to {what}"
        if reply.op == "error":
            errors[reply.meta.get("kind")] += 1
        return reply

    def status() -> dict:
        reply = exchange(wire.encode(Message("status", 1)), "status")
        assert reply.op == "status", reply
        return reply.meta

    before = status()
    sent = 0

    @settings(max_examples=20, deadline=None, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(messages=st.lists(fuzz_messages(st.sampled_from(SCHEDULER_BASES), SCHEDULER_OPS),
                             min_size=MIN_ACTIONS, max_size=2 * MIN_ACTIONS))
    def run(messages):
        nonlocal sent
        for how, frames in messages:
            sent += 1
            exchange(frames, f"fuzz message ({how}) {frames!r:.300}")
        assert h.cluster.procs["scheduler"].poll() is None, "the scheduler process died"

    try:
        run()
        after = status()
    finally:
        sock.close(0)
    assert sent >= 400
    server = [n for n in after["nodes"] if n["role"] == "server"]
    assert [(n["alive"], n["state"]) for n in server] == [(True, "up")]  # nobody spoke for it
    s0, s1 = before["scheduler"], after["scheduler"]
    assert s1["rejected_messages"] - s0["rejected_messages"] == sum(errors.values())
    by_reason = Counter(s1["rejected_by_reason"])
    by_reason.subtract(s0["rejected_by_reason"])
    assert +by_reason == +errors, (by_reason, errors)
    assert errors["AuthError"] > 0  # scheduler-only ops and other nodes' ids were refused
    assert set(errors) <= _pserver_error_names() | SCHEDULER_EXPECTED_KINDS, errors
    # the data path is unaffected
    pong = h.request(h.valid, Message("ping", 0))
    assert pong.op == "pong", pong
