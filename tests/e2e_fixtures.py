"""Pytest fixtures for end-to-end runs: local EC2 endpoint + spot market + real SSH nodes.

Registered from ``tests/conftest.py``. The ``e2e`` fixture (module scope) yields an
:class:`E2eEnv` ``(new_config, client, farm, market, endpoint)``:

* ``new_config(tag_key, slaves, **overrides)`` makes a cluster of its own — a fresh
  loopback subnet (so its nodes never collide with another cluster's or another test
  run's ``127.10.0.x`` nodes), its own ``TAG_KEY`` and ``STATE_DIR`` — and returns a
  :class:`ClusterConfig`, a callable that (re)writes the config file with overrides and
  returns its path;
* ``client`` is a boto3 EC2 client for the endpoint (for assertions and for what an
  operator or AWS would do behind the tool's back, like terminating an instance);
* ``farm`` is the :class:`NodeFarm` whose sshd nodes the market starts for every launched
  instance (``market.on_launch``) and stops on termination (``market.on_terminate``);
* ``market`` is the :class:`SpotMarket`, ticking in the background with a short
  fulfilment delay, so ``up --wait`` sees the real open → active life cycle quickly;
* ``endpoint`` is the :class:`LocalEc2` server (``set_http_hook(..., slot="test")``
  counts the EC2 calls a pass makes, as the server sees them).

The module is skipped with the reason when this machine cannot run real SSH nodes
(not root, no sshd, no overlayfs…) or has no ``erl`` for the Erlang checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from disposabledisco.config import load_config
from disposabledisco.sandbox.endpoint import LocalEc2
from disposabledisco.sandbox.loopback import subnet_in_use
from disposabledisco.sandbox.market import SpotMarket
from disposabledisco.sandbox.nodes import NodeFarm, generate_ed25519_key, loopback_ends
from disposabledisco.sandbox.run import SandboxOptions, sandbox_config

#: third octets of 127.10.X.0/24 tried for clusters; 127.10.0.x is the default of the
#: sandbox and of the node fixtures that other test runs on this machine may be using
SUBNET_OCTETS = range(100, 250)
#: simulated seconds before a spot request is fulfilled (small: passes stay quick)
FULFIL_DELAY = 0.3
TICK_SECONDS = 0.2


def free_subnet(taken: set[int]) -> int:
    """A third octet of 127.10.X.0/24 that nothing on this machine uses (the sandbox's own
    test, `subnet_in_use`), tried from a start the pid picks so that concurrent runs
    rarely race for the same one."""
    octets = list(SUBNET_OCTETS)
    start = random.Random(os.getpid()).randrange(len(octets))
    ends = loopback_ends()
    for octet in octets[start:] + octets[:start]:
        if octet not in taken and not subnet_in_use(IPv4Network(f"127.10.{octet}.0/24"), ends):
            return octet
    raise RuntimeError("no free 127.10.X.0/24 subnet for an end-to-end cluster")


@dataclass
class ClusterConfig:
    """One cluster's config file. Call it with key overrides to rewrite the file (0600,
    as the tool wants files that hold AWS keys) and get its path."""

    path: Path
    values: dict[str, Any]
    subnet: str
    key_file: Path

    def __call__(self, **overrides: Any) -> Path:
        self.values.update(overrides)
        text = json.dumps({k: v for k, v in self.values.items() if v is not None}, indent=1)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        return self.path

    @property
    def tag_key(self) -> str:
        return str(self.values["TAG_KEY"])

    @property
    def state_dir(self) -> Path:
        """The cluster's own folder under STATE_DIR (pins, logs, lock), as the tool names it."""
        return load_config(self.path).state_dir

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


class E2eEnv(NamedTuple):
    """What the ``e2e`` fixture yields (unpack it or use the names)."""

    new_config: Any  # Callable[..., ClusterConfig]
    client: Any
    farm: NodeFarm
    market: SpotMarket
    endpoint: LocalEc2


def e2e_unavailable() -> str | None:
    """Why end-to-end clusters cannot run here, or None."""
    ok, reason = NodeFarm.available()
    if not ok:
        return f"real SSH nodes unavailable: {reason}"
    if shutil.which("erl") is None:
        return "no erl on this machine (apt-get install -y erlang-nox): nodes need Erlang"
    return None


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2eEnv]:
    """Endpoint, market and farm for one test module; clusters are made with new_config."""
    reason = e2e_unavailable()
    if reason:
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as patch:
        # the configs name endpoint and keys; nothing from the caller's AWS setup may
        # interfere (a missing AWS_PROFILE would break every boto3 session)
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                     "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield from _e2e_env(tmp_path_factory)


def _e2e_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2eEnv]:
    root = tmp_path_factory.mktemp("e2e")
    private, public = generate_ed25519_key("disposabledisco-e2e")
    key_file = root / "id_ed25519"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(private)
    market = SpotMarket(seed=7, fulfil_delay=FULFIL_DELAY)
    farm = NodeFarm(authorized_key=public, workdir=root / "nodes")
    market.on_launch(farm.on_launch)
    market.on_terminate(farm.on_terminate)
    endpoint = LocalEc2(market=market)
    taken: set[int] = set()

    def new_config(tag_key: str, slaves: int, **overrides: Any) -> ClusterConfig:
        octet = free_subnet(taken)
        taken.add(octet)
        network = endpoint.setup_loopback_network(subnet=f"127.10.{octet}.0/24",
                                                  public_key=public)
        directory = root / tag_key
        directory.mkdir(mode=0o700)
        values = sandbox_config(endpoint, network, key_file, public,
                                SandboxOptions(directory, slaves=slaves))
        values.update(TAG_KEY=tag_key, STATE_DIR=str(directory / "state"))
        config = ClusterConfig(directory / "config.json", values, f"127.10.{octet}", key_file)
        config(**overrides)
        return config

    try:
        endpoint.start()
        # moto's state is process-wide: a module right after another e2e module would see
        # its instances (and the market, seeded alike, makes the same ids again)
        endpoint.reset()
        market.background(TICK_SECONDS)
        yield E2eEnv(new_config, endpoint.client(), farm, market, endpoint)
    finally:
        with contextlib.suppress(Exception):
            market.stop()
        with contextlib.suppress(Exception):
            endpoint.stop()
        farm.close()


def terminate_cluster(client: Any, tag_key: str) -> None:
    """Cancel the cluster's requests and terminate its instances (their nodes stop)."""
    requests = client.describe_spot_instance_requests(
        Filters=[{"Name": "tag-key", "Values": [tag_key]}])["SpotInstanceRequests"]
    open_ids = [r["SpotInstanceRequestId"] for r in requests
                if r["State"] in ("open", "active")]
    if open_ids:
        client.cancel_spot_instance_requests(SpotInstanceRequestIds=open_ids)
    ids = {r["InstanceId"] for r in requests if r.get("InstanceId")}
    for reservation in client.describe_instances(
            Filters=[{"Name": "tag-key", "Values": [tag_key]}])["Reservations"]:
        ids.update(i["InstanceId"] for i in reservation["Instances"])
    if ids:
        client.terminate_instances(InstanceIds=sorted(ids))
