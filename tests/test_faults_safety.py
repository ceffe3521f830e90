"""Safety scenarios with the real CLI against the fault lab (tests/fault_fixtures.py:
spot market over moto, real sshd nodes).

* The reviewer's reproduction: the Disco user plants links to /etc/passwd and /etc/shadow
  where the bootstrap writes, a bootstrap input changes, one `up`: no system file changes
  and the pass fails naming the instance, the path and the link.
* A slave's host key changes under a running cluster (a rebuilt instance, or a man in the
  middle): every pass must fail (exit 1) naming the instance and the command that forgets
  its pin, and the node must never be counted as failing or replaced, however long it
  lasts: replacing it would destroy the evidence and tell cron "progressing".
"""

from __future__ import annotations

import shlex

import pytest

from disposabledisco.cluster import TAG_FAILURES, TAG_UNREACHABLE
from disposabledisco.config import load_config
from disposabledisco.hostkeys import HostKeyStore
from tests.fault_fixtures import DISCO_HOME, FaultLab

pytestmark = pytest.mark.nodes


def test_changed_slave_host_key_fails_every_pass_and_never_replaces_the_node(
        fault_lab: FaultLab) -> None:
    case = fault_lab.case("hostkey-changed", slaves=1)
    case.write_config(UNRESPONSIVE_MINUTES=1, SSH_DEADLINE_SECONDS=5)
    case.converge()
    slave = case.live_of("slave")[0]["InstanceId"]
    pin = HostKeyStore(load_config(case.config_path).state_dir).path(slave)
    case.lab.farm.replace_host_key(slave)
    case.post_init_version = 2  # a changed bootstrap input: every node is contacted again
    case.write_config(UNRESPONSIVE_MINUTES=1, SSH_DEADLINE_SECONDS=5)
    for attempt in range(4):  # 4 passes, 4 minutes: past 3 failures and the 1-minute timer
        run = case.up()
        assert run.code == 1, run.describe()
        assert not run.traceback, run.describe()
        out = run.stdout + run.stderr
        command = f"disposabledisco forget-host-key {shlex.quote(str(case.config_path))} {slave}"
        assert slave in out and command in out, run.describe()
        assert not [a for a in run.actions if a["kind"] == "Terminate"], run.describe()
        instance = next(i for i in case.instances() if i["InstanceId"] == slave)
        assert instance["State"]["Name"] == "running", f"pass {attempt}: {instance['State']}"
        tags = {t["Key"] for t in instance.get("Tags", [])}
        assert not {TAG_FAILURES, TAG_UNREACHABLE} & tags, f"pass {attempt}: {tags}"
        case.advance(61)
    assert len(case.instances()) == 2, "nothing was launched to replace it"
    # the operator looked and runs the printed command: the next passes converge
    forgot = case.run(*shlex.split(command)[1:])
    assert forgot.code == 0 and not pin.exists(), forgot.describe()
    case.converge()


def test_links_planted_by_the_disco_user_change_no_system_file_through_up(
        fault_lab: FaultLab) -> None:
    case = fault_lab.case("planted-links", slaves=1)
    case.converge()
    master = case.live_of("master")[0]["InstanceId"]
    slave = case.live_of("slave")[0]["InstanceId"]
    watched = ("stat -c '%n %u %g %a %s %i' /etc/passwd /etc/shadow /root/.ssh; "
               "sha256sum /etc/passwd /etc/shadow; id -u disco")
    before = {iid: case.sh(iid, watched) for iid in (master, slave)}
    plants = {master: [(".erlang.cookie", "/etc/passwd"),
                       (".ssh/id_ed25519.pub.tmp", "/root/.ssh/authorized_keys")],
              slave: [(".ssh/authorized_keys", "/etc/shadow")]}
    for iid, links in plants.items():
        for name, victim in links:
            path = f"{DISCO_HOME}/{name}"
            case.sh(iid, f"runuser -u disco -- sh -c 'rm -f {path} && ln -s {victim} {path}'")
    case.post_init_version = 2  # any change of a bootstrap input
    case.write_config()
    run = case.up()
    assert run.code == 1 and not run.traceback, run.describe()
    out = run.stdout + run.stderr
    for iid, path, victim in ((master, ".erlang.cookie", "/etc/passwd"),
                              (slave, ".ssh/authorized_keys", "/etc/shadow")):
        line = next((ln for ln in out.splitlines() if f"refusing {DISCO_HOME}/{path} " in ln),
                    "")
        assert iid in line and f"symbolic link to {victim}" in line, run.describe()
    for iid in (master, slave):
        assert case.sh(iid, watched) == before[iid], f"{iid}: a system file changed"
