"""`disposabledisco sandbox`: a whole spot cluster on this machine, no AWS account needed.

It starts the local EC2 endpoint (moto on 127.0.0.1) with the spot market model, boots a
real, isolated SSH node for every instance the market launches (at the instance's own
loopback address), writes a ready config, and keeps running until interrupted. The
config uses `DISCO_INSTALL: "none"`: everything but installing and starting Disco
(trust, cookie, names, host table file) is done for real.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..deps import SANDBOX, require

require(SANDBOX)  # one line naming what to install, before moto is imported below

from .endpoint import DUMMY_KEY_ID, DUMMY_SECRET, LocalEc2  # noqa: E402
from .loopback import endpoint_answers, free_subnet, sockets_in_use  # noqa: E402
from .market import SpotMarket  # noqa: E402
from .nodes import NodeFarm, generate_ed25519_key, taken_addresses  # noqa: E402

# Debian packages the sandbox nodes get (from this machine's own installed set: nodes are
# offline overlays of it, so only installed packages can be "installed" there).
SANDBOX_PACKAGES = ("python3", "python3-venv", "python-is-python3", "erlang-nox",
                    "openssh-client", "ca-certificates", "curl")
#: config keys that name this run's endpoint, network and key: a restart must replace them
WIRING_KEYS = ("AMI", "KEY_NAME", "SECURITY_GROUPS", "SUBNET_ID", "REGION", "ENDPOINT_URL",
               "AWS_ACCESS", "AWS_SECRET", "SSH_KEY_FILE", "MGMT_KEY")


class SandboxError(Exception):
    """The sandbox cannot run on this machine (not root, no sshd, …)."""


@dataclass
class SandboxOptions:
    directory: Path
    slaves: int = 3
    port: int = 0
    instance_type: str = "m5.large"
    spot_price: float = 0.03
    max_bid: float = 0.10
    fulfil_delay: float = 3.0
    interruption_rate: float = 0.0
    price_volatility: float = 0.0
    capacity: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    network: str = "127.42.0.0/16"  # instances get .4, .5, … of its first free /24


class Sandbox:
    """The running sandbox: endpoint, market and node farm, stopped together."""

    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.directory = options.directory.resolve()
        self.market: SpotMarket | None = None
        self.endpoint: LocalEc2 | None = None
        self.farm: NodeFarm | None = None
        self.config_path = self.directory / "sandbox.json"
        #: what the sandbox last wrote, to tell the user's edits from its own values
        self.record_path = self.directory / ".sandbox-written.json"
        self.subnet = ""
        self.kept_edits: dict[str, Any] = {}
        self.replaced_edits: list[str] = []

    def start(self) -> Path:
        """Start everything and write the config; returns its path."""
        available, reason = NodeFarm.available()
        if not available:
            raise SandboxError(f"the sandbox needs real SSH nodes, which this machine cannot "
                               f"run: {reason}")
        options = self.options
        previous, written = _read_json(self.config_path), _read_json(self.record_path)
        url = previous.get("ENDPOINT_URL") if previous else None
        if isinstance(url, str) and endpoint_answers(url):
            raise SandboxError(f"a sandbox already runs with {self.config_path} (its endpoint "
                               f"{url} answers): stop it first, or pass another --dir")
        # nodes live in network namespaces of their own: their sockets are not in ours,
        # but their /32 routes are (taken_addresses), as are other servers' sockets
        ends = [*sockets_in_use(),
                *((ipaddress.IPv4Address(address), 22) for address in taken_addresses())]
        try:
            subnet = free_subnet(options.network, ends=ends)
        except LookupError as error:
            raise SandboxError(str(error)) from None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file = self.directory / "id_ed25519"
        private, public = generate_ed25519_key("disposabledisco-sandbox")
        _write_private(key_file, private)
        self.market = SpotMarket(seed=options.seed, fulfil_delay=options.fulfil_delay,
                                 default_price=options.spot_price,
                                 interruption_rate=options.interruption_rate,
                                 price_volatility=options.price_volatility)
        for instance_type, count in options.capacity.items():
            self.market.set_capacity(instance_type, count)
        self.farm = NodeFarm(authorized_key=public, workdir=self.directory / "nodes")
        self.market.on_launch(self.farm.on_launch)
        self.market.on_terminate(self.farm.on_terminate)
        self.endpoint = LocalEc2(port=options.port, market=self.market).start()
        vpc = ipaddress.IPv4Network(options.network)
        network = self.endpoint.setup_loopback_network(str(vpc), str(subnet),
                                                       public_key=public)
        self.subnet = str(subnet)
        self.market.background(0.5)
        fresh = sandbox_config(self.endpoint, network, key_file, public, options)
        config, self.kept_edits, self.replaced_edits = keep_user_edits(fresh, previous, written)
        _write_private(self.config_path, json.dumps(config, indent=2) + "\n")
        # the record is the sandbox's own values: kept edits stay edits at the next restart
        _write_private(self.record_path, json.dumps(fresh, indent=2) + "\n")
        return self.config_path

    def stop(self) -> None:
        """Stop ticking, the endpoint and every node (their writes vanish with them)."""
        if self.market is not None:
            self.market.stop()
        if self.endpoint is not None:
            self.endpoint.stop()
        if self.farm is not None:
            self.farm.close()

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sandbox_config(endpoint: LocalEc2, network: dict[str, str], key_file: Path, public: str,
                   options: SandboxOptions) -> dict[str, Any]:
    """A complete config for the sandbox endpoint and its nodes."""
    return {
        "AMI": network["image_id"], "KEY_NAME": network["key_name"],
        "INSTANCE_TYPE": options.instance_type, "NUM_SLAVES": options.slaves,
        "MAX_BID": f"{options.max_bid:g}", "TAG_KEY": "sandbox",
        "SECURITY_GROUPS": [network["security_group_id"]], "SUBNET_ID": network["subnet_id"],
        "REGION": endpoint.region, "ENDPOINT_URL": endpoint.url,
        "AWS_ACCESS": DUMMY_KEY_ID, "AWS_SECRET": DUMMY_SECRET,
        "SSH_USER": "ubuntu", "SSH_KEY_FILE": str(key_file), "SSH_ADDRESS": "private_ip",
        "MGMT_KEY": public, "STATE_DIR": str(key_file.parent / "state"),
        "BASE_PACKAGES": list(SANDBOX_PACKAGES), "DISCO_INSTALL": "none",
        "SPOT_OPEN_TIMEOUT_MINUTES": 2, "UNRESPONSIVE_MINUTES": 3,
    }


def keep_user_edits(fresh: dict[str, Any], previous: dict[str, Any] | None,
                    written: dict[str, Any] | None,
                    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Merge a restart's fresh config with the user's edits of the previous one.

    An edit is a key whose value in the previous file differs from what the sandbox wrote
    last (from the fresh config when that record is gone). Edits are kept, except of the
    keys that wire the config to this run's endpoint, network and key (WIRING_KEYS), which
    are replaced. Returns (config, kept edits, replaced keys) so the banner can say both.
    """
    if previous is None:
        return fresh, {}, []
    baseline = written if written is not None else fresh
    missing = object()
    edited = sorted(key for key in set(previous) | set(baseline)
                    if previous.get(key, missing) != baseline.get(key, missing))
    config = dict(fresh)
    kept: dict[str, Any] = {}
    for key in edited:
        if key in WIRING_KEYS:
            continue
        if key in previous:
            config[key] = kept[key] = previous[key]
        else:  # the user removed it
            config.pop(key, None)
            kept[key] = None
    return config, kept, [key for key in edited if key in WIRING_KEYS]


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; a damaged one stops the sandbox (never
    overwritten silently)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SandboxError(f"cannot read {path}: {error.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise SandboxError(f"{path} is not valid JSON ({error}): fix it or remove it, "
                           "then start the sandbox again") from None
    if not isinstance(value, dict):
        raise SandboxError(f"{path} is not a JSON object: fix it or remove it, then start "
                           "the sandbox again")
    return value


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def banner(sandbox: Sandbox) -> list[str]:
    """What was started and where: endpoint, network, config, and edits kept or replaced."""
    lines = [f"sandbox EC2 endpoint: {sandbox.endpoint.url if sandbox.endpoint else '-'}",
             f"instance network: {sandbox.subnet} (instances get .4, .5, …; the first free "
             f"/24 of {sandbox.options.network})",
             f"config written to {sandbox.config_path}"]
    if sandbox.kept_edits:
        edits = ", ".join(f"{key}={json.dumps(value)}" if value is not None else f"{key} removed"
                          for key, value in sandbox.kept_edits.items())
        lines.append(f"kept your edits of {sandbox.config_path.name}: {edits} (remove the "
                     "file to start from the defaults)")
    if sandbox.replaced_edits:
        lines.append(f"replaced your edits of {', '.join(sandbox.replaced_edits)}: they must "
                     "name this run's endpoint, network and key")
    return lines


def usage_text(sandbox: Sandbox) -> str:
    """The banner of a sandbox that keeps running, with what to type next."""
    config = str(sandbox.config_path)
    return "\n".join([
        "sandbox running: an SSH node for every instance the endpoint launches",
        *banner(sandbox),
        "",
        "in another terminal:",
        f"  python create_cluster.py {config} --wait      # converge a real cluster",
        f"  disposabledisco status {config}",
        f"  disposabledisco doctor {config}",
        f"  edit NUM_SLAVES in {config} and run create_cluster.py again to scale",
        f"  disposabledisco down {config} --yes",
        "",
        "press Ctrl-C here to stop the sandbox (every node and its changes vanish)",
    ])


def _say(line: str) -> None:
    """Print at once: the demo's lines interleave with its child commands' output."""
    print(line, flush=True)


def demo(options: SandboxOptions, say: Callable[[str], None] = _say) -> int:
    """The whole story in one command: converge, inspect, lose a slave, heal, tear down.

    Every step is the real CLI in a child process, exactly as a user would type it.
    """
    with Sandbox(options) as sandbox:
        for line in banner(sandbox):
            say(line)
        config = str(sandbox.config_path)
        steps: list[tuple[str, list[str], Callable[[], None] | None]] = [
            ("converge the cluster", ["up", config, "--wait", "--timeout", "600"], None),
            ("what exists", ["status", config], None),
            ("check it end to end", ["doctor", config], None),
            ("a spot slave is interrupted; heal", ["up", config, "--wait", "--timeout", "600"],
             lambda: _interrupt_one_slave(sandbox, say)),
            ("tear it down", ["down", config, "--yes"], None),
        ]
        for title, argv, before in steps:
            if before is not None:
                before()
            say(f"\n$ disposabledisco {' '.join(argv)}    # {title}")
            code = subprocess.run([sys.executable, "-m", "disposabledisco.cli", *argv],
                                  check=False).returncode
            if code != 0:
                say(f"step failed with exit code {code}; logs are in {sandbox.directory}")
                return code
        say("\nsandbox demo finished: the cluster converged, healed and was taken down")
    return 0


def _interrupt_one_slave(sandbox: Sandbox, say: Callable[[str], None]) -> None:
    client = sandbox.endpoint.client()
    reservations = client.describe_instances(Filters=[
        {"Name": "tag:sandbox", "Values": ["slave"]},
        {"Name": "instance-state-name", "Values": ["running"]}])["Reservations"]
    victims = sorted((i["InstanceId"], i.get("PrivateIpAddress", "?"))
                     for r in reservations for i in r["Instances"])
    if victims:
        victim, address = victims[0]
        say(f"\n(the spot market interrupts slave {victim} at {address})")
        sandbox.market.interrupt(victim)


def serve(options: SandboxOptions, say: Callable[[str], None] = _say,
          stop: threading.Event | None = None) -> int:
    """Run the sandbox in the foreground until SIGINT/SIGTERM (or `stop` is set)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: stop.set())
    with Sandbox(options) as sandbox:
        say(usage_text(sandbox))
        stop.wait()
        say("stopping the sandbox")
    return 0
