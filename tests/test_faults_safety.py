"""A slave's host key changes under a running cluster (a rebuilt instance, or a man in
the middle): the real CLI against the fault lab (tests/fault_fixtures.py: spot market over
moto, real sshd nodes). Every pass must fail (exit 1) naming the instance and the command
that forgets its pin, and the node must never be counted as failing or replaced, however
long it lasts: replacing it would destroy the evidence and tell cron "progressing".
"""

from __future__ import annotations

import shlex

import pytest

from disposabledisco.cluster import TAG_FAILURES, TAG_UNREACHABLE
from disposabledisco.config import load_config
from disposabledisco.hostkeys import HostKeyStore
from tests.fault_fixtures import FaultLab

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
        assert slave in out and f"rm {shlex.quote(str(pin))}" in out, run.describe()
        assert not [a for a in run.actions if a["kind"] == "Terminate"], run.describe()
        instance = next(i for i in case.instances() if i["InstanceId"] == slave)
        assert instance["State"]["Name"] == "running", f"pass {attempt}: {instance['State']}"
        tags = {t["Key"] for t in instance.get("Tags", [])}
        assert not {TAG_FAILURES, TAG_UNREACHABLE} & tags, f"pass {attempt}: {tags}"
        case.advance(61)
    assert len(case.instances()) == 2, "nothing was launched to replace it"
    # the operator looked and forgets the pin: the next passes converge with the new key
    pin.unlink()
    case.converge()
