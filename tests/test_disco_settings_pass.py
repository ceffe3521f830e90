"""A pass and Disco's settings: a master whose bootstrap wrote new settings gets the
membership step (which restarts its Disco) even when the host table is unchanged, and the
restart is said in the pass's report; a restart that waits for a running job keeps the
cluster progressing until a later pass restarted Disco; a scale-down that changes the
settings drains the leaving slave first. In-process doubles from test_reconcile_unit.
"""

from __future__ import annotations

from disposabledisco import reconcile
from disposabledisco.cluster import TAG_DISCO_RESTART
from disposabledisco.plan import ApplyMembership, Bootstrap
from disposabledisco.provision import AppliedTable, Stamp
from tests.test_reconcile_unit import (
    TAG,
    FakeEc2,
    FakeWorker,
    config,
    failure_tags,
    result_of,
    run,
)

RESTARTED = "restarted Disco on ip-10-0-0-1: its settings changed"
PENDING = ("Disco restart pending on ip-10-0-0-1: its settings changed; waiting for job(s) "
           "long@5a1 to end")


class SettingsWorker(FakeWorker):
    """Bootstraps report whether the node wrote new settings; the membership step says
    that it restarted Disco, as the real provisioner does."""

    def __init__(self) -> None:
        super().__init__()
        self.settings_changed = False
        self.job_running = False  # what Disco's job list says on the master

    def bootstrap(self, nodes):
        outcomes = super().bootstrap(nodes)
        for outcome in outcomes.values():
            stamp = Stamp("digest")
            stamp.settings_changed = self.settings_changed
            outcome.value = stamp
        return outcomes

    def apply_membership(self, master, members, drain=False):
        outcome = super().apply_membership(master, members, drain)
        table = AppliedTable([["ip-10-0-0-1", "2"]])
        if not drain:
            table.note = PENDING if self.job_running else RESTARTED
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


def test_a_restart_that_waits_for_a_job_keeps_the_cluster_progressing_until_done(tmp_path):
    """The master says the restart waits for a job: the step is ok (not failed, nothing
    counted against the master), the pass is progressing, and each later pass runs the
    step again until Disco restarted; then the cluster is converged."""
    ec2, worker = converged(tmp_path)
    master = next(i for i in ec2.instances if ec2.tags_of(i)[TAG] == "master")
    worker.settings_changed = worker.job_running = True
    cfg = config(tmp_path, DISCO_SETTINGS={"DISCO_WORKER_MAX_MEM": "50%"})
    waiting = run(cfg, ec2, worker)
    step = result_of(waiting, ApplyMembership)
    assert (step.ok, step.skipped, step.detail) == (True, False, f"2 hosts; {PENDING}")
    assert waiting.exit_code == reconcile.EXIT_PROGRESSING
    assert TAG_DISCO_RESTART in ec2.tags_of(master) and failure_tags(ec2) == []

    worker.settings_changed = False  # nothing new to write: only the restart is due
    still = run(cfg, ec2, worker)
    assert result_of(still, ApplyMembership).detail == f"2 hosts; {PENDING}"
    assert still.exit_code == reconcile.EXIT_PROGRESSING

    worker.job_running = False
    done = run(cfg, ec2, worker)
    assert result_of(done, ApplyMembership).detail == f"2 hosts; {RESTARTED}"
    assert TAG_DISCO_RESTART not in ec2.tags_of(master)
    worker.calls.clear()
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_CONVERGED
    assert worker.calls == []


def test_a_scale_down_that_changes_the_settings_drains_before_it_terminates(tmp_path):
    """2 -> 1 slave lowers DDFS replicas: every bootstrap digest changes, so no node is
    ready this pass. The leaving slave still leaves Disco's table (a table-only step
    with the master and the kept slave) before its instance is terminated; the full
    membership step, with the settings, follows the bootstrap."""
    ec2, worker = converged(tmp_path, NUM_SLAVES=2)
    worker.settings_changed = True  # the replica counts
    report = run(config(tmp_path, NUM_SLAVES=1), ec2, worker)
    kinds = [type(r.action).__name__ for r in report.results]
    assert kinds[:3] == ["ApplyMembership", "CancelRequests", "Terminate"]
    drain, terminate = report.results[0], report.results[2]
    assert (drain.ok, drain.skipped) == (True, False) and drain.action.leaving_ids
    (leaving,) = terminate.action.instance_ids
    assert drain.action.leaving_ids == (leaving,)
    (table,) = worker.drains
    assert leaving not in table and len(table) == 2  # the master and the kept slave
    assert worker.calls[0] == ("membership", table)
    assert worker.kinds()[1:] == ["bootstrap", "membership"]
