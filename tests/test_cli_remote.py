"""Using a cluster through the real CLI: exec, put/get, ssh (the system client, pinned host
keys, BatchMode), forget-host-key and bad inputs, against the local EC2 endpoint and real
sshd nodes (1 master + 3 slaves, converged once for the module)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from disposabledisco.config import load_config
from disposabledisco.ec2 import Ec2Gateway
from disposabledisco.reconcile import observe
from disposabledisco.remote import label
from disposabledisco.ssh import SshGateway
from tests.cli_capture import cli, cli_process
from tests.e2e_fixtures import ClusterConfig, E2eEnv, terminate_cluster

pytestmark = pytest.mark.nodes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(e2e: E2eEnv) -> Iterator[tuple[ClusterConfig, str, dict[str, str]]]:
    """(config, what `up --wait` printed, {instance id: short name}) of 1 + 3 nodes."""
    cfg = e2e.new_config("ddremote", 3)
    code, out, err = cli("up", str(cfg.path), "--wait", "--timeout", "240")
    assert code == 0, out + err
    config = load_config(cfg.path)
    nodes = {n.instance_id: label(n) for n in observe(config, Ec2Gateway(config)).nodes
             if n.is_live}
    assert len(nodes) == 4
    yield cfg, out, nodes
    terminate_cluster(e2e.client, cfg.tag_key)


def test_exec_runs_on_every_node_and_prefixes_lines(cluster) -> None:
    cfg, _, nodes = cluster
    code, out, err = cli("exec", str(cfg.path), "--", "hostname")
    assert code == 0, out + err
    lines = out.splitlines()
    assert sorted(lines[:-1]) == sorted(f"{name}: {name}" for name in nodes.values())
    assert lines[-1] == "4 nodes: 4 exited 0"


def test_exec_fails_when_one_node_fails_and_names_it(cluster) -> None:
    cfg, _, nodes = cluster
    victim = sorted(nodes.values())[-1]
    code, out, err = cli("exec", str(cfg.path), "--", "sh", "-c",
                         f'hostname; test "$(hostname)" != {victim}')
    assert code == 1, out + err
    assert out.splitlines()[-1] == f"4 nodes: 3 exited 0, 1 failed ({victim} exit 1)"
    assert len([ln for ln in out.splitlines() if ln.split(": ")[0] in nodes.values()]) == 4

    code, out, _ = cli("exec", str(cfg.path), "--json", "--role", "slaves", "--", "sh", "-c",
                       f'echo out; echo err >&2; test "$(hostname)" != {victim}')
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    codes = {n["node"]: n["exit_code"] for n in report["nodes"]}
    assert len(codes) == 3 and codes.pop(victim) == 1 and set(codes.values()) == {0}
    assert {(n["stdout"], n["stderr"]) for n in report["nodes"]} == {("out\n", "err\n")}


def test_exec_put_get_open_one_ssh_session_per_node(cluster, tmp_path: Path,
                                                     monkeypatch) -> None:
    """On 1 + 3 nodes each of exec, put and get opens 4 SSH sessions (one per node, no
    pinning connection first: every node is pinned by `up`) after 2 EC2 reads."""
    cfg, _, _ = cluster
    sessions: list[str] = []
    real = SshGateway.connect

    def counting(self, target, **kwargs):
        sessions.append(target.instance_id)
        return real(self, target, **kwargs)

    monkeypatch.setattr(SshGateway, "connect", counting)
    local = tmp_path / "one.txt"
    local.write_text("1\n")
    for argv in (["exec", str(cfg.path), "--", "true"],
                 ["put", str(cfg.path), str(local), "/tmp/dd-one.txt"],
                 ["get", str(cfg.path), "/tmp/dd-one.txt", str(tmp_path / "got")]):
        sessions.clear()
        code, out, err = cli(*argv)
        assert code == 0, out + err
        print(argv[0], "SSH sessions:", len(sessions))
        assert len(sessions) == len(set(sessions)) == 4, (argv[0], sessions)


def test_exec_quotes_every_word(cluster) -> None:
    """A word with spaces, quotes and $() reaches the command as one literal argument."""
    cfg, _, _ = cluster
    word = "a b 'c' \"d\" $(id) `id` ;true"
    code, out, err = cli("exec", str(cfg.path), "--role", "master", "--", "printf", "%s\n", word)
    assert code == 0, out + err
    assert out.splitlines()[0].split(": ", 1)[1] == word


def test_exec_as_disco_runs_as_the_disco_user_in_its_home(cluster) -> None:
    cfg, _, _ = cluster
    code, out, err = cli("exec", str(cfg.path), "--as", "disco", "--", "sh", "-c",
                         'echo "$(id -un) $([ "$PWD" = "$HOME" ] && echo home)"')
    assert code == 0, out + err
    assert {ln.split(": ", 1)[1] for ln in out.splitlines()[:-1]} == {"disco home"}


@pytest.mark.parametrize("as_disco", [False, True])
def test_put_get_round_trip_is_byte_exact_on_every_node(cluster, tmp_path: Path,
                                                          as_disco: bool) -> None:
    cfg, _, nodes = cluster
    data = os.urandom(300_000) + b"\x00\r\n end"
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    local.chmod(0o640)
    remote = "dd-rt/blob.bin" if as_disco else "/tmp/dd-rt-blob.bin"
    extra = ["--as", "disco"] if as_disco else []
    if as_disco:
        assert cli("exec", str(cfg.path), "--as", "disco", "--", "mkdir", "-p", "dd-rt")[0] == 0
    code, out, err = cli("put", str(cfg.path), str(local), remote, *extra)
    assert code == 0, out + err
    assert out.splitlines()[-1] == "4 nodes: 4 copied"
    code, out, _ = cli("exec", str(cfg.path), *extra, "--", "sh", "-c",
                       f"stat -c '%a %U' {remote}; ls -a $(dirname {remote})")
    owner = "disco" if as_disco else load_config(cfg.path)["SSH_USER"]
    stats = [ln.split(": ", 1)[1] for ln in out.splitlines()[:-1]]
    assert stats.count(f"640 {owner}") == 4, out
    assert not [s for s in stats if "ddtmp" in s or "blob.bin." in s], out  # no temp left
    into = tmp_path / "got"
    code, out, err = cli("get", str(cfg.path), remote, str(into), *extra)
    assert code == 0, out + err
    assert sorted(p.name for p in into.iterdir()) == sorted(nodes.values())
    fetched = remote.rsplit("/", 1)[-1]
    for name in nodes.values():
        assert (into / name / fetched).read_bytes() == data
        assert [p.name for p in (into / name).iterdir()] == [fetched]  # no temporary left


def test_get_of_a_missing_file_fails_on_every_node(cluster, tmp_path: Path) -> None:
    cfg, _, _ = cluster
    code, out, err = cli("get", str(cfg.path), "/nonexistent/file", str(tmp_path),
                         "--role", "slaves")
    assert code == 1
    assert out.splitlines()[-1].startswith("3 nodes: 0 fetched, 3 failed")
    assert err.count("/nonexistent/file") == 3


def test_the_printed_ssh_line_works_in_batch_mode_also_after_sshd_restarts(
        e2e: E2eEnv, cluster) -> None:
    cfg, out, nodes = cluster
    line = re.search(r"^\s+or:\s+(ssh .*)$", out, re.M)
    assert line, out
    argv = shlex.split(line.group(1))
    master = next(i for i, n in nodes.items() if f"master {i}" in out)
    for attempt in range(2):
        done = subprocess.run([argv[0], "-o", "BatchMode=yes", *argv[1:], "hostname"],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == nodes[master]
        assert "IDENTIFICATION HAS CHANGED" not in done.stderr
        if attempt == 0:
            e2e.farm.restart_sshd(master)


def test_ssh_command_reaches_the_named_node(cluster) -> None:
    cfg, _, nodes = cluster
    instance_id, name = sorted(nodes.items())[1]
    for given in (instance_id, name):
        done = cli_process("ssh", str(cfg.path), given, "--", "sh", "-c", "hostname; exit 3")
        assert (done.returncode, done.stdout.strip()) == (3, name), done.stderr


def test_forget_host_key_then_ssh_pins_it_again(cluster) -> None:
    cfg, _, nodes = cluster
    instance_id, name = sorted(nodes.items())[2]
    pin = cfg.state_dir / "hostkeys" / instance_id
    before = pin.read_text()
    code, out, err = cli("forget-host-key", str(cfg.path), instance_id)
    assert code == 0, err
    assert f"removed {pin}" in out and "next" in out
    assert not pin.exists()
    code, out, _ = cli("forget-host-key", str(cfg.path), instance_id)
    assert code == 0 and "no host key is pinned" in out
    done = cli_process("ssh", str(cfg.path), instance_id, "--", "hostname")
    assert done.returncode == 0 and done.stdout.strip() == name, done.stderr
    assert pin.read_text() == before


@pytest.mark.parametrize("argv, says", [
    (["ssh", "{cfg}", "ip-1-2-3-4"], "no running node 'ip-1-2-3-4'"),
    (["exec", "{cfg}", "hostname"], "exec needs the command after `--`"),
    (["exec", "{cfg}", "--role", "bad", "--", "true"], "invalid choice: 'bad'"),
    (["exec", "{cfg}", "--"], "exec needs the command after `--`"),
    (["put", "{cfg}", "/nonexistent", "/tmp/x"], "LOCAL /nonexistent is not a file"),
    (["forget-host-key", "{cfg}", "../etc"], "is not an instance id"),
])
def test_bad_inputs_exit_2_with_one_line(cluster, argv: list[str], says: str) -> None:
    cfg, _, _ = cluster
    code, out, err = cli(*[a.format(cfg=cfg.path) for a in argv])
    assert code == 2
    assert out == "" and len(err.splitlines()) == 1 and says in err, err


def test_tunnel_holds_the_port_and_says_what_it_is_for(cluster) -> None:
    cfg, _, _ = cluster
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tunnel = subprocess.Popen([sys.executable, "-m", "disposabledisco", "tunnel", str(cfg.path),
                               "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        said = [tunnel.stdout.readline() for _ in range(4)]
        assert said[0].startswith(f"tunnel: localhost:{port} -> master ")
        assert f"export DISCO_PROXY=http://localhost:{port}" in said[2]
        assert "ddfs" in said[3] and "--role master --as disco -- disco" in said[3]
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert tunnel.poll() is None, tunnel.stderr.read()
            assert time.monotonic() < deadline, "the tunnel never listened"
            time.sleep(0.1)
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)


def test_a_rebuilt_node_is_refused_until_its_key_is_forgotten(e2e: E2eEnv, cluster) -> None:
    """Last in the file: it changes a slave's host key. Refused by exec and ssh while the
    old key is pinned; after forget-host-key, ssh pins the new key with no prompt."""
    cfg, _, nodes = cluster
    instance_id, name = sorted(nodes.items())[3]
    new_key = e2e.farm.replace_host_key(instance_id)
    code, out, err = cli("exec", str(cfg.path), "--", "true")
    assert code == 1 and f"{name} not done" in out.splitlines()[-1]
    assert re.search(rf"{instance_id}.*host key.*changed", err), err
    assert cli_process("ssh", str(cfg.path), instance_id, "--", "true").returncode == 255
    assert cli("forget-host-key", str(cfg.path), instance_id)[0] == 0
    done = cli_process("ssh", str(cfg.path), instance_id, "--", "hostname")
    assert done.returncode == 0 and done.stdout.strip() == name, done.stderr
    assert (cfg.state_dir / "hostkeys" / instance_id).read_text().split()[:2] == \
        new_key.split()[:2]
    assert cli("exec", str(cfg.path), "--", "true")[0] == 0
