"""Throwaway network namespaces for tests that need a second "host".

:func:`netns_pair` makes a namespace named ``engine-test-<random>`` joined to the
root namespace by a veth pair on a private /30 from ``10.213.x.0`` (``.1`` on our
side, ``.2`` inside), and removes both again whatever happens in between.  Traffic
therefore only ever goes to addresses these tests created on this machine.

    ok, reason = netns_available()
    if not ok:
        pytest.skip(reason)
    with netns_pair() as pair:
        subprocess.run(pair.exec_argv(["ip", "addr"]))

Needs root and iproute2's ``ip``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence

#: Every namespace made here is named with this prefix.
NS_PREFIX = "engine-test-"

#: The test subnets are 10.213.x.0/30 for x in 0..255.
SUBNET_BASE = ipaddress.IPv4Network("10.213.0.0/16")
PREFIX_LEN = 30

#: Seconds any one `ip` invocation may take.
IP_TIMEOUT = 20


class NetnsError(RuntimeError):
    """An `ip` command failed while building or probing a namespace."""


@dataclasses.dataclass(frozen=True)
class NetnsPair:
    """A namespace ``ns_name`` reachable at ``ns_ip`` from ``host_ip`` in the root
    namespace (and back), over veth interfaces ``host_if`` / ``ns_if``."""

    ns_name: str
    host_ip: str
    ns_ip: str
    host_if: str
    ns_if: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.ns_name, *argv]


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True,
                              timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.213.x.0/30 that no interface in the root namespace uses yet."""
    used = set()
    for line in _ip("-o", "-4", "addr", "show").splitlines():
        fields = line.split()
        if "inet" in fields:
            net = ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network
            if net.subnet_of(SUBNET_BASE):
                first = int(net.network_address) >> 8 & 0xFF
                last = int(net.broadcast_address) >> 8 & 0xFF
                used.update(range(first, last + 1))
    free = [x for x in range(256) if x not in used]
    if not free:
        raise NetnsError("every 10.213.x.0/30 test subnet is in use")
    x = random.choice(free)
    return ipaddress.IPv4Network(f"10.213.{x}.0/{PREFIX_LEN}")


def _kill_namespace_processes(ns_name: str) -> None:
    # Processes a test started inside its namespace and left behind; they keep the
    # namespace (and its addresses) alive after `ip netns del` otherwise.
    try:
        pids = _ip("netns", "pids", ns_name).split()
    except NetnsError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _teardown(ns_name: str, host_if: str) -> None:
    _kill_namespace_processes(ns_name)
    with contextlib.suppress(NetnsError):
        _ip("netns", "del", ns_name)
    # Deleting the namespace removes the pair only once the kernel has torn the
    # namespace down, which happens asynchronously: delete our end explicitly.
    with contextlib.suppress(NetnsError):
        _ip("link", "del", host_if)


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Create a namespace plus veth pair, yield it, and always remove both."""
    suffix = secrets.token_hex(4)
    ns_name = f"{NS_PREFIX}{suffix}"
    host_if, ns_if = f"et{suffix}h", f"et{suffix}n"      # at most 15 characters
    subnet = _free_subnet()
    host_ip, ns_ip = (str(a) for a in subnet.hosts())
    try:
        _ip("netns", "add", ns_name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if,
            "netns", ns_name)
        _ip("addr", "add", f"{host_ip}/{PREFIX_LEN}", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns_name, "addr", "add", f"{ns_ip}/{PREFIX_LEN}", "dev", ns_if)
        _ip("-n", ns_name, "link", "set", ns_if, "up")
        _ip("-n", ns_name, "link", "set", "lo", "up")
        yield NetnsPair(ns_name, host_ip, ns_ip, host_if, ns_if)
    finally:
        _teardown(ns_name, host_if)


def netns_available() -> tuple[bool, str]:
    """Whether :func:`netns_pair` works here, found by trying it; the reason when
    not (ready for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "the ip tool (iproute2) is not installed"
    try:
        with netns_pair() as pair:
            done = subprocess.run(pair.exec_argv(["true"]), capture_output=True,
                                  text=True, timeout=IP_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise NetnsError(f"ip netns exec: {done.stderr.strip()}")
    except NetnsError as exc:
        return False, f"cannot create a network namespace: {exc}"
    return True, ""
