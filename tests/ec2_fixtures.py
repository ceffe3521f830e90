"""pytest fixtures for a local EC2 endpoint (moto over HTTP on loopback) and the spot market.

Registered from ``tests/conftest.py`` with ``pytest_plugins``. Tests talk to the endpoint
through boto3 over real HTTP, exactly as the project's EC2 gateway does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from disposabledisco.sandbox.endpoint import LocalEc2
from disposabledisco.sandbox.market import SpotMarket


@dataclass(frozen=True)
class Ec2Env:
    """What a test needs to use the local endpoint: its URL and the sandbox network ids."""

    endpoint: LocalEc2
    url: str
    region: str
    vpc_id: str
    subnet_id: str
    security_group_id: str
    key_name: str
    image_id: str
    private_key: str | None

    def client(self, **kwargs: Any) -> Any:
        """A boto3 EC2 client for the endpoint (dummy credentials, explicit region)."""
        return self.endpoint.client(**kwargs)


@pytest.fixture(scope="session")
def local_ec2() -> Iterator[LocalEc2]:
    """One moto EC2 server on 127.0.0.1 (random port) for the whole test session.

    Starting a server costs about a second, so tests share it and isolate themselves
    through ``ec2_env``, which resets its state.
    """
    with LocalEc2() as endpoint:
        yield endpoint


@pytest.fixture
def ec2_env(local_ec2: LocalEc2, monkeypatch: pytest.MonkeyPatch) -> Ec2Env:
    """A clean EC2 account for one test, reachable by any ``boto3.client("ec2")``.

    Resets moto, points boto3 at the endpoint through the environment (dummy credentials,
    ``AWS_DEFAULT_REGION``, ``AWS_EC2_METADATA_DISABLED=true``, ``AWS_ENDPOINT_URL_EC2``),
    and creates the loopback network (VPC 127.10.0.0/16, subnet 127.10.0.0/24, security
    group, key pair, an AMI id). Returns an :class:`Ec2Env` with those ids and the URL.
    """
    local_ec2.reset()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", local_ec2.region)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", local_ec2.url)
    net = local_ec2.setup_loopback_network()
    return Ec2Env(
        endpoint=local_ec2,
        url=local_ec2.url,
        region=local_ec2.region,
        vpc_id=net["vpc_id"],
        subnet_id=net["subnet_id"],
        security_group_id=net["security_group_id"],
        key_name=net["key_name"],
        image_id=net["image_id"],
        private_key=net.get("private_key"),
    )


@pytest.fixture
def spot_market(local_ec2: LocalEc2, ec2_env: Ec2Env) -> Iterator[SpotMarket]:
    """A :class:`SpotMarket` (seed 1234, defaults otherwise) installed for one test.

    Spot requests stay open until ``spot_market.tick()``; change its attributes
    (``fulfil_delay``, ``throttle_rate``, …) or call ``set_price``/``set_capacity`` in the
    test. Uninstalled afterwards, so moto's own behaviour is back for the next test.
    """
    market = SpotMarket(seed=1234, region=local_ec2.region)
    market.install(local_ec2)
    try:
        yield market
    finally:
        market.uninstall()


@pytest.fixture
def calls(ec2_env: Ec2Env) -> Iterator[list[str]]:
    """Every EC2 action that reaches the endpoint, as seen by the server itself."""
    seen: list[str] = []
    ec2_env.endpoint.set_http_hook(seen.append)
    yield seen
    ec2_env.endpoint.set_http_hook(None)


@pytest.fixture
def create_fleet_params(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The parameters of every CreateFleet the gateway sends from now on, as sent."""
    from disposabledisco import ec2 as ec2_module

    sent: list[dict[str, Any]] = []
    real = ec2_module.make_client

    def spying_client(*args: Any, **kwargs: Any) -> Any:
        client = real(*args, **kwargs)
        client.meta.events.register("provide-client-params.ec2.CreateFleet",
                                    lambda params, **_: sent.append(dict(params)))
        return client

    monkeypatch.setattr(ec2_module, "make_client", spying_client)
    return sent


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    """Keys every config of a test module gets; a module overrides this fixture to change
    them (test_fleet.py: its own TAG_KEY and LAUNCH_API "fleet")."""
    return {}


@pytest.fixture
def write_config(ec2_env: Ec2Env, tmp_path: Path,
                 config_defaults: dict[str, Any]) -> Callable[..., Path]:
    """Write a config for the local endpoint to tmp_path/config.json and return its path;
    keyword arguments override keys, None drops a key."""
    path = tmp_path / "config.json"

    def write(**overrides: Any) -> Path:
        values = {
            "AMI": ec2_env.image_id, "KEY_NAME": ec2_env.key_name,
            "SECURITY_GROUPS": [ec2_env.security_group_id], "SUBNET_ID": ec2_env.subnet_id,
            "TAG_KEY": "ddtest", "NUM_SLAVES": 3, "MAX_BID": "0.10",
            "STATE_DIR": str(tmp_path / "state"), "MGMT_KEY": "", "DISCO_INSTALL": "none",
            **config_defaults, **overrides,
        }
        path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
        return path

    return write
