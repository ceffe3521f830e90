"""Bootstrap, join, membership and doctor against real local sshd nodes.

The nodes (disposabledisco/sandbox/nodes.py) are offline copies of this machine, so the
bootstrap is run with packages that are already installed here (DISCO_INSTALL "none",
or a small local tarball holding a stand-in `disco` command).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest

from disposabledisco import bootstrap, disco
from disposabledisco.cluster import Node
from disposabledisco.config import Config, parse_config
from disposabledisco.doctor import run_doctor
from disposabledisco.provision import Provisioner
from disposabledisco.sandbox.nodes import NodeFarm
from tests.disco_double import DiscoDouble
from tests.node_fixtures import (  # noqa: F401 - pytest fixtures
    client_key,
    node_farm,
    ssh_gateway_factory,
    start_nodes,
)

pytestmark = pytest.mark.nodes

SUBNET = "127.10.40"
MACHINE_PACKAGES = ("python3", "erlang-nox", "openssh-client", "python-is-python3")
POST_INIT = ("echo \"it's $HOME\" 'single $HOME' `echo back` $(echo sub) "
             "> /root/post_init.out\n")
POST_INIT_OUTPUT = "it's /root single $HOME back sub\n"
VCPUS = 2
STATE = tempfile.mkdtemp(prefix="dd-test-provision-")  # the bootstrap digest key
atexit.register(shutil.rmtree, STATE, True)
HOME = "/home/disco"
COOKIE = f"{HOME}/.erlang.cookie"


def _missing_machine_packages() -> list[str]:
    missing = []
    for package in MACHINE_PACKAGES:
        status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                                capture_output=True, text=True, check=False).stdout
        if status != "installed":
            missing.append(package)
    return missing


@pytest.fixture(autouse=True)
def _machine_has_packages() -> None:
    missing = _missing_machine_packages()
    if missing:
        pytest.skip("the offline test nodes need these packages on the machine: "
                    f"apt-get install -y {' '.join(missing)}")


def make_config(public_key: str, **values: object) -> Config:
    return parse_config({
        "AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "NUM_SLAVES": 2,
        "DISCO_INSTALL": "none", "BASE_PACKAGES": list(MACHINE_PACKAGES[:3]),
        "SSH_ADDRESS": "private_ip", "POST_INIT": POST_INIT, "MGMT_KEY": public_key,
        "TAG_KEY": "disco-provision-test", "STATE_DIR": STATE, **values})


def cluster_nodes(farm_nodes: list, roles: list[str]) -> list[Node]:
    return [Node(role=role, group="master" if role == "master" else "t3.micro",
                 instance_type="t3.micro", instance_id=n.instance_id, private_ip=n.address,
                 state="running") for n, role in zip(farm_nodes, roles, strict=True)]


def sh(farm: NodeFarm, node: Node, command: str, check: bool = True) -> str:
    return farm.exec(node.instance_id, ["bash", "-c", command], check=check).stdout.decode()


def as_disco(farm: NodeFarm, node: Node, command: str) -> str:
    return sh(farm, node, f"cd {HOME} && runuser -u disco -- env HOME={HOME} "
                          f"PATH=/usr/local/bin:/usr/bin:/bin bash -c {shlex.quote(command)}")


def all_ok(outcomes: dict) -> None:
    failed = {k: (o.error, o.log_tail[-8:]) for k, o in outcomes.items() if not o.ok}
    assert not failed, failed


@pytest.fixture
def cluster(start_nodes, ssh_gateway_factory, client_key):  # noqa: F811
    """A started (not yet bootstrapped) master + 2 slaves and a Provisioner for them."""
    def make(count: int = 3, **values: object) -> tuple[Provisioner, list[Node], Config]:
        farm_nodes = start_nodes(count, subnet=SUBNET)
        nodes = cluster_nodes(farm_nodes, ["master"] + ["slave"] * (count - 1))
        config = make_config(client_key.public, **values)
        gateway = ssh_gateway_factory()
        return Provisioner(config, gateway, lambda types: dict.fromkeys(types, VCPUS)), \
            nodes, config
    return make


class ProcessWatcher:
    """Samples every node's process list in a thread (secrets must never show there)."""

    def __init__(self, farm: NodeFarm, nodes: list[Node]) -> None:
        self.farm, self.nodes = farm, nodes
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for node in self.nodes:
                self.seen.append(sh(self.farm, node, "ps -eo args", check=False))

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# -- the whole node phase ----------------------------------------------------------------

def test_bootstrap_join_membership_and_doctor(cluster, node_farm: NodeFarm,  # noqa: F811
                                              tmp_path: Path) -> None:
    # "pip" is already in a fresh venv, so the pip step works offline
    prov, nodes, config = cluster(PIP_REQUIREMENTS=["pip"])
    master, slaves = nodes[0], nodes[1:]

    sessions = prov.ssh.sessions_opened
    started = time.monotonic()
    outcomes = prov.bootstrap(nodes)
    all_ok(outcomes)
    # one SSH session per node and step (bootstrap, join, membership), none twice
    assert prov.ssh.sessions_opened - sessions == len(nodes)
    took = time.monotonic() - started
    print(f"\nbootstrap of 3 nodes: {took:.2f} s; per node: "
          + ", ".join(f"{o.seconds:.2f} s" for o in outcomes.values()))
    for node in nodes:
        digest = bootstrap.digest(config, node.role)
        assert outcomes[node.instance_id].value == digest
        assert sh(node_farm, node, "cat /var/lib/disposabledisco/bootstrap.sha256") == \
            digest + "\n"
        assert sh(node_farm, node, "cat /root/post_init.out") == POST_INIT_OUTPUT
        assert sh(node_farm, node, "getent passwd disco | cut -d: -f7") == "/bin/bash\n"
        keys = sh(node_farm, node, f"cat {HOME}/.ssh/authorized_keys")
        assert keys.count(prov.config["MGMT_KEY"]) == 1
    master_settings = sh(node_farm, master, "cat /etc/disco/settings.py")
    assert f"DISCO_MASTER_HOST = '{disco.short_name(master)}'" in master_settings
    assert "DDFS_BLOB_REPLICAS = 3" in master_settings

    with ProcessWatcher(node_farm, nodes) as watcher:
        joined = prov.join(master, slaves)
    all_ok(joined)
    assert prov.ssh.sessions_opened - sessions == 2 * len(nodes)
    assert {o.value for o in joined.values()} == {master.instance_id}

    membership = prov.apply_membership(master, nodes)
    assert membership.ok, membership.error
    assert prov.ssh.sessions_opened - sessions == 3 * len(nodes)
    # master first, then by short name (ip-…-10 sorts before ip-…-9)
    expected_table = [[disco.short_name(n), str(VCPUS)]
                      for n in [master, *sorted(nodes[1:], key=disco.short_name)]]
    assert membership.value == expected_table

    # one cookie, mode 0400, owned by disco, never in a process list or a log; the
    # cluster's private key stays on the master, slaves get its public half only
    cookie = sh(node_farm, master, f"cat {COOKIE}")
    assert len(cookie) >= 20
    assert sh(node_farm, master, f"stat -c '%a %U' {HOME}/.ssh/id_ed25519") == "600 disco\n"
    public = sh(node_farm, master, f"cat {HOME}/.ssh/id_ed25519.pub")
    for node in nodes:
        assert sh(node_farm, node, f"cat {COOKIE}") == cookie
        assert sh(node_farm, node, f"stat -c '%a %U' {COOKIE}") == "400 disco\n"
        assert sh(node_farm, node, f"cat {HOME}/.ssh/id_ed25519.pub") == public
    for slave in slaves:
        assert sh(node_farm, slave, f"ls -a {HOME}/.ssh").split() == [
            ".", "..", "authorized_keys", "id_ed25519.pub"]
    private_key = sh(node_farm, master, f"cat {HOME}/.ssh/id_ed25519")
    assert watcher.seen and not any(cookie in ps for ps in watcher.seen)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert logs and cookie not in logs and private_key.splitlines()[1] not in logs

    # the master trusts exactly the slaves' pinned host keys, by short name and address
    known = sh(node_farm, master, f"cat {HOME}/.ssh/known_hosts").splitlines()
    for slave in slaves:
        key = " ".join(node_farm.host_public_key(slave.instance_id).split()[:2])
        assert f"{disco.short_name(slave)},{slave.private_ip} {key}" in known

    # what Disco's master gets when it runs `ssh <slave> ...`: the venv's python first,
    # Python warnings silenced (job output mixed with warnings breaks the worker protocol)
    remote = as_disco(node_farm, master, shlex.join([
        "ssh", "-n", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        disco.short_name(slaves[0]),
        "command -v python erl; python -c 'import warnings; warnings.warn(\"x\", "
        "SyntaxWarning)' 2>&1"]))
    assert remote == "/opt/disposabledisco/venv/bin/python\n/usr/bin/erl\n"

    # names resolve everywhere, the host table has string counts
    for node in nodes:
        hosts = sh(node_farm, node, "cat /etc/hosts")
        assert disco.hosts_block(nodes) in hosts
        for other in nodes:
            resolved = sh(node_farm, node, f"getent hosts {disco.short_name(other)}")
            assert resolved.split()[0] == other.private_ip
    table_file = sh(node_farm, master, "cat /srv/disco/disco_8989.config")
    assert json.loads(table_file) == {"hosts": expected_table, "blacklist": [],
                                      "gc_blacklist": []}

    # a real Erlang ping master -> slave by short name, with the cluster cookie
    slave_node = f"'pingtest@{disco.short_name(slaves[0])}'"
    as_disco(node_farm, slaves[0], shlex.join([
        "erl", "-sname", slave_node.strip("'"), "-detached",
        "-eval", "timer:apply_after(30000, init, stop, [])."]))
    answer = as_disco(node_farm, master, shlex.join([
        "erl", "-sname", "pingtester", "-noshell", "-eval",
        f"P = fun L(0) -> pang; L(K) -> case net_adm:ping({slave_node}) of pong -> pong; "
        "_ -> timer:sleep(200), L(K - 1) end end, R = P(50), io:format(\"~p~n\", [R]), "
        f"rpc:call({slave_node}, init, stop, []), halt()."]))
    assert answer.strip() == "pong"

    # re-running the bootstrap is quick, changes nothing and keeps the cluster's secrets
    rerun = prov.bootstrap(nodes)
    all_ok(rerun)
    print("bootstrap again (no-op): " + ", ".join(f"{o.seconds:.2f} s" for o in rerun.values()))
    assert sh(node_farm, master, f"cat {COOKIE}") == cookie
    assert all("POST_INIT already ran" in "\n".join(prov.ssh.tail(n.instance_id, 40))
               for n in nodes)

    report = run_doctor(config, master, slaves, prov.ssh, prov.vcpus)
    assert report.ok, report.to_text()
    statuses = {(c.node.split()[0], c.check): c.status for c in report.checks}
    assert statuses[(disco.short_name(master), "disco master answers")] == "skipped"
    for slave in slaves:
        assert statuses[(disco.short_name(slave), "erlang ping from master")] == "ok"
    assert json.loads(json.dumps(report.to_json()))["ok"] is True

    # a wrong cookie on one slave is named, with a fix
    sh(node_farm, slaves[1], f"chmod 600 {COOKIE} && printf WRONG > {COOKIE} "
                             f"&& chmod 400 {COOKIE}")
    broken = run_doctor(config, master, slaves, prov.ssh)
    assert not broken.ok
    failed = {(c.node, c.check) for c in broken.checks if not c.ok}
    assert failed == {(disco.short_name(slaves[1]), "erlang cookie"),
                      (disco.short_name(slaves[1]), "erlang ping from master")}
    ping = next(c for c in broken.checks if c.check == "erlang ping from master" and not c.ok)
    assert ping.detail.endswith(": refused") and "cookie differs" in ping.fix
    text = broken.to_text()
    assert "differs from the master's" in text and "2 check(s) failed" in text
    assert "WRONG" not in text and cookie not in text


def test_rejoin_to_a_new_master(cluster, node_farm: NodeFarm) -> None:  # noqa: F811
    prov, nodes, config = cluster(4)
    old_master, slaves, new_master = nodes[0], nodes[1:3], nodes[3]
    new_master = Node(role="master", group="master", instance_type="t3.micro",
                      instance_id=new_master.instance_id, private_ip=new_master.private_ip,
                      state="running")
    all_ok(prov.bootstrap([old_master, *slaves, new_master]))
    all_ok(prov.join(old_master, slaves))
    assert prov.apply_membership(old_master, [old_master, *slaves]).ok
    old_cookie = sh(node_farm, old_master, f"cat {COOKIE}")

    all_ok(prov.join(new_master, slaves))
    assert prov.apply_membership(new_master, [new_master, *slaves]).ok
    new_cookie = sh(node_farm, new_master, f"cat {COOKIE}")
    new_key = sh(node_farm, new_master, f"cat {HOME}/.ssh/id_ed25519.pub").split()[1]
    assert new_cookie != old_cookie
    for slave in slaves:
        assert sh(node_farm, slave, f"cat {COOKIE}") == new_cookie
        cluster_keys = [line for line in sh(node_farm, slave, f"cat {HOME}/.ssh/authorized_keys")
                        .splitlines() if line.endswith(bootstrap.CLUSTER_KEY_COMMENT)]
        assert len(cluster_keys) == 1 and cluster_keys[0].split()[1] == new_key
        assert disco.short_name(old_master) not in sh(node_farm, slave, "cat /etc/hosts")
    report = run_doctor(config, new_master, slaves, prov.ssh, prov.vcpus)
    assert report.ok, report.to_text()


# -- tarball mode, live table through the Disco double -----------------------------------

FAKE_DISCO = """#!/bin/sh
# A stand-in for Disco's command line: remembers whether it was started.
case "$1" in
  status) if [ -f "$HOME/.fake-disco-started" ]; then echo "master running"; \
else echo "master stopped"; fi ;;
  start) touch "$HOME/.fake-disco-started"; echo "master started" ;;
esac
"""


def fake_disco_tarball(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        data = FAKE_DISCO.encode()
        info = tarfile.TarInfo("usr/local/bin/disco")
        info.size, info.mode, info.uid = len(data), 0o755, 1234
        tar.addfile(info, io.BytesIO(data))
        settings = FAKE_INSTALLED_SETTINGS.encode()
        info = tarfile.TarInfo("./etc/disco/settings.py")
        info.size, info.mode = len(settings), 0o644
        tar.addfile(info, io.BytesIO(settings))
    return path


#: what an install's own settings file sets (like Disco's `make install`): DISCO_HOME must
#: survive our settings, its DISCO_ROOT and replica counts must not
FAKE_INSTALLED_SETTINGS = ('DISCO_HOME = "/opt/fake-disco"\nDISCO_ROOT = "/usr/var/disco"\n'
                           "DDFS_BLOB_REPLICAS = 3\n")


def free_port() -> int:
    """A port that is free now (the double then listens on it at the master's address)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tarball_goes_to_the_master_once_and_slaves_get_it_over_the_cluster_link(
        cluster, node_farm: NodeFarm, tmp_path: Path) -> None:  # noqa: F811
    tarball = fake_disco_tarball(tmp_path / "disco-installed.tar.gz")
    port = free_port()
    prov, nodes, config = cluster(DISCO_INSTALL="tarball", DISCO_TARBALL=str(tarball),
                                  DISCO_PORT=port)
    master, slaves = nodes[0], nodes[1:]

    all_ok(prov.bootstrap(nodes))
    uploads = {n.instance_id: "\n".join(prov.ssh.tail(n.instance_id, 200)).count(
        f"write_file {bootstrap.STAGED_TARBALL}") for n in nodes}
    assert uploads == {master.instance_id: 1, **{s.instance_id: 0 for s in slaves}}
    assert sh(node_farm, master, "stat -c '%U %a' /usr/local/bin/disco") == "root 755\n"
    assert sh(node_farm, slaves[0], "test -e /usr/local/bin/disco && echo yes", False) == ""

    all_ok(prov.join(master, slaves))
    want = hashlib.sha256(tarball.read_bytes()).hexdigest()
    for slave in slaves:
        assert sh(node_farm, slave, "cat /var/lib/disposabledisco/tarball.sha256") == want + "\n"
        assert as_disco(node_farm, slave, ". ~/.bashrc; command -v disco") == \
            "/usr/local/bin/disco\n"

    with node_farm.network_of(master.instance_id):  # the master must reach it
        double = DiscoDouble(master.private_ip, port)
    with double:
        outcome = prov.apply_membership(master, nodes)
        assert outcome.ok, (outcome.error, outcome.log_tail[-10:])
        assert double.table == [[disco.short_name(n), str(VCPUS)]
                                for n in [master, *sorted(slaves, key=disco.short_name)]]
        assert [r.path for r in double.requests] == ["/disco/ctrl/save_config_table"]
        assert sh(node_farm, master, f"test -f {HOME}/.fake-disco-started && echo started") \
            == "started\n"
        report = run_doctor(config, master, slaves, prov.ssh, prov.vcpus)
        # the stand-in has no Python client, so only the doctor's real job can fail
        failed = {c.check for c in report.checks if c.status != "ok"}
        assert failed <= {"disco job"}, report.to_text()

    # the settings file is ours with the install's values kept, on every node, also on the
    # slaves that got the tarball (with its own settings.py) after their bootstrap
    for node in nodes:
        text = sh(node_farm, node, "cat /etc/disco/settings.py")
        assert text.startswith("# Written by disposabledisco"), text
        assert "DISCO_HOME = '/opt/fake-disco'" in text and f"DISCO_PORT = {port}" in text
        assert "DISCO_ROOT = '/srv/disco'" in text and "/usr/var/disco" not in text

    all_ok(prov.bootstrap(nodes))  # the master already has this tarball: no new upload
    assert "\n".join(prov.ssh.tail(master.instance_id, 400)).count(
        f"write_file {bootstrap.STAGED_TARBALL}") == 1


# -- failures stay on their node and say what is wrong -----------------------------------

def test_a_dead_node_fails_alone(start_nodes, ssh_gateway_factory, client_key,  # noqa: F811
                                 node_farm: NodeFarm) -> None:  # noqa: F811
    farm_nodes = start_nodes(2, subnet=SUBNET)
    dead_address = farm_nodes[1].address
    node_farm.stop(farm_nodes[1].instance_id)
    nodes = cluster_nodes(farm_nodes, ["master", "slave"])
    gateway = ssh_gateway_factory(deadline_seconds=2.0)
    prov = Provisioner(make_config(client_key.public), gateway, lambda t: {})
    outcomes = prov.bootstrap(nodes)
    assert outcomes[nodes[0].instance_id].ok
    dead = outcomes[nodes[1].instance_id]
    assert not dead.ok and dead_address in dead.error
    assert dead.fault == "node"


def test_unknown_package_fails_fast_with_the_apt_reason(cluster) -> None:
    prov, nodes, _ = cluster(1, ADDITIONAL_PACKAGES=["disposabledisco-no-such-package"])
    started = time.monotonic()
    outcome = prov.bootstrap(nodes)[nodes[0].instance_id]
    assert not outcome.ok
    assert "apt-get update" in outcome.error
    assert outcome.fault == "node"  # no package index (network): the node's
    assert time.monotonic() - started < 60


# -- apt mode, from a local apt source ---------------------------------------------------

def build_deb(directory: Path, package: str) -> Path:
    """A tiny .deb that installs the stand-in `disco` command."""
    root = directory / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: 0.5.4-1\nArchitecture: all\n"
        "Maintainer: tests <tests@example.org>\nDescription: stand-in Disco command\n")
    script = root / "usr/bin/disco"
    script.write_text(FAKE_DISCO)
    script.chmod(0o755)
    deb = directory / f"{package}_0.5.4-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def apt_repository(directory: Path) -> bytes:
    """A flat, trusted apt repository with disco-master and disco-node, as a tar stream."""
    stanzas = []
    for package in ("disco-master", "disco-node"):
        deb = build_deb(directory, package)
        data = deb.read_bytes()
        stanzas.append(f"Package: {package}\nVersion: 0.5.4-1\nArchitecture: all\n"
                       "Maintainer: tests <tests@example.org>\n"
                       f"Filename: ./{deb.name}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
                       "Description: stand-in Disco command\n")
    (directory / "Packages").write_text("\n".join(stanzas))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("Packages", "disco-master_0.5.4-1_all.deb", "disco-node_0.5.4-1_all.deb"):
            tar.add(directory / name, arcname=name)
    return buffer.getvalue()


def test_apt_mode_installs_the_role_package_from_the_configured_source(
        cluster, node_farm: NodeFarm, tmp_path: Path) -> None:  # noqa: F811
    repository = apt_repository(tmp_path)
    prov, nodes, _ = cluster(DISCO_INSTALL="apt",
                             DISCO_APT_SOURCE="deb [trusted=yes] file:///srv/ddrepo ./")
    for node in nodes:  # an image whose only apt source will be ours
        sh(node_farm, node, "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*")
        node_farm.exec(node.instance_id, ["sh", "-c", "mkdir -p /srv/ddrepo && "
                                                      "tar -x -C /srv/ddrepo"], input=repository)
    all_ok(prov.bootstrap(nodes))
    installed = {n.instance_id: sh(node_farm, n, "dpkg-query -W -f='${Package} ' "
                                                 "disco-master disco-node 2>/dev/null", False)
                 for n in nodes}
    assert installed[nodes[0].instance_id].split() == ["disco-master"]
    assert all(installed[n.instance_id].split() == ["disco-node"] for n in nodes[1:])
    assert sh(node_farm, nodes[0], "cat /etc/apt/sources.list.d/disco.list") == \
        "deb [trusted=yes] file:///srv/ddrepo ./\n"
    all_ok(prov.bootstrap(nodes))  # everything installed: no apt-get update this time
    assert "apt-get update" not in "\n".join(prov.ssh.tail(nodes[0].instance_id, 12))


def test_preinstalled_without_disco_says_what_is_missing(cluster) -> None:
    prov, nodes, _ = cluster(1, DISCO_INSTALL="preinstalled")
    outcome = prov.bootstrap(nodes)[nodes[0].instance_id]
    assert not outcome.ok
    assert "not on the non-interactive PATH of disco: disco" in outcome.error
    assert outcome.fault == "config"  # a fresh node would fail the same: never counted


def test_a_failed_bootstrap_is_not_stamped_and_a_rerun_finishes_it(
        cluster, node_farm: NodeFarm, client_key) -> None:  # noqa: F811
    prov, nodes, _ = cluster(1, POST_INIT="echo half-way > /root/half; exit 3")
    node = nodes[0]
    outcome = prov.bootstrap(nodes)[node.instance_id]
    assert not outcome.ok and "POST_INIT failed (status 3)" in outcome.error
    assert outcome.fault == "config"
    assert sh(node_farm, node, "cat /var/lib/disposabledisco/bootstrap.sha256", False) == ""
    fixed = Provisioner(make_config(client_key.public), prov.ssh, prov.vcpus)
    all_ok(fixed.bootstrap(nodes))
    assert sh(node_farm, node, "cat /var/lib/disposabledisco/bootstrap.sha256") == \
        bootstrap.digest(fixed.config, "master") + "\n"
    assert sh(node_farm, node, "cat /root/post_init.out") == POST_INIT_OUTPUT
