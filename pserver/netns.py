"""Separate network hosts on one Linux machine, for multi-host tests and benchmarks: network
namespaces joined by veth pairs to a bridge, one /24 of documentation addresses per LAN, links
shaped with `tc` (root only). Everything made is removed on exit. docs/networks.md."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from .errors import ConfigError

# RFC 5737 documentation ranges: never routed, so a test cannot send traffic to a real host
ALLOWED_NETS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.0/24"))


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the `ip` and `tc` commands (Debian's iproute2) are missing"
    return None


def delay_available() -> str | None:
    """None if links can be delayed here (Hosts.delay), else why not."""
    import importlib.util

    if available() is not None:
        return available()
    if shutil.which("iptables") is None:
        return "link delay needs iptables (Debian's iptables package)"
    if importlib.util.find_spec("netfilterqueue") is None:
        return ("link delay needs the NetfilterQueue package: apt-get install libnetfilter-queue-dev, "
                "then pip install 'pserver[netem]'")
    return None


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip()}")


class Hosts:
    """Hosts (namespaces) on one or more LANs. ``add_lan(net)`` makes a bridge for a /24 of the
    documentation ranges; ``add_host(name, {lan: last_octet})`` a namespace with one interface per
    LAN, named after the LAN. ``argv(host, cmd)`` runs a command inside a host.

    Raises ConfigError for an address outside the documentation ranges, OSError if `ip` fails
    (whatever was made so far is removed by ``close``)."""

    def __init__(self, tag: str = "pst", mtu: int | None = None) -> None:
        self.prefix = f"{tag}{os.getpid() % 100000}"
        self.mtu = mtu   # of every link and bridge (None: the kernel's 1500)
        self.switch = f"{self.prefix}-sw"
        self.nets: dict[str, ipaddress.IPv4Network] = {}
        self.hosts: dict[str, dict[str, str]] = {}   # host -> {lan: address}
        self._ports: dict[tuple[str, str], str] = {}  # (host, lan) -> switch-side veth
        self._made: list[str] = []
        self._delays: dict[str, subprocess.Popen] = {}  # host -> its pserver.netdelay process
        self._rules: dict[str, list[tuple[str, ...]]] = {}  # host -> iptables rules of cut/lose

    def __enter__(self) -> Hosts:
        _run("ip", "netns", "add", self.switch)
        self._made.append(self.switch)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def add_lan(self, lan: str, net: str) -> None:
        network = ipaddress.ip_network(net)
        if not any(network.subnet_of(a) for a in ALLOWED_NETS):
            raise ConfigError(f"LAN {net}: use a subnet of {', '.join(map(str, ALLOWED_NETS))}")
        self.nets[lan] = network
        _run("ip", "-n", self.switch, "link", "add", f"br-{lan}",
             *(("mtu", str(self.mtu)) if self.mtu else ()), "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", f"br-{lan}", "up")

    def add_host(self, host: str, addresses: dict[str, int]) -> dict[str, str]:
        """A namespace with an interface named ``lan`` on each LAN, at host number ``n`` there."""
        ns = self.ns(host)
        _run("ip", "netns", "add", ns)
        self._made.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        out = {}
        for lan, n in addresses.items():
            addr = str(self.nets[lan].network_address + n)
            port = f"{self.prefix[-6:]}{len(self._ports)}"   # interface names: at most 15 bytes
            mtu = ("mtu", str(self.mtu)) if self.mtu else ()
            _run("ip", "link", "add", lan, "netns", ns, *mtu, "type", "veth", "peer", "name", port,
                 *mtu, "netns", self.switch)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/{self.nets[lan].prefixlen}", "dev", lan)
            _run("ip", "-n", ns, "link", "set", lan, "up")
            _run("ip", "-n", self.switch, "link", "set", port, "master", f"br-{lan}")
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            self._ports[(host, lan)] = port
            out[lan] = addr
        self.hosts[host] = out
        return out

    def argv(self, host: str, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *cmd]

    def shape(self, host: str, lan: str, rate: str | None) -> None:
        """Limit what ``host`` receives on ``lan`` to ``rate`` (tc units, e.g. "100mbit"), with a
        token bucket on the switch side of its link; None removes the limit."""
        port = self._ports[(host, lan)]
        subprocess.run(["ip", "netns", "exec", self.switch, "tc", "qdisc", "del", "dev", port,
                        "root"], capture_output=True)
        if rate is not None:
            _run("ip", "netns", "exec", self.switch, "tc", "qdisc", "add", "dev", port, "root",
                 "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")

    def delay(self, host: str, ms: float | None, timeout: float = 30.0) -> None:
        """Delay every packet ``host`` receives on its LANs by ``ms`` milliseconds (a round trip
        between two delayed hosts then takes twice that), with an iptables NFQUEUE rule and a
        pserver.netdelay process in the host: this kernel has no netem. None removes the delay.

        Raises OSError if iptables or the queue process cannot start (nothing is left delayed)."""
        ns = self.ns(host)
        old = self._delays.pop(host, None)
        if old is not None:
            subprocess.run(["ip", "netns", "exec", ns, "iptables", "-F", "INPUT"], capture_output=True)
            old.terminate()
            old.wait(10)
        if ms is None:
            return
        if shutil.which("iptables") is None:
            raise OSError("link delay needs iptables (Debian's iptables package)")
        ready = f"/tmp/{ns}-delay-ready"
        if os.path.exists(ready):
            os.unlink(ready)
        proc = subprocess.Popen(self.argv(host, [sys.executable, "-m", "pserver.netdelay", "--queue", "0",
                                                 "--delay-ms", str(ms), "--ready-file", ready]),
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise OSError(f"the delay process of {host} did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.02)
        os.unlink(ready)
        self._delays[host] = proc
        done = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "!", "-i", "lo",
                               "-j", "NFQUEUE", "--queue-num", "0"], capture_output=True, text=True)
        if done.returncode:
            self.delay(host, None)
            raise OSError(f"iptables in {host}: {done.stderr.strip()}")

    def cut(self, host: str, peers: Sequence[str]) -> None:
        """Partition ``host`` from each host of ``peers``: every packet between them is dropped,
        both ways, by iptables rules inside ``host`` (links stay up, so TCP connections stall
        rather than reset, as across a failed switch). ``heal(host)`` removes them.

        Raises OSError if iptables fails (the rules added so far stay, for heal/close)."""
        for peer in peers:
            for addr in self.hosts[peer].values():
                self._rule(host, "INPUT", "-s", addr, "-j", "DROP")
                self._rule(host, "OUTPUT", "-d", addr, "-j", "DROP")

    def lose(self, host: str, probability: float) -> None:
        """Drop each packet ``host`` receives or sends on its LANs with ``probability`` (iptables'
        statistic match: this kernel has no netem). ``heal(host)`` removes it.

        Raises ValueError unless 0 < probability < 1; OSError if iptables fails."""
        if not 0 < probability < 1:
            raise ValueError(f"packet loss must be a probability in (0, 1), got {probability}")
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            for lan in self.hosts[host]:
                self._rule(host, chain, way, lan, "-m", "statistic", "--mode", "random",
                           "--probability", f"{probability:g}", "-j", "DROP")

    def heal(self, host: str) -> None:
        """Remove every rule ``cut`` and ``lose`` added in ``host``."""
        for rule in self._rules.pop(host, []):
            subprocess.run(["ip", "netns", "exec", self.ns(host), "iptables", "-D", *rule],
                           capture_output=True)

    def _rule(self, host: str, chain: str, *match: str) -> None:
        if shutil.which("iptables") is None:
            raise OSError("partitions and packet loss need iptables (Debian's iptables package)")
        _run("ip", "netns", "exec", self.ns(host), "iptables", "-I", chain, *match)
        self._rules.setdefault(host, []).append((chain, *match))

    def close(self) -> None:
        """Delete every namespace made (their veths and bridges go with them)."""
        for host in list(self._rules):
            self.heal(host)
        for host in list(self._delays):
            self.delay(host, None)
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)
