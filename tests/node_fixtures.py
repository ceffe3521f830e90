"""Pytest fixtures for real local SSH nodes (see disposabledisco/sandbox/nodes.py).

Load with ``pytest_plugins = ["tests.node_fixtures"]`` (or ``-p tests.node_fixtures``).

* ``client_key`` (session): an ed25519 key pair generated once, ``.path`` / ``.public``.
* ``node_farm`` (session): a :class:`NodeFarm` whose nodes accept ``client_key``; the
  test is skipped with the reason when the machine cannot run nodes (not root, no sshd,
  no overlayfs…).
* ``start_nodes`` (function): ``start_nodes(n) -> list[Node]`` starts ``n`` nodes on free
  ``127.10.0.x`` addresses with fresh instance ids, and stops them after the test.
* ``ssh_gateway_factory`` (function): builds an ``SshGateway`` for the farm's nodes with a
  per-test state dir and log dir; ``ssh_gateway_factory(policy="pin", **settings)``.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from disposabledisco.sandbox.nodes import (
    AddressInUse,
    Node,
    NodeFarm,
    generate_ed25519_key,
    taken_addresses,
)

SUBNET = "127.10.0"
_FIRST_HOST = 4  # like an EC2 subnet: .1-.3 are reserved


@dataclass(frozen=True)
class ClientKey:
    """The test client's key pair: private key file and ``ssh-ed25519 …`` public line."""

    path: Path
    public: str


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    """An ed25519 key pair generated once per test session."""
    directory = tmp_path_factory.mktemp("client-key")
    private, public = generate_ed25519_key("disposabledisco-tests")
    path = directory / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private)
    (directory / "id_ed25519.pub").write_text(public + "\n")
    return ClientKey(path, public)


@pytest.fixture(scope="session")
def node_farm(client_key: ClientKey) -> Iterator[NodeFarm]:
    """A farm of real sshd nodes for the whole session (skips when unsupported)."""
    ok, reason = NodeFarm.available()
    if not ok:
        pytest.skip(f"real SSH nodes unavailable: {reason}")
    with NodeFarm(client_key.public, login_user="ubuntu") as farm:
        yield farm


_ids = itertools.count(1)
_ids_lock = threading.Lock()


def next_instance_id() -> str:
    """A fresh EC2-looking instance id, unique within the test session."""
    with _ids_lock:
        n = next(_ids)
    return f"i-{os.getpid():08x}{n:09x}"


def candidate_addresses(subnet: str = SUBNET) -> list[str]:
    """The usable host addresses of a /24 loopback subnet, EC2 style (from .4)."""
    return [f"{subnet}.{host}" for host in range(_FIRST_HOST, 255)]


def free_addresses(count: int, subnet: str = SUBNET) -> list[str]:
    """The first ``count`` addresses of ``subnet`` that no node of any farm on this machine
    has and where no process listens on port 22 (fewer when the /24 is that full)."""
    taken = taken_addresses()
    return [a for a in candidate_addresses(subnet) if a not in taken][:count]


def start_n_nodes(farm: NodeFarm, count: int, subnet: str = SUBNET) -> list[Node]:
    """Start ``count`` nodes at once on free addresses of ``subnet``, skipping addresses
    that a node of any farm on this machine has (another engineer's test run) or where a
    process of the machine listens on port 22."""
    for _ in range(5):
        addresses = free_addresses(count, subnet)
        if len(addresses) < count:
            raise RuntimeError(f"not {count} free addresses left in {subnet}.0/24")
        try:
            return farm.start_many((next_instance_id(), a) for a in addresses)
        except AddressInUse:  # lost a race with another farm: look again
            continue
    raise RuntimeError(f"could not find {count} free addresses in {subnet}.0/24")


@pytest.fixture
def start_nodes(node_farm: NodeFarm) -> Iterator[Callable[..., list[Node]]]:
    """``start_nodes(n, subnet="127.10.0")`` -> nodes, all stopped after the test."""
    mine: list[Node] = []

    def start(count: int = 1, subnet: str = SUBNET) -> list[Node]:
        nodes = start_n_nodes(node_farm, count, subnet)
        mine.extend(nodes)
        return nodes

    yield start
    for node in mine:
        node_farm.stop(node.instance_id)


@pytest.fixture
def ssh_gateway_factory(
    client_key: ClientKey, tmp_path: Path
) -> Iterator[Callable[..., object]]:
    """Builds ``SshGateway``s that log in to farm nodes with ``client_key``.

    ``factory(policy="pin", console_output=None, state_dir=None, **settings)``; every
    gateway shares this test's state dir (pins) unless one is given, and is closed after
    the test.
    """
    from disposabledisco.hostkeys import HostKeyStore, HostKeyVerifier
    from disposabledisco.ssh import SshGateway, SshSettings

    made: list[SshGateway] = []

    def factory(policy: str = "pin", console_output: Callable[[str], object] | None = None,
                state_dir: Path | None = None, **settings: object) -> SshGateway:
        store = HostKeyStore(state_dir or tmp_path / "state")
        verifier = HostKeyVerifier(policy, store, console_output)  # type: ignore[arg-type]
        options: dict[str, object] = {
            "user": "ubuntu", "key_file": str(client_key.path), "connect_timeout": 5.0,
            "deadline_seconds": 20.0, "concurrency": 8, "log_dir": tmp_path / "logs",
        }
        options.update(settings)
        gateway = SshGateway(SshSettings(**options), verifier)  # type: ignore[arg-type]
        made.append(gateway)
        return gateway

    yield factory
    for gateway in made:
        gateway.close()
