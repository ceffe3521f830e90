"""A pass and Disco's settings: a master whose bootstrap wrote new settings gets the
membership step (which restarts its Disco) even when the host table is unchanged, and the
restart is said in the pass's report. In-process doubles from test_reconcile_unit.
"""

from __future__ import annotations

from disposabledisco.plan import ApplyMembership, Bootstrap
from disposabledisco.provision import AppliedTable, Stamp
from tests.test_reconcile_unit import FakeEc2, FakeWorker, config, result_of, run


class SettingsWorker(FakeWorker):
    """Bootstraps report whether the node wrote new settings; the membership step says
    that it restarted Disco, as the real provisioner does."""

    def __init__(self) -> None:
        super().__init__()
        self.settings_changed = False

    def bootstrap(self, nodes):
        outcomes = super().bootstrap(nodes)
        for outcome in outcomes.values():
            stamp = Stamp("digest")
            stamp.settings_changed = self.settings_changed
            outcome.value = stamp
        return outcomes

    def apply_membership(self, master, members):
        outcome = super().apply_membership(master, members)
        table = AppliedTable([["ip-10-0-0-1", "2"]])
        table.note = "restarted Disco on ip-10-0-0-1: its settings changed"
        outcome.value = table
        return outcome


def converged(tmp_path, **values) -> tuple[FakeEc2, SettingsWorker]:
    ec2, worker = FakeEc2(), SettingsWorker()
    for _ in range(3):
        run(config(tmp_path, **values), ec2, worker)
    worker.calls.clear()
    return ec2, worker


def test_new_settings_on_the_master_run_the_membership_step_and_report_the_restart(tmp_path):
    ec2, worker = converged(tmp_path)
    worker.settings_changed = True
    report = run(config(tmp_path, DISCO_SETTINGS={"DISCO_WORKER_MAX_MEM": "50%"}), ec2,
                 worker)
    assert [type(a) for a in report.plan.actions] == [Bootstrap, ApplyMembership]
    membership = result_of(report, ApplyMembership)
    assert (membership.ok, membership.skipped) == (True, False)
    assert membership.detail == ("2 hosts; restarted Disco on ip-10-0-0-1: its settings "
                                 "changed")
    assert worker.kinds() == ["bootstrap", "membership"]


def test_a_bootstrap_that_left_the_settings_alone_keeps_the_table_step_skipped(tmp_path):
    ec2, worker = converged(tmp_path)
    report = run(config(tmp_path, POST_INIT="true"), ec2, worker)
    membership = result_of(report, ApplyMembership)
    assert (membership.skipped, membership.detail) == (True, "host table already current")
    assert worker.kinds() == ["bootstrap"]


def test_a_plain_outcome_without_a_stamp_counts_as_unchanged(tmp_path):
    """Doubles and older workers return no Stamp: nothing is restarted for them."""
    ec2, worker = converged(tmp_path)
    worker.settings_changed = True
    plain = FakeWorker()
    report = run(config(tmp_path, POST_INIT="true"), ec2, plain)
    assert result_of(report, ApplyMembership).skipped
