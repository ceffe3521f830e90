"""What already uses the loopback network here: free sandbox subnets, endpoints that answer.

Light on purpose (standard library only): the CLI asks :func:`sandbox_not_running` before
its first EC2 call, and that must work without moto installed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Collection, Iterable
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
#: sandbox instances get .4, .5, … of their /24 (EC2 keeps .1-.3 of a subnet); a node's
#: sshd listening at one of the first PROBE_HOSTS of them means another sandbox owns it
PROBE_HOSTS = range(4, 28)
_PROC_NET = ("tcp", "udp", "tcp6", "udp6")
#: a TCP connection that has ended and only waits out its timer (st 06 in /proc/net/tcp):
#: nothing uses its addresses any more (an ssh to a stopped sandbox's node leaves one
#: for a minute, which must not move the restarted sandbox to another /24)
_TIME_WAIT = "06"


def _proc_address(field: str) -> ipaddress.IPv4Address | None:
    """An address as /proc/net prints it (native-endian 32-bit words in hex), if IPv4."""
    text = field.split(":")[0]
    raw = b"".join(struct.pack("=I", int(text[i:i + 8], 16)) for i in range(0, len(text), 8))
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    v6 = ipaddress.IPv6Address(raw)
    # a dual-stack wildcard listener (::) accepts IPv4 connections on every address too
    return ipaddress.IPv4Address(0) if v6 == ipaddress.IPv6Address(0) else v6.ipv4_mapped


def sockets_in_use(proc_net: Path = Path("/proc/net")) -> list[tuple[ipaddress.IPv4Address, int]]:
    """(address, port) of every local and remote end of this network namespace's sockets
    (ended TCP connections in TIME_WAIT left out)."""
    ends: list[tuple[ipaddress.IPv4Address, int]] = []
    for name in _PROC_NET:
        try:
            lines = (proc_net / name).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if name.startswith("tcp") and fields[3:4] == [_TIME_WAIT]:
                continue
            for field in fields[1:3]:
                address = _proc_address(field)
                if address is not None:
                    ends.append((address, int(field.split(":")[1], 16)))
    return ends


def _answers(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def subnet_in_use(subnet: ipaddress.IPv4Network,
                  ends: Iterable[tuple[ipaddress.IPv4Address, int]]) -> bool:
    """Whether a socket uses an address of `subnet`, or an sshd answers at one of its
    first instance addresses (unless something listens on every address's port 22, which
    would make every subnet look taken)."""
    ends = list(ends)
    if any(address in subnet for address, _ in ends):
        return True
    if any(address == ipaddress.IPv4Address(0) and port == 22 for address, port in ends):
        return False
    return any(_answers(str(subnet[host]), 22, 0.05) for host in PROBE_HOSTS)


def free_subnet(network: str, taken: Collection[str] = (),
                ends: Iterable[tuple[ipaddress.IPv4Address, int]] | None = None,
                ) -> ipaddress.IPv4Network:
    """The first /24 of `network` (inside 127.0.0.0/8) that nothing on this machine uses
    and that is not in `taken`; raises LookupError naming the network when all are busy."""
    vpc = ipaddress.IPv4Network(network)
    ends = sockets_in_use() if ends is None else list(ends)
    for subnet in vpc.subnets(new_prefix=max(vpc.prefixlen, 24)):
        if str(subnet) not in taken and not subnet_in_use(subnet, ends):
            return subnet
    raise LookupError(f"every /24 of {vpc} already has loopback addresses in use: "
                      "pass another --network inside 127.0.0.0/8")


def is_loopback_endpoint(url: str) -> bool:
    """Whether an endpoint URL points at this machine (a sandbox or another local server)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _answers(parts.hostname or "", port, timeout)


def sandbox_not_running(config_path: str | Path, endpoint_url: str | None) -> str | None:
    """The one-line error for a config whose local endpoint is gone (a stale sandbox.json),
    or None when the endpoint is not local or answers.

    Without it, botocore retries a closed port for many seconds and ends in an
    EndpointConnectionError that does not say what to do.
    """
    if not endpoint_url or not is_loopback_endpoint(endpoint_url) \
            or endpoint_answers(endpoint_url):
        return None
    folder = Path(config_path).parent
    start = "python -m disposabledisco sandbox"
    if folder.resolve() != (Path.cwd() / "sandbox").resolve():
        start += f" --dir {folder}"
    return (f"{config_path}: nothing answers at the EC2 endpoint {endpoint_url}: the "
            f"sandbox is not running; start it with `{start}` (it rewrites this config) "
            "and run again")
