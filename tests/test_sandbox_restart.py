"""ssh after a sandbox restart: the real `disposabledisco sandbox` (same folder, network and
endpoint port, so the same STATE_DIR and its old pins) is stopped and started again; the
new instances come up on the very loopback addresses of the old ones with new host keys.
The system ssh (BatchMode) must reach them through the new instances' pins: no prompt, no
"REMOTE HOST IDENTIFICATION HAS CHANGED", and no old instance's pin used for a new node.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from disposabledisco.config import load_config
from disposabledisco.ec2 import Ec2Gateway
from disposabledisco.reconcile import observe
from disposabledisco.remote import label
from tests.cli_capture import REPO, cli
from tests.test_sandbox_cli import Running, needs_nodes, unused_network

pytestmark = [pytest.mark.nodes, needs_nodes]


class Life(NamedTuple):
    """One sandbox life: its nodes by address, their pins, and what ssh said."""

    state_dir: Path
    ids: dict[str, str]  # address -> instance id
    names: dict[str, str]  # address -> host name (short name)
    pins: dict[str, str]  # address -> "keytype base64" pinned for its instance id
    known_hosts: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def detached(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run without stdin and without a controlling terminal: ssh cannot ask anything."""
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, start_new_session=True, check=False)


def served_key(address: str) -> str:
    """The ed25519 host key the sshd at ``address`` offers now (ssh-keyscan)."""
    scan = detached(["ssh-keyscan", "-t", "ed25519", "-T", "10", address])
    line = next(ln for ln in scan.stdout.splitlines() if not ln.startswith("#"))
    return " ".join(line.split()[1:3])


def converge_and_ssh(config: Path) -> Life:
    """`up --wait`, then the printed ssh line in BatchMode and `disposabledisco ssh` to
    every node; every one must answer with its own host name, without a warning."""
    code, out, err = cli("up", str(config), "--wait", "--timeout", "240")
    assert code == 0, out + err
    loaded = load_config(config)
    live = [n for n in observe(loaded, Ec2Gateway(loaded)).nodes if n.is_live]
    assert len(live) == 2
    printed = re.search(r"^\s+or:\s+(ssh .*)$", out, re.M)
    assert printed, out
    argv = shlex.split(printed.group(1))
    master = next(n for n in live if n.role == "master")
    done = detached([argv[0], "-o", "BatchMode=yes", *argv[1:], "hostname"])
    assert (done.returncode, done.stdout.strip()) == (0, label(master)), done.stderr
    assert "IDENTIFICATION HAS CHANGED" not in done.stderr and "Warning" not in done.stderr
    for node in live:
        done = detached([sys.executable, "-m", "disposabledisco", "ssh", str(config),
                         node.private_ip, "--", "hostname"])
        assert (done.returncode, done.stdout.strip()) == (0, label(node)), done.stderr
        assert "IDENTIFICATION HAS CHANGED" not in done.stderr
    pins = {n.private_ip: (loaded.state_dir / "hostkeys" / n.instance_id).read_text().strip()
            for n in live}
    return Life(loaded.state_dir, {n.private_ip: n.instance_id for n in live},
                {n.private_ip: label(n) for n in live},
                {a: " ".join(p.split()[:2]) for a, p in pins.items()},
                (loaded.state_dir / "known_hosts").read_text())


def test_ssh_reaches_the_new_nodes_on_the_old_addresses_after_a_restart(tmp_path: Path):
    network, port = unused_network(), free_port()
    config = tmp_path / "sandbox.json"
    sandbox = Running(tmp_path, network, "--port", str(port))
    try:
        before = converge_and_ssh(config)
    finally:
        sandbox.stop()

    sandbox = Running(tmp_path, network, "--port", str(port))
    try:
        after = converge_and_ssh(config)
        # the situation under test: same place and addresses, new instances, new keys
        assert after.state_dir == before.state_dir
        assert set(after.ids) == set(before.ids), (before.ids, after.ids)
        assert not set(after.ids.values()) & set(before.ids.values())
        for address, pin in after.pins.items():
            assert pin != before.pins[address], address  # the old pin would be refused
            assert pin == served_key(address)  # the new node's own key is pinned
        for old_id in before.ids.values():  # still on disk, never handed to ssh
            assert (before.state_dir / "hostkeys" / old_id).exists()
            assert old_id not in after.known_hosts
        assert not any(pin.split()[1] in after.known_hosts for pin in before.pins.values())
        for old_id in before.ids.values():  # an old id names no node, whatever its pin
            gone = detached([sys.executable, "-m", "disposabledisco", "ssh", str(config),
                             old_id, "--", "true"])
            assert gone.returncode == 2 and "no running node" in gone.stderr, gone.stderr
    finally:
        sandbox.stop()
