"""What encrypting a 4 MB push must cost on this machine (issue 23): raw pyzmq, a DEALER sending 1 M
float32 to a ROUTER in another process that adds them into a float32 table and acks, 1 in flight -
(a) plain, (b) CURVE, (c) AES-GCM (128/256-bit) sealed by the application, whole or as pipelined
chunks (one ZeroMQ message each, opened into place on arrival, applied after the last); (d) the
cipher's own rate in one process; (e) CPU per push of both processes. Interleaved rounds; slowdowns
are against the same round's plain rate. Uses `cryptography`, a dependency of pserver since its
sealed bulk channel (docs/sealed-bulk.md). Method and findings: docs/performance.md.

Usage: python benchmarks/cipher_floor.py [--seconds 2] [--rounds 3]
                                         [--out benchmarks/results/cipher_floor.json]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

N_FLOATS = 1_000_000
TAG = 16                     # bytes of a GCM tag
TO_RECEIVER, TO_SENDER = 0, 1
HEADER = b'{"op":"push","ts":0,"t":"tensor","m":{"p":0,"rv":1}}'
ACK, REFUSED, QUIT = b"ack", b"refused", b""
CHUNKS = (1, 2, 4, 8, 16)
KEY_BITS = (128, 256)
WARMUP = 10                  # pushes before the clock starts (connection, CURVE handshake, caches)
TARGET_SLOWDOWN = 0.25       # issue 23's bound


# -- sealing: pure, no I/O ------------------------------------------------------------------------
def nonce(direction: int, part: int, counter: int) -> bytes:
    """The 12-byte GCM nonce of one sealed part: direction (1 byte), part (3 bytes: 0 = the push's
    header or its ack, 1.. = its chunks), push counter (8 bytes). Under one key no two parts share
    one as long as each direction's counter never repeats.

    Raises: ValueError if a field does not fit its bytes."""
    if not (0 <= direction < 1 << 8 and 0 <= part < 1 << 24 and 0 <= counter < 1 << 64):
        raise ValueError(f"nonce fields out of range: direction={direction} part={part} "
                         f"counter={counter}; use a fresh key before the counter wraps")
    return direction.to_bytes(1, "little") + part.to_bytes(3, "little") + counter.to_bytes(8, "little")


def chunk_bounds(nbytes: int, chunks: int) -> list[tuple[int, int]]:
    """(start, end) byte offsets of `chunks` contiguous parts covering nbytes, sizes within one byte.

    Raises: ValueError if chunks is not between 1 and nbytes."""
    if not 1 <= chunks <= nbytes:
        raise ValueError(f"cannot split {nbytes} bytes into {chunks} chunks: use 1 to {nbytes}")
    size, extra = divmod(nbytes, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def aes_gcm(key: bytes):
    """An AES-GCM AEAD (cryptography's AESGCM) for a 16- or 32-byte key.

    Raises: ImportError saying how to install `cryptography`; ValueError for another key length."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as e:
        raise ImportError("benchmarks/cipher_floor.py needs `cryptography`: pip install cryptography") from e
    return AESGCM(key)


class ChunkSealer:
    """The sender's side: each push is a sealed header (part 0) and `chunks` sealed parts of one
    buffer, under the push's own counter; each sealed chunk goes into a buffer reused by the next
    push (send it, and have the push acknowledged, before sealing the next)."""

    def __init__(self, aead, nbytes: int, chunks: int) -> None:
        self.aead = aead
        self.bounds = chunk_bounds(nbytes, chunks)
        self.outs = [bytearray(end - start + TAG) for start, end in self.bounds]
        self.counter = 0

    def begin(self, header: bytes) -> bytes:
        """Starts the next push (advances the counter); returns its sealed header."""
        self.counter += 1
        return self.aead.encrypt(nonce(TO_RECEIVER, 0, self.counter), header, None)

    def seal(self, i: int, data: memoryview) -> bytearray:
        """Seals chunk i of `data` (the whole buffer, bytes) for the current push."""
        start, end = self.bounds[i]
        out = self.outs[i]
        self.aead.encrypt_into(nonce(TO_RECEIVER, i + 1, self.counter), data[start:end], None, out)
        return out

    def check_ack(self, reply: bytes) -> None:
        """Checks the receiver's reply to the current push.

        Raises: RuntimeError if the receiver refused the push; cryptography's InvalidTag if the reply
        is not the receiver's sealed ack of this push."""
        if reply == REFUSED:
            raise RuntimeError(f"the receiver refused sealed push {self.counter}")
        if self.aead.decrypt(nonce(TO_SENDER, 0, self.counter), reply, None) != ACK:
            raise RuntimeError(f"the reply to sealed push {self.counter} is not an ack")


class ChunkOpener:
    """The receiver's side: opens each push's header and chunks, in arrival order, into `buf`. The
    nonce comes from the opener's own count of pushes and parts, never from the wire, so a replayed,
    reordered or dropped part fails its tag as a tampered one does."""

    def __init__(self, aead, nbytes: int, chunks: int) -> None:
        self.aead = aead
        self.bounds = chunk_bounds(nbytes, chunks)
        self.buf = bytearray(nbytes)
        self._view = memoryview(self.buf)
        self.counter = 0
        self.next_chunk = -1          # -1: no push open (before its header, or after a refusal)

    def open_header(self, sealed) -> bytes:
        """Opens the header of the next push and starts it.

        Raises: InvalidTag if it is not the sender's header of the next push; nothing changes then."""
        header = self.aead.decrypt(nonce(TO_RECEIVER, 0, self.counter + 1), sealed, None)
        self.counter += 1
        self.next_chunk = 0
        return header

    def open_chunk(self, sealed) -> bool:
        """Opens the next chunk of the current push into its place in `buf`; True when it was the
        last (buf then holds the push's plaintext, to apply before the next header).

        Raises: ValueError if no push is open or the chunk's length is wrong; InvalidTag if it was
        tampered with, replayed or reordered. Either way the push is abandoned: its chunks are
        refused until the next header opens, and buf's content is not to be used."""
        i = self.next_chunk
        self.next_chunk = -1
        if i < 0:
            raise ValueError("a chunk outside a push: refused until the next header")
        start, end = self.bounds[i]
        if len(sealed) != end - start + TAG:
            raise ValueError(f"chunk {i} has {len(sealed)} bytes, expected {end - start + TAG}")
        self.aead.decrypt_into(nonce(TO_RECEIVER, i + 1, self.counter), sealed, None,
                               self._view[start:end])
        if i + 1 < len(self.bounds):
            self.next_chunk = i + 1
            return False
        return True

    def abandon(self) -> None:
        """Refuses the rest of the current push (its chunks) until the next header opens."""
        self.next_chunk = -1

    def ack(self) -> bytes:
        """The sealed ack of the current push."""
        return self.aead.encrypt(nonce(TO_SENDER, 0, self.counter), ACK, None)


def payload() -> np.ndarray:
    """The pushed tensor: small integers, so a table of n pushes is exactly n * payload()."""
    return (np.arange(N_FLOATS) % 7).astype(np.float32)


def _refused(fn: Callable[[], object]) -> bool:
    from cryptography.exceptions import InvalidTag
    try:
        fn()
    except (InvalidTag, ValueError):
        return True
    return False


def self_check() -> None:
    """Seals and opens in one process (no socket): a round trip restores the bytes, and a tampered,
    replayed or reordered chunk, or a forged ack, is refused.

    Raises: RuntimeError naming the check that failed."""
    aead = aes_gcm(os.urandom(16))
    data = memoryview(payload()[:1024]).cast("B")
    sealer, opener = ChunkSealer(aead, len(data), 4), ChunkOpener(aead, len(data), 4)

    def push() -> list[bytes]:
        return [sealer.begin(HEADER)] + [bytes(sealer.seal(i, data)) for i in range(4)]

    parts = push()
    done = opener.open_header(parts[0]) == HEADER and [opener.open_chunk(p) for p in parts[1:]]
    checks = {"round trip": done == [False, False, False, True] and opener.buf == data,
              "ack": _refused(lambda: sealer.check_ack(opener.ack())) is False}
    old, parts = parts, push()
    tampered = bytearray(parts[2])
    tampered[7] ^= 1
    opener.open_header(parts[0])
    opener.open_chunk(parts[1])
    checks["tampered chunk refused"] = _refused(lambda: opener.open_chunk(bytes(tampered)))
    checks["rest of a refused push refused"] = _refused(lambda: opener.open_chunk(parts[3]))
    parts = push()
    opener.open_header(parts[0])
    checks["replayed chunk refused"] = _refused(lambda: opener.open_chunk(old[1]))
    parts = push()
    opener.open_header(parts[0])
    checks["reordered chunk refused"] = _refused(lambda: opener.open_chunk(parts[2]))
    checks["forged ack refused"] = _refused(lambda: sealer.check_ack(b"x" * (len(ACK) + TAG)))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise RuntimeError(f"cipher_floor self-check failed: {failed}")


# -- the receiver (its own process) ---------------------------------------------------------------
def receiver() -> None:
    """Reads its case from stdin (JSON), binds a ROUTER, prints its port, applies pushes into a
    float32 table until an empty message, then prints what it applied and whether the table is
    exactly that many payloads."""
    case = json.loads(sys.stdin.readline())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    if case["curve_secret"]:
        sock.curve_secretkey = case["curve_secret"].encode()
        sock.curve_publickey = zmq.curve_public(case["curve_secret"].encode())
        sock.curve_server = True
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    table = np.zeros(N_FLOATS, np.float32)
    sealed = bool(case["key"])
    opener = ChunkOpener(aes_gcm(bytes.fromhex(case["key"])), table.nbytes, case["chunks"]) \
        if sealed else None
    if sealed:
        from cryptography.exceptions import InvalidTag
        refusals: tuple[type[Exception], ...] = (InvalidTag, ValueError)
    applied = refused = 0
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and len(frames[1]) == 0:
            break
        if not sealed:
            if len(frames) != 3 or len(frames[2]) != table.nbytes:
                refused += 1
                sock.send_multipart([frames[0], REFUSED])
                continue
            table += np.frombuffer(frames[2].buffer, np.float32)
            applied += 1
            sock.send_multipart([frames[0], ACK])
            continue
        try:
            if len(frames) == 3:
                opener.open_header(frames[1].buffer)
            elif len(frames) != 2:
                raise ValueError(f"{len(frames) - 1} frames")
            if opener.open_chunk(frames[-1].buffer):
                table += np.frombuffer(opener.buf, np.float32)
                applied += 1
                sock.send_multipart([frames[0], opener.ack()])
        except refusals:
            refused += 1
            opener.abandon()
            sock.send_multipart([frames[0], REFUSED])
    print(json.dumps({"applied": applied, "refused": refused,
                      "table_ok": bool(np.array_equal(table, np.float32(applied) * payload()))}),
          flush=True)
    sock.close()
    ctx.term()


# -- the sender (this process) --------------------------------------------------------------------
def run_case(seconds: float, curve: bool = False, key_bits: int = 0, chunks: int = 1) -> dict:
    """One case: a receiver process, WARMUP pushes, then pushes for `seconds`; GB/s of payload, wall
    and CPU microseconds per push of both processes.

    Raises: RuntimeError if the receiver refused a push or did not apply exactly what was sent."""
    from raw_peer import connect_dealer, cpu_seconds  # beside this script (its directory is on the path)

    public, secret = zmq.curve_keypair() if curve else (b"", b"")
    key = os.urandom(key_bits // 8) if key_bits else b""
    proc = subprocess.Popen([sys.executable, __file__, "--receiver"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    ctx = zmq.Context()
    try:
        proc.stdin.write(json.dumps({"curve_secret": secret.decode(), "key": key.hex(),
                                     "chunks": chunks}).encode() + b"\n")
        proc.stdin.flush()
        port = int(proc.stdout.readline())
        sock = connect_dealer(ctx, port, public)
        tensor = payload()

        def push_plain() -> None:
            sock.send(HEADER, zmq.SNDMORE)
            sock.send(tensor, 0, copy=False)
            if sock.recv() != ACK:
                raise RuntimeError("the receiver refused a plain push")

        if key:
            sealer = ChunkSealer(aes_gcm(key), tensor.nbytes, chunks)
            data = memoryview(tensor).cast("B")

            def push_sealed() -> None:
                # chunk i travels (ZeroMQ's I/O thread) and is opened (the receiver) while this
                # thread seals chunk i + 1: the pipeline that spreads the cipher over both cores
                sock.send(sealer.begin(HEADER), zmq.SNDMORE)
                sock.send(sealer.seal(0, data), 0, copy=False)
                for i in range(1, chunks):
                    sock.send(sealer.seal(i, data), 0, copy=False)
                sealer.check_ack(sock.recv())

        push = push_sealed if key else push_plain
        for _ in range(WARMUP):
            push()
        cpu_s, cpu_r = cpu_seconds(os.getpid()), cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        n = 0
        while n < 5 or time.perf_counter() - t0 < seconds:
            push()
            n += 1
        wall = time.perf_counter() - t0
        cpu_s, cpu_r = cpu_seconds(os.getpid()) - cpu_s, cpu_seconds(proc.pid) - cpu_r
        sock.send(QUIT)
        report = json.loads(proc.stdout.readline())
        sock.close()
    finally:
        ctx.term()
        proc.stdin.close()
        proc.wait(30)
    if report != {"applied": WARMUP + n, "refused": 0, "table_ok": True}:
        raise RuntimeError(f"the receiver applied {report}, expected {WARMUP + n} clean pushes")
    return {"GB_per_s": round(n * tensor.nbytes / wall / 1e9, 3), "pushes": n,
            "wall_us_per_push": round(1e6 * wall / n, 1),
            "sender_cpu_us_per_push": round(1e6 * cpu_s / n, 1),
            "receiver_cpu_us_per_push": round(1e6 * cpu_r / n, 1)}


def _rate(fn: Callable[[], object], nbytes: int, seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return round(n * nbytes / (time.perf_counter() - t0) / 1e9, 3)


def cipher_rates(seconds: float = 0.25) -> dict[str, float]:
    """GB/s of one thread, no I/O: AES-GCM encrypt_into / decrypt_into of the 4 MB tensor whole and
    of a 16th of it, per key length; for scale, a copy and the receiver's add of 4 MB."""
    data = memoryview(payload()).cast("B")
    out: dict[str, float] = {}
    for bits in KEY_BITS:
        aead = aes_gcm(os.urandom(bits // 8))
        for label, size in (("4MB", len(data)), ("chunk_of_16", len(data) // 16)):
            src, sealed, back = data[:size], bytearray(size + TAG), bytearray(size)
            counter = iter(range(1 << 62))
            out[f"aes{bits}_gcm_{label}_encrypt"] = _rate(
                lambda a=aead, s=src, o=sealed, c=counter: a.encrypt_into(nonce(0, 0, next(c)), s, None, o),
                size, seconds)
            aead.encrypt_into(nonce(0, 0, 0), src, None, sealed)
            out[f"aes{bits}_gcm_{label}_decrypt"] = _rate(
                lambda a=aead, s=sealed, b=back: a.decrypt_into(nonce(0, 0, 0), s, None, b), size, seconds)
    table, tensor, copy = np.zeros(N_FLOATS, np.float32), payload(), np.empty(N_FLOATS, np.float32)
    out["numpy_copy_4MB"] = _rate(lambda: np.copyto(copy, tensor), tensor.nbytes, seconds)
    out["numpy_add_4MB"] = _rate(lambda: np.add(table, tensor, out=table), tensor.nbytes, seconds)
    return out


def sealed_cases() -> list[tuple[str, int, int]]:
    return [(f"aes{bits}_gcm_{chunks}_chunk{'s' if chunks > 1 else ''}", bits, chunks)
            for bits in KEY_BITS for chunks in CHUNKS]


def run_round(seconds: float) -> dict:
    """Plain first and last (its mean is the round's baseline), CURVE and every sealed case between."""
    r = {"load_average_before": [round(x, 2) for x in os.getloadavg()],
         "plain_first": run_case(seconds), "curve": run_case(seconds, curve=True)}
    for name, bits, chunks in sealed_cases():
        r[name] = run_case(seconds, key_bits=bits, chunks=chunks)
    r["plain_last"] = run_case(seconds)
    r["cipher_rates_GB_per_s"] = cipher_rates()
    return r


# -- the report ------------------------------------------------------------------------------------
def _med(values: list[float], digits: int = 3) -> dict:
    return {"rounds": values, "median": round(statistics.median(values), digits)}


def _plain(r: dict, field: str) -> float:
    return (r["plain_first"][field] + r["plain_last"][field]) / 2


def accounting(r: dict, best: str, best_bits: int, cores: int) -> dict:
    """One round's CPU accounting of the best sealed case against plain: the cipher's CPU per push
    (encrypt + decrypt of 4 MB at the faster measured rate of its key length), and the lowest wall
    time per push that plain's own CPU plus that could take with every core busy."""
    rates = r["cipher_rates_GB_per_s"]
    rate = {op: max(v for k, v in rates.items() if k.startswith(f"aes{best_bits}_") and k.endswith(op))
            for op in ("encrypt", "decrypt")}
    nbytes = 4 * N_FLOATS
    crypto_us = 1e6 * nbytes / 1e9 * (1 / rate["encrypt"] + 1 / rate["decrypt"])
    plain_wall = _plain(r, "wall_us_per_push")
    plain_cpu = _plain(r, "sender_cpu_us_per_push") + _plain(r, "receiver_cpu_us_per_push")
    best_cpu = r[best]["sender_cpu_us_per_push"] + r[best]["receiver_cpu_us_per_push"]
    floor_wall = max(plain_wall, (plain_cpu + crypto_us) / cores)
    return {"plain_wall_us": round(plain_wall, 1), "plain_cpu_us": round(plain_cpu, 1),
            "cipher_cpu_us": round(crypto_us, 1),
            "cipher_cpu_budget_us_at_target": round(cores * plain_wall / (1 - TARGET_SLOWDOWN) - plain_cpu, 1),
            # plain's CPU plus the cipher's, every core busy for the whole push: no design does better
            "floor_wall_us": round(floor_wall, 1),
            "floor_slowdown": round(1 - plain_wall / floor_wall, 3),
            "best_sealed_wall_us": r[best]["wall_us_per_push"], "best_sealed_cpu_us": round(best_cpu, 1),
            "best_sealed_extra_cpu_us": round(best_cpu - plain_cpu, 1),
            "best_sealed_cpu_beyond_cipher_us": round(best_cpu - plain_cpu - crypto_us, 1),
            # the best design's own CPU, every core busy for the whole push
            "best_sealed_spread_slowdown": round(1 - plain_wall * cores / best_cpu, 3)}


def report(rounds: list[dict], seconds: float) -> dict:
    names = ["curve"] + [name for name, _, _ in sealed_cases()]
    base = [_plain(r, "GB_per_s") for r in rounds]
    cases = {"plain": {"GB_per_s": _med([round(b, 3) for b in base]),
                       "first_and_last_GB_per_s": [[r["plain_first"]["GB_per_s"], r["plain_last"]["GB_per_s"]]
                                                   for r in rounds]}}
    for field in ("wall_us_per_push", "sender_cpu_us_per_push", "receiver_cpu_us_per_push"):
        cases["plain"][field] = _med([round(_plain(r, field), 1) for r in rounds], 1)
    for name in names:
        cases[name] = {"GB_per_s": _med([r[name]["GB_per_s"] for r in rounds]),
                       "slowdown_vs_plain": _med([round(1 - r[name]["GB_per_s"] / b, 3)
                                                  for r, b in zip(rounds, base)])}
        for field in ("wall_us_per_push", "sender_cpu_us_per_push", "receiver_cpu_us_per_push"):
            cases[name][field] = _med([r[name][field] for r in rounds], 1)
    best = max(names[1:], key=lambda n: cases[n]["GB_per_s"]["median"])
    best_bits = next(bits for name, bits, _ in sealed_cases() if name == best)
    cores = os.cpu_count() or 1
    per_round = [accounting(r, best, best_bits, cores) for r in rounds]
    return {
        "command": "python benchmarks/cipher_floor.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(), "seconds_per_case": seconds, "rounds": len(rounds),
        "self_check": "passed: round trip, tampered/replayed/reordered chunk and forged ack refused",
        "load_average_before_rounds": [r["load_average_before"] for r in rounds],
        "cases": cases,
        "best_sealed": best,
        "cipher_rates_GB_per_s": {k: _med([r["cipher_rates_GB_per_s"][k] for r in rounds])
                                  for k in rounds[0]["cipher_rates_GB_per_s"]},
        "cpu_accounting_us_per_push": {
            "cores": cores, "target_slowdown": TARGET_SLOWDOWN, "best_sealed": best,
            **{k: _med([a[k] for a in per_round], 3 if k.endswith("slowdown") else 1) for k in per_round[0]}},
        "per_round": rounds,
    }


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    from cryptography import __version__ as cryptography_version
    from cryptography.hazmat.backends.openssl import backend
    return {"cpu_model": model, "cores": os.cpu_count(),
            "flags": {f: f in flags for f in ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx2")},
            "openssl": backend.openssl_version_text(), "cryptography": cryptography_version,
            "libzmq": zmq.zmq_version(), "pyzmq": zmq.__version__,
            "shared": "other jobs may run at the same time (see load_average_before_rounds): "
                      "compare within a round"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="time per case")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--out", default="benchmarks/results/cipher_floor.json")
    p.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    if args.receiver:
        receiver()
        return
    self_check()
    rounds = [run_round(args.seconds) for _ in range(args.rounds)]
    result = report(rounds, args.seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
