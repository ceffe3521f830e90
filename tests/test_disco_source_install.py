"""DISCO_INSTALL "source" on real sandbox nodes: the master builds Disco from the bundle.

The nodes are offline copies of this machine, so the master's apt step finds the build
tools already installed (like every other node test, it never reaches a package index).
Uses the bundle in `../shared/vendor/` (or the file named by `DISCO_SOURCE`) and skips
with the reason when it or a build tool is missing.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from disposabledisco import bootstrap
from disposabledisco.cluster import Node
from disposabledisco.config import Config, parse_config
from disposabledisco.disco_source import bundle_sha256
from disposabledisco.provision import Provisioner
from disposabledisco.sandbox.nodes import NodeFarm
from tests.disco_bundle import broken_bundle, source_bundle
from tests.node_fixtures import (  # noqa: F401 - pytest fixtures
    client_key,
    node_farm,
    ssh_gateway_factory,
    start_nodes,
)

pytestmark = [pytest.mark.nodes, pytest.mark.disco]

SUBNET = "127.10.41"
#: what the master's source mode installs from apt (bootstrap.packages), all of which the
#: offline nodes must already have
NODE_PACKAGES = ("python3", "openssh-client", "python-is-python3", *bootstrap.BUILD_PACKAGES)
STATE = tempfile.mkdtemp(prefix="dd-test-source-")  # the bootstrap digest key
atexit.register(shutil.rmtree, STATE, True)
VCPUS = 2
STAGED = "/var/lib/disposabledisco"


@pytest.fixture(autouse=True)
def _machine_has_packages() -> None:
    missing = [p for p in NODE_PACKAGES if subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", p], capture_output=True, text=True,
        check=False).stdout != "installed"]
    if missing:
        pytest.skip("the offline test nodes need these packages on the machine: "
                    f"apt-get install -y {' '.join(missing)}")


@pytest.fixture
def cluster(start_nodes, ssh_gateway_factory, client_key):  # noqa: F811
    """A master and `count - 1` slaves, started, and a Provisioner in source mode."""
    def make(bundle: Path, count: int = 2) -> tuple[Provisioner, list[Node], Config]:
        farm_nodes = start_nodes(count, subnet=SUBNET)
        nodes = [Node(role="master" if i == 0 else "slave",
                      group="master" if i == 0 else "t3.micro", instance_type="t3.micro",
                      instance_id=n.instance_id, private_ip=n.address, state="running")
                 for i, n in enumerate(farm_nodes)]
        config = source_config(bundle, count, client_key.public)
        gateway = ssh_gateway_factory()
        return Provisioner(config, gateway, lambda types: dict.fromkeys(types, VCPUS)), \
            nodes, config
    return make


def source_config(bundle: Path, count: int, public_key: str, **values: object) -> Config:
    return parse_config({
        "AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "NUM_SLAVES": count - 1,
        "DISCO_INSTALL": "source", "DISCO_SOURCE": str(bundle),
        "BASE_PACKAGES": ["python3", "openssh-client"], "SSH_ADDRESS": "private_ip",
        "MGMT_KEY": public_key, "TAG_KEY": "disco-source-test", "STATE_DIR": STATE, **values})


def sh(farm: NodeFarm, node: Node, command: str) -> str:
    return farm.exec(node.instance_id, ["bash", "-c", command], check=False).stdout.decode()


def node_log(prov: Provisioner, node: Node) -> str:
    return "\n".join(prov.ssh.tail(node.instance_id, 2000))


def test_master_builds_once_and_the_slave_gets_the_tree_with_our_settings(
        cluster, node_farm: NodeFarm, client_key) -> None:  # noqa: F811
    bundle = source_bundle()
    prov, nodes, config = cluster(bundle)
    master, slave = nodes

    started = time.monotonic()
    outcome = prov.bootstrap([master])[master.instance_id]
    first = time.monotonic() - started
    assert outcome.ok, (outcome.error, outcome.log_tail[-30:])
    assert outcome.value.settings_changed  # a fresh node: the file is new
    log = node_log(prov, master)
    for step in ("verify", "unpack", "repository", "fixes", "rebar", "compile", "install",
                 "pack"):
        assert log.count(f"disco build: step {step}") == 1, step
    sha = bundle_sha256(bundle)
    assert sh(node_farm, master, f"ls {STAGED}/build") == f"disco-installed-{sha}.tar.gz\n"

    # the installed tree, usable by the Disco user; the Python package compiled quietly
    for path in ("/usr/bin/disco", "/usr/bin/ddfs", "/usr/lib/disco/master/ebin/disco.app",
                 "/usr/share/disco/master/www", "/usr/lib/python3/dist-packages/disco/util.py"):
        assert sh(node_farm, master, f"test -e {path} && echo ok") == "ok\n", path
    assert sh(node_farm, master, "runuser -u disco -- python3 -W error -c "
                                 "'import disco.util; print(1)'") == "1\n"

    # one settings file: the install's DISCO_HOME/DISCO_WWW_ROOT kept, ours on top
    settings = sh(node_farm, master, "cat /etc/disco/settings.py")
    assert settings.startswith("# Written by disposabledisco"), settings
    values: dict[str, object] = {}
    exec(settings, {}, values)  # noqa: S102 - the node's own file, plain assignments
    assert values["DISCO_HOME"] == "/usr/lib/disco"
    assert values["DISCO_WWW_ROOT"] == "/usr/share/disco/master/www"
    assert (values["DISCO_ROOT"], values["DISCO_USER"]) == ("/srv/disco", "disco")
    assert values["DISCO_PORT"] == 8989 and values["DISCO_ERLANG"].startswith("erl ")
    assert values["DDFS_BLOB_REPLICAS"] == 2  # from the cluster size, not the install's 3
    assert values["DISCO_MASTER_HOST"] == sh(node_farm, master, "hostname -s").strip()
    installed = sh(node_farm, master, f"cat {STAGED}/installed-settings.py")
    assert 'DISCO_HOME = "/usr/lib/disco"' in installed  # the build's file, kept aside

    # a second bootstrap with the same bundle builds nothing and changes no setting
    started = time.monotonic()
    again = prov.bootstrap([master])[master.instance_id]
    second = time.monotonic() - started
    assert again.ok, (again.error, again.log_tail[-20:])
    assert not again.value.settings_changed
    log = node_log(prov, master)
    assert log.count("disco build: step verify") == 1
    assert "Disco already built from the source bundle" in log
    assert second < first
    print(f"\nsource bootstrap of the master: {first:.1f} s; again: {second:.1f} s")

    # the slave needs no build tools: it gets the master's tree when it joins
    all_ok = prov.bootstrap([slave])[slave.instance_id]
    assert all_ok.ok, (all_ok.error, all_ok.log_tail[-20:])
    assert sh(node_farm, slave, "test -e /usr/lib/disco/master/ebin/disco.app || echo no") \
        == "no\n"
    joined = prov.join(master, [slave])[slave.instance_id]
    assert joined.ok, (joined.error, joined.log_tail[-20:])
    tree = sh(node_farm, master, f"cat {STAGED}/tarball.sha256")
    assert sh(node_farm, slave, f"cat {STAGED}/tarball.sha256") == tree
    assert sh(node_farm, slave, "test -e /usr/lib/disco/master/ebin/disco.app && echo ok") \
        == "ok\n"
    slave_values: dict[str, object] = {}
    exec(sh(node_farm, slave, "cat /etc/disco/settings.py"), {}, slave_values)  # noqa: S102
    assert slave_values["DISCO_HOME"] == "/usr/lib/disco"
    assert slave_values["DISCO_ROOT"] == "/srv/disco" and "DISCO_MASTER_HOST" not in \
        slave_values

    # the membership step starts the real Disco with these settings ...
    applied = prov.apply_membership(master, nodes)
    assert applied.ok, (applied.error, applied.log_tail[-20:])
    assert applied.value.note == ""
    assert "running" in disco_status(node_farm, master)
    # ... and restarts it once a bootstrap wrote settings it has not read
    changed = Provisioner(source_config(bundle, 2, client_key.public,
                                        DISCO_SETTINGS={"DISCO_WORKER_MAX_MEM": "50%"}),
                          prov.ssh, prov.vcpus)
    stamp = changed.bootstrap([master])[master.instance_id]
    assert stamp.ok and stamp.value.settings_changed, (stamp.error, stamp.log_tail[-20:])
    assert "Disco already built" in node_log(prov, master)
    # a drain (scale-down) changes Disco's live table only: no restart, whatever changed
    started = sh(node_farm, master, f"cat {STAGED}/disco-started-settings.sha256")
    drained = changed.apply_membership(master, [master], drain=True)
    assert drained.ok, (drained.error, drained.log_tail[-20:])
    assert (drained.value.note, drained.value.restart_pending) == ("", False)
    assert sh(node_farm, master, f"cat {STAGED}/disco-started-settings.sha256") == started
    table_url = (f"http://{master.private_ip}:{changed.config['DISCO_PORT']}"
                 "/disco/ctrl/load_config_table")
    live_table = sh(node_farm, master, "python3 -c 'import sys, urllib.request; print("
                                       f"urllib.request.urlopen(sys.argv[1]).read().decode())' "
                                       f"{table_url}")
    assert json.loads(live_table) == drained.value
    applied = changed.apply_membership(master, nodes)
    assert applied.ok, (applied.error, applied.log_tail[-20:])
    hostname = sh(node_farm, master, "hostname -s").strip()
    assert applied.value.note == f"restarted Disco on {hostname}: its settings changed"
    assert "running" in disco_status(node_farm, master)
    assert sh(node_farm, master, f"cat {STAGED}/disco-started-settings.sha256") == \
        sh(node_farm, master, f"cat {STAGED}/settings.sha256")
    again = changed.apply_membership(master, nodes)  # nothing changed: no restart
    assert again.ok and again.value.note == "", (again.error, again.log_tail[-20:])


def disco_status(farm: NodeFarm, node: Node) -> str:
    return sh(farm, node, "cd / && runuser -u disco -- env HOME=/home/disco "
                          "PATH=/usr/bin:/bin disco status 2>&1")


def test_a_bundle_that_does_not_compile_is_the_configs_fault_naming_the_step(
        cluster, tmp_path: Path) -> None:
    broken = broken_bundle(tmp_path / "broken-src.tar.gz")
    prov, nodes, _ = cluster(broken, count=1)
    outcome = prov.bootstrap(nodes)[nodes[0].instance_id]
    assert not outcome.ok
    assert outcome.fault == "config"  # exit 78: the master is kept, never replaced for it
    tail = "\n".join(outcome.log_tail)
    assert "the Disco build failed on" in tail and "at step compile" in tail, tail
    assert "disco_server.erl" in tail  # the compiler's error from the build log's tail
