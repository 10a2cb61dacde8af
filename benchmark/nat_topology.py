"""Home networks behind NAT routers, built from network namespaces (root only).

    internet: bridge mlnatbr0 (10.214.0.0/24), the test process at .254
      ├─ mlnat-pub  10.214.0.10             the public node (a head)
      ├─ mlnat-r1   10.214.0.11 ── 192.168.11.1   home router: MASQUERADE, no inbound
      │    └─ mlnat-h1   192.168.11.2        a home node
      └─ mlnat-r2   10.214.0.12 ── 192.168.12.1   a second home router
           └─ mlnat-h2   192.168.12.2        another home node

A home node reaches the internet through its router; nothing reaches a home node from outside
(the router drops new inbound connections, and nobody outside has a route to its subnet).
Used by ``tests/test_nat.py`` and ``benchmark/nat.py`` (which sends a home's connections through
an emulated link with :func:`redirect`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

BRIDGE = "mlnatbr0"
INTERNET = "10.214.0"
PUBLIC_NS = "mlnat-pub"
PUBLIC_HOST = f"{INTERNET}.10"
HOMES = {  # home namespace -> (router namespace, router's internet address, home subnet)
    "mlnat-h1": ("mlnat-r1", f"{INTERNET}.11", "192.168.11"),
    "mlnat-h2": ("mlnat-r2", f"{INTERNET}.12", "192.168.12"),
}


def home_host(home: str) -> str:
    """The private address of the node in ``home``."""
    return f"{HOMES[home][2]}.2"


def router_of(home: str) -> str:
    """The namespace of ``home``'s router."""
    return HOMES[home][0]


def router_lan(home: str) -> str:
    """The address of ``home``'s router on its home network."""
    return f"{HOMES[home][2]}.1"


def router_wan(home: str) -> str:
    """The address of ``home``'s router on the internet."""
    return HOMES[home][1]


def redirect(home: str, host: str, port: int, to_port: int) -> None:
    """Send ``home``'s connections to ``host:port`` to port ``to_port`` of its router instead
    (a link emulator there, which connects on to ``host:port`` from the router)."""
    _in(
        router_of(home),
        "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "lan", "-p", "tcp", "-d", host,
        "--dport", str(port), "-j", "DNAT", "--to-destination", f"{router_lan(home)}:{to_port}",
    )  # fmt: skip


def open_port(home: str, port: int) -> None:
    """Let the internet connect to ``port`` on ``home``'s router (a port forward's front)."""
    _in(
        router_of(home),
        "iptables", "-I", "INPUT", "-i", f"mlnwan{list(HOMES).index(home) + 1}", "-p", "tcp",
        "--dport", str(port), "-j", "ACCEPT",
    )  # fmt: skip


def why_unavailable() -> str | None:
    """Why NAT namespaces can't be built here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 iptables)"
    probe = "mlnat-probe"  # can this kernel make a namespace with a NAT table in it?
    try:
        _run("ip", "netns", "add", probe)
        _in(probe, "iptables", "-t", "nat", "-L", "-n")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"network namespaces with NAT don't work here ({e})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _in(ns: str, *cmd: str) -> None:
    _run("ip", "netns", "exec", ns, *cmd)


def _plug(ns: str, name: str, address: str) -> None:
    """A veth from the internet bridge into ``ns`` as ``name`` with ``address``/24."""
    outside = f"{name}o"
    _run("ip", "link", "add", outside, "type", "veth", "peer", "name", name)
    _run("ip", "link", "set", outside, "master", BRIDGE, "up")
    _run("ip", "link", "set", name, "netns", ns)
    _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", name)
    _run("ip", "-n", ns, "link", "set", name, "up")


def _remove() -> None:
    for ns in [PUBLIC_NS, *HOMES, *(router for router, _, _ in HOMES.values())]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    # A namespace's veths go with it, but the kernel may take a moment: delete the outer ends.
    for veth in ("mlnpubo", *(f"mlnwan{i}o" for i in range(1, len(HOMES) + 1))):
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@contextlib.contextmanager
def nat_topology() -> Iterator[None]:
    """Build the namespaces above; remove them (and everything in them) afterwards."""
    _remove()  # left over from a run that was killed
    try:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{INTERNET}.254/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        _run("ip", "netns", "add", PUBLIC_NS)
        _run("ip", "-n", PUBLIC_NS, "link", "set", "lo", "up")
        _plug(PUBLIC_NS, "mlnpub", PUBLIC_HOST)
        for i, (home, (router, wan_address, subnet)) in enumerate(HOMES.items(), start=1):
            _run("ip", "netns", "add", router)
            _run("ip", "netns", "add", home)
            for ns in (router, home):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            _plug(router, f"mlnwan{i}", wan_address)
            _run("ip", "-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "up0")
            _run("ip", "-n", router, "link", "set", "up0", "netns", home)
            _run("ip", "-n", router, "addr", "add", f"{subnet}.1/24", "dev", "lan")
            _run("ip", "-n", router, "link", "set", "lan", "up")
            _run("ip", "-n", home, "addr", "add", f"{subnet}.2/24", "dev", "up0")
            _run("ip", "-n", home, "link", "set", "up0", "up")
            _run("ip", "-n", home, "route", "add", "default", "via", f"{subnet}.1")
            _in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            wan = f"mlnwan{i}"
            _in(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE")
            _in(router, "iptables", "-P", "FORWARD", "DROP")
            _in(router, "iptables", "-A", "FORWARD", "-i", "lan", "-o", wan, "-j", "ACCEPT")
            _in(
                router,
                "iptables", "-A", "FORWARD", "-i", wan, "-o", "lan",
                "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT",
            )  # fmt: skip
            _in(
                router,
                "iptables",
                "-A",
                "INPUT",
                "-i",
                wan,
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            )  # fmt: skip  (the router's own connections out)
            _in(router, "iptables", "-A", "INPUT", "-i", wan, "-j", "DROP")  # nothing inbound
        yield
    finally:
        _remove()
