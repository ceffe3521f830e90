"""Root never follows a node user's links; refusals are blamed on the right party.

Real sshd nodes (tests/node_fixtures.py): as the unprivileged Disco user we plant
symlinks, hard links, FIFOs and directories at every path the bootstrap, join,
membership and doctor steps touch in that user's home and DISCO_ROOT, then change a
bootstrap input and run every step again. No system file may change and the run must
refuse with a line naming the instance, the path and what was found there. Then the
node-side DISCO_ROOT/DISCO_USER refusals, which are the config's fault.

The fault-class bookkeeping of a pass (only the node's own faults count toward
replacing it) is checked below the CLI with the in-process doubles of
tests/test_reconcile_unit.py, in milliseconds.
"""

from __future__ import annotations

import io
import shlex
import tarfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from disposabledisco import disco, provision, reconcile
from disposabledisco.bootstrap import BootstrapError
from disposabledisco.cluster import TAG_FAILURES, TAG_UNREACHABLE, Node
from disposabledisco.doctor import run_doctor
from disposabledisco.plan import Terminate
from disposabledisco.provision import Provisioner
from disposabledisco.report import render_pass
from disposabledisco.sandbox.nodes import NodeFarm
from disposabledisco.ssh import CommandFailed, HostKeyMismatch, SshError, Target, fault_of
from tests.node_fixtures import (  # noqa: F401 - pytest fixtures
    client_key,
    node_farm,
    ssh_gateway_factory,
    start_nodes,
)
from tests.test_provision import (  # noqa: F401 - the autouse fixture skips without packages
    FAKE_DISCO,
    _machine_has_packages,
    all_ok,
    cluster_nodes,
    make_config,
    sh,
)
from tests.test_reconcile_unit import NOW, FakeEc2, config, run

SUBNET = "127.10.47"
HOME = "/home/disco"
VICTIM = "/etc/dd-victim"
VICTIM_DIR = "/etc/dd-victim.d"
WATCHED = (VICTIM, VICTIM_DIR, "/etc/passwd", "/etc/shadow", "/etc/group", "/root")
TABLE = "/srv/disco/disco_8989.config"
#: every path in the Disco user's home the node scripts read or write, per role, and the
#: fixed temp names an older version wrote through (they must simply be ignored now)
MASTER_PATHS = (".erlang.cookie", ".bashrc", ".ssh/authorized_keys", ".ssh/id_ed25519",
                ".ssh/id_ed25519.pub", ".ssh/known_hosts")
SLAVE_PATHS = (".erlang.cookie", ".ssh/authorized_keys", ".ssh/id_ed25519",
               ".ssh/id_ed25519.pub")
OLD_TMP_NAMES = (".ssh/id_ed25519.pub.tmp", ".erlang.cookie.tmp")
#: how each kind of plant shows in the refusal
FOUND = {"symlink": f"symbolic link to {VICTIM}", "hardlink": "hard link (2 links)",
         "fifo": "fifo", "directory": "directory"}


def system_state(farm: NodeFarm, node: Node) -> str:
    """Owner, mode, size, inode and content hash of the files a redirected root would
    damage (link counts left out: planting a hard link changes the victim's)."""
    files = " ".join(WATCHED)
    return sh(farm, node, f"stat -c '%n %i %u %g %a %s %F' {files}; "
                          f"sha256sum {VICTIM} /etc/passwd /etc/shadow /etc/group; "
                          f"ls -a {VICTIM_DIR}")


def plant(farm: NodeFarm, node: Node, path: str, kind: str, victim: str = VICTIM) -> None:
    """As the Disco user (a hard link to a root file needs root here: the kernel's
    protected_hardlinks stops the user, a defence we do not rely on)."""
    as_user = "runuser -u disco -- sh -c {}"
    sh(farm, node, as_user.format(shlex.quote(f"rm -rf -- {path}")))
    made = {"symlink": f"ln -s {victim} {path}", "fifo": f"mkfifo {path}",
            "directory": f"mkdir {path}"}
    if kind == "hardlink":
        sh(farm, node, f"ln {VICTIM} {path}")
    else:
        sh(farm, node, as_user.format(shlex.quote(made[kind])))


@pytest.fixture
def pair(start_nodes, ssh_gateway_factory, client_key, node_farm):  # noqa: F811
    """A bootstrapped, joined master + slave with a victim file on each."""
    nodes = cluster_nodes(start_nodes(2, subnet=SUBNET), ["master", "slave"])
    # a hung read (FIFO) fails the step within this instead of the 10-minute deadline
    gateway = ssh_gateway_factory(command_timeout=60.0)
    for node in nodes:
        sh(node_farm, node, f"printf 'keep me\\n' > {VICTIM} && chmod 0640 {VICTIM} && "
                            f"mkdir -m 0755 {VICTIM_DIR}")
    prov = Provisioner(make_config(client_key.public), gateway, lambda t: dict.fromkeys(t, 2))
    all_ok(prov.bootstrap(nodes))
    all_ok(prov.join(nodes[0], nodes[1:]))
    assert prov.apply_membership(nodes[0], nodes).ok
    return prov, nodes


def every_step(prov: Provisioner, nodes: list[Node], version: int) -> list[str]:
    """A changed bootstrap input, then bootstrap, join and membership as a pass runs
    them; the errors of every step."""
    fresh = Provisioner(make_config(prov.config["MGMT_KEY"], POST_INIT=f"echo v{version}\n"),
                        prov.ssh, prov.vcpus)
    master, slaves = nodes[0], nodes[1:]
    errors = [o.error for o in fresh.bootstrap(nodes).values() if not o.ok]
    try:
        errors += [o.error for o in fresh.join(master, slaves).values() if not o.ok]
    except (SshError, ValueError) as error:
        errors.append(str(error))
    membership = fresh.apply_membership(master, nodes)
    return errors + ([] if membership.ok else [membership.error])


@pytest.mark.nodes
@pytest.mark.parametrize("kind", sorted(FOUND))
def test_planted_paths_never_redirect_root(pair, node_farm: NodeFarm,  # noqa: F811
                                           kind: str) -> None:
    prov, nodes = pair
    master, slave = nodes
    before = {n.instance_id: system_state(node_farm, n) for n in nodes}
    targets = [(master, f"{HOME}/{p}") for p in MASTER_PATHS] + \
        [(slave, f"{HOME}/{p}") for p in SLAVE_PATHS] + [(master, TABLE)]
    if kind == "symlink":  # the folder itself
        targets.append((slave, f"{HOME}/.ssh"))
    for version, (node, path) in enumerate(targets, start=1):
        folder = path == f"{HOME}/.ssh"
        plant(node_farm, node, path, kind, VICTIM_DIR if folder else VICTIM)
        errors = every_step(prov, nodes, version)
        refusals = [e for e in errors if f"refusing {path} " in e]
        assert refusals, f"{kind} at {path} on {node.role}: not refused; errors: {errors}"
        found = f"symbolic link to {VICTIM_DIR}" if folder else FOUND[kind]
        if path == TABLE:  # checked by the gateway's own check (ssh.py)
            found = {"symlink": "symbolic link", "hardlink": "regular file (links/owner: 2|",
                     "fifo": "fifo", "directory": "directory"}[kind]
        assert found in refusals[0] and node.instance_id in refusals[0], refusals[0]
        if path == f"{HOME}/.erlang.cookie" and node is slave:  # the doctor names it too
            report = run_doctor(prov.config, master, [slave], prov.ssh)
            cookie = next(c for c in report.checks if c.check == "erlang cookie"
                          and c.node.startswith(disco.short_name(slave)))
            assert not cookie.ok and "mode/owner" in cookie.detail, cookie
        for each in nodes:
            assert system_state(node_farm, each) == before[each.instance_id], \
                f"{kind} at {path} on {node.role} changed a system file on {each.role}"
        sh(node_farm, node, f"rm -rf -- {shlex.quote(path)}")
    # the doctor reads the host table as the Disco user too: a planted link is named
    plant(node_farm, master, TABLE, kind)
    report = run_doctor(prov.config, master, [slave], prov.ssh, prov.vcpus)
    table = next(c for c in report.checks if c.check == "host table")
    assert not table.ok and f"refusing {TABLE}" in table.detail
    sh(node_farm, master, f"rm -rf -- {TABLE}")
    # the plants gone, the same steps work again
    assert every_step(prov, nodes, 0) == []


@pytest.mark.nodes
def test_old_fixed_temp_names_are_not_used(pair, node_farm: NodeFarm) -> None:  # noqa: F811
    """A key and a cookie made again write no fixed name: links planted there stay
    untouched and the victims with them."""
    prov, nodes = pair
    master = nodes[0]
    before = system_state(node_farm, master)
    for name in OLD_TMP_NAMES:
        plant(node_farm, master, f"{HOME}/{name}", "symlink")
    sh(node_farm, master, f"rm -f {HOME}/.ssh/id_ed25519.pub {HOME}/.erlang.cookie")
    assert every_step(prov, nodes, 1) == []
    assert system_state(node_farm, master) == before
    for name in OLD_TMP_NAMES:
        assert sh(node_farm, master, f"readlink {HOME}/{name}") == VICTIM + "\n"
    cookie = sh(node_farm, master, f"stat -c '%F %a %U %h' {HOME}/.erlang.cookie")
    assert cookie == "regular file 400 disco 1\n"


# -- DISCO_ROOT and DISCO_USER on the node: the config's fault -------------------------

@pytest.fixture
def one_node(start_nodes, ssh_gateway_factory, client_key):  # noqa: F811
    node = cluster_nodes(start_nodes(1, subnet=SUBNET), ["master"])[0]
    gateway = ssh_gateway_factory()

    def bootstrap(**values: object):
        prov = Provisioner(make_config(client_key.public, **values), gateway, lambda t: {})
        return prov.bootstrap([node])[node.instance_id]
    return node, bootstrap


@pytest.mark.nodes
def test_existing_disco_root_of_someone_else_is_refused_not_taken(
        one_node, node_farm: NodeFarm) -> None:  # noqa: F811
    node, bootstrap = one_node
    sh(node_farm, node, "mkdir -m 0755 /srv/taken && touch /srv/taken/theirs && "
                        "ln -s /srv/taken /srv/linked")
    for root in ("/srv/taken", "/srv/linked"):
        outcome = bootstrap(DISCO_ROOT=root)
        assert not outcome.ok and outcome.fault == "config", outcome.error
        assert f"DISCO_ROOT {root}" in outcome.error and node.instance_id in outcome.error
    assert "refusing to take it over" in bootstrap(DISCO_ROOT="/srv/taken").error
    assert sh(node_farm, node, "stat -c '%U %a' /srv/taken /srv/taken/theirs") == \
        "root 755\nroot 644\n"
    # a missing one is made, the Disco user's; its parents stay root's
    assert bootstrap(DISCO_ROOT="/srv/new/disco").ok
    assert sh(node_farm, node, "stat -c '%U' /srv/new /srv/new/disco") == "root\ndisco\n"


@pytest.mark.nodes
@pytest.mark.parametrize(("make", "why"), [
    ("useradd --system --shell /usr/sbin/nologin ddsys", "existing system account"),
    ("useradd -o -u 0 -M --shell /usr/sbin/nologin ddsys", "has uid 0"),
])
def test_system_or_root_disco_user_is_refused_and_left_alone(
        one_node, node_farm: NodeFarm, make: str, why: str) -> None:  # noqa: F811
    node, bootstrap = one_node
    sh(node_farm, node, make)
    account = sh(node_farm, node, "getent passwd ddsys; getent shadow ddsys")
    outcome = bootstrap(DISCO_USER="ddsys")
    assert not outcome.ok and outcome.fault == "config"
    assert why in outcome.error and "DISCO_USER ddsys" in outcome.error
    assert sh(node_farm, node, "getent passwd ddsys; getent shadow ddsys") == account


# -- who is blamed: only the node's own faults count toward replacing it ---------------

@dataclass
class Failing:
    ok: bool = False
    error: str = ""
    log_tail: tuple[str, ...] = ()
    fault: str = "node"


class BlamingWorker:
    """Bootstraps the master; the slave's bootstrap fails with the given fault class."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.slave = ""

    def begin_pass(self) -> None:
        """Nothing to forget: this double gives up on no node."""

    def bootstrap(self, nodes):
        return {n.instance_id: Failing(error=f"{n.instance_id} (10.0.0.11): refused",
                                       fault=self.fault) if n.instance_id == self.slave
                else Failing(ok=True) for n in nodes}

    def join(self, master, slaves):
        return {s.instance_id: Failing(ok=True) for s in slaves}

    def apply_membership(self, master, members, drain=False):
        return Failing(ok=True)


@pytest.mark.parametrize("fault", ["hostkey", "config", "tamper", "node"])
def test_only_node_faults_count_toward_replacement(tmp_path, fault: str) -> None:
    cfg, ec2, worker = config(tmp_path), FakeEc2(), BlamingWorker(fault)
    ec2.add_instance("master")
    worker.slave = ec2.add_instance("slave")
    codes, texts = [], []
    for minute in range(0, 60, 10):  # far beyond UNRESPONSIVE_MINUTES and 3 failures
        report = run(cfg, ec2, worker, now=NOW + timedelta(minutes=minute))
        codes.append(report.exit_code)
        texts.append(render_pass(report))
    terminated = [w for w in ec2.writes if w[0] == "terminate"]
    counted = [w for w in ec2.writes if w[0] == "tag" and
               {TAG_FAILURES, TAG_UNREACHABLE} & set(w[2])]
    if fault == "node":
        assert counted and terminated, "a failing node must still be replaced"
        return
    assert not counted and not terminated, (counted, terminated)
    assert ec2.instances[worker.slave]["State"]["Name"] == "running"
    assert set(codes) == {reconcile.EXIT_FAILED}, codes  # every pass, until someone acts
    for text in texts:
        assert worker.slave in text
        if fault == "hostkey":
            assert reconcile.forget_command(cfg, worker.slave) in text, text
        elif fault == "tamper":
            assert "kept for inspection" in text, text
        else:
            assert "fix the config" in text, text


def test_a_master_refused_at_join_for_its_host_key_is_kept(tmp_path) -> None:
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master")
    ec2.add_instance("slave")

    class RefusedMaster(BlamingWorker):
        def join(self, master_node, slaves):
            raise HostKeyMismatch(Target(master_node.instance_id, "10.0.0.10"),
                                  "host key changed: pinned A, now offered B")

    worker = RefusedMaster("node")
    for minute in range(0, 60, 10):
        report = run(cfg, ec2, worker, now=NOW + timedelta(minutes=minute))
        assert report.exit_code == reconcile.EXIT_FAILED
        assert reconcile.forget_command(cfg, master) in render_pass(report)
        assert not any(isinstance(r.action, Terminate) for r in report.results)
    assert TAG_FAILURES not in ec2.tags_of(master)
    assert TAG_UNREACHABLE not in ec2.tags_of(master)


def test_fault_classes_of_failures() -> None:
    target = Target("i-0abc", "10.0.0.9")
    assert fault_of(HostKeyMismatch(target, "changed")) == "hostkey"
    assert fault_of(CommandFailed(target, "bash -s", 78, "POST_INIT failed")) == "config"
    assert fault_of(CommandFailed(target, "bash -s", 77, "refusing /home/disco/x")) == "tamper"
    assert fault_of(CommandFailed(target, "bash -s", 1, "apt-get failed")) == "node"
    assert fault_of(BootstrapError("DISCO_TARBALL /x: no such file")) == "config"
    assert fault_of(TimeoutError()) == "node" and fault_of(None) == "node"
    # a step failing on several nodes (membership) keeps the fault that is not the node's
    assert provision._blame(["node", "tamper", "node"]) == "tamper"
    assert provision._blame(["node", "config"]) == "config"
    assert provision._blame(["node", "node"]) == "node"


@pytest.mark.nodes
def test_tarball_is_never_unpacked_through_folders_other_users_can_write(
        one_node, node_farm: NodeFarm, tmp_path) -> None:  # noqa: F811
    """Root's tar follows a link it meets on the way to a member: DISCO_ROOT, the Disco
    user's home and the temp folders are skipped, whatever the tarball holds."""
    node, bootstrap = one_node
    sh(node_farm, node, f"mkdir -m 0755 {VICTIM_DIR}")
    first = tarball(tmp_path / "first.tar.gz", [])
    assert bootstrap(DISCO_INSTALL="tarball", DISCO_TARBALL=str(first)).ok
    inside = ["srv/disco/ddfs", "home/disco/sub", "tmp/dd-planted"]
    for folder in inside:
        sh(node_farm, node, f"runuser -u disco -- ln -s {VICTIM_DIR} /{folder}")
    second = tarball(tmp_path / "second.tar.gz", [f"{folder}/evil" for folder in inside])
    outcome = bootstrap(DISCO_INSTALL="tarball", DISCO_TARBALL=str(second))
    assert outcome.ok, outcome.error
    assert sh(node_farm, node, f"ls -A {VICTIM_DIR}") == ""
    assert sh(node_farm, node, "cat /usr/local/bin/disco") == FAKE_DISCO  # the rest is there


def tarball(path: Path, extra: list[str]) -> Path:
    """An installed-tree tarball: the stand-in disco command plus `extra` files."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, mode in [("usr/local/bin/disco", FAKE_DISCO.encode(), 0o755),
                                 *((name, b"evil\n", 0o644) for name in extra)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fault", ["hostkey", "config", "tamper", "node"])
def test_up_wait_stops_at_once_only_for_what_another_pass_cannot_fix(tmp_path,
                                                                      fault: str) -> None:
    """`up --wait` retries a node's own failure, but not one only the operator can fix."""
    from disposabledisco.cli import _permanent

    cfg, ec2, worker = config(tmp_path), FakeEc2(), BlamingWorker(fault)
    ec2.add_instance("master")
    worker.slave = ec2.add_instance("slave")
    report = run(cfg, ec2, worker, now=NOW)
    failed = [r for r in report.results if not r.ok]
    assert failed and failed[0].faults == {worker.slave: fault}
    assert _permanent(report) is (fault != "node")
