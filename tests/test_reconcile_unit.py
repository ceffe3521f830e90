"""One reconcile pass below the CLI: bookkeeping in tags, what is applied, and exit codes.

The EC2 gateway and the node worker are in-process doubles: the EC2 double keeps
requests and instances as boto3-shaped dicts (so `build_cluster` sees what EC2 would
list, and tags written by one pass are what the next pass reads), the worker answers
each node's work as the test says. The real gateways are tested against moto and real
sshd elsewhere; these tests check the pass's own decisions in milliseconds.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from disposabledisco import reconcile
from disposabledisco.cluster import (
    TAG_BOOTSTRAP,
    TAG_FAILURES,
    TAG_GROUP,
    TAG_HOSTS,
    TAG_JOINED,
    TAG_UNREACHABLE,
    join_record,
    join_tag,
)
from disposabledisco.config import parse_config
from disposabledisco.ec2 import AwsError, Launched, Observation
from disposabledisco.hostkeys import HostKey, HostKeyStore
from disposabledisco.joins import JoinBook
from disposabledisco.plan import ApplyMembership, Bootstrap, CancelRequests, Join, Launch
from disposabledisco.ssh import SshError
from disposabledisco.tokens import TokenBook

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
TAG = "dd-unit"


def config(tmp_path, **overrides):
    values = {"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "TAG_KEY": TAG,
              "INSTANCE_TYPE": "m5.large", "NUM_SLAVES": 1, "MAX_BID": "0.10",
              "STATE_DIR": str(tmp_path / "state"), "MGMT_KEY": "", "DISCO_INSTALL": "none",
              **overrides}
    return parse_config({k: v for k, v in values.items() if v is not None})


class FakeEc2:
    """EC2 as dicts: launches fulfil at once (untagged spot instances), tags stick."""

    def __init__(self) -> None:
        self.requests: dict[str, dict] = {}
        self.instances: dict[str, dict] = {}
        self.writes: list[tuple] = []
        self.fail_launch: AwsError | None = None
        self.launched: list[tuple] = []
        self._ids = itertools.count(1)

    def add_instance(self, role: str, state: str = "running", minutes_old: float = 30,
                     **tags: str) -> str:
        iid = f"i-{next(self._ids):04d}"
        group = "master" if role == "master" else "m5.large"
        self.instances[iid] = {
            "InstanceId": iid, "State": {"Name": state}, "InstanceType": "m5.large",
            "LaunchTime": NOW - timedelta(minutes=minutes_old), "ImageId": "ami-x",
            "PrivateIpAddress": f"10.0.0.{len(self.instances) + 10}",
            "Tags": [{"Key": k, "Value": v} for k, v in
                     {TAG: role, TAG_GROUP: group, **tags}.items()]}
        return iid

    def add_open_request(self, minutes_old: float, role: str = "slave") -> str:
        rid = f"sir-{next(self._ids):04d}"
        self.requests[rid] = {
            "SpotInstanceRequestId": rid, "State": "open", "Type": "one-time",
            "Status": {"Code": "pending-evaluation"}, "SpotPrice": "0.1",
            "CreateTime": NOW - timedelta(minutes=minutes_old),
            "LaunchSpecification": {"InstanceType": "m5.large", "ImageId": "ami-x"},
            "Tags": [{"Key": TAG, "Value": role}, {"Key": TAG_GROUP, "Value": "m5.large"}]}
        return rid

    def tags_of(self, iid: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self.instances[iid]["Tags"]}

    # -- the gateway's interface ---------------------------------------------------------

    def observe(self) -> Observation:
        return Observation(copy.deepcopy(list(self.requests.values())),
                           copy.deepcopy(list(self.instances.values())))

    def tag(self, instance_ids: list[str], tags: dict[str, str]) -> None:
        self.writes.append(("tag", tuple(instance_ids), dict(tags)))
        for iid in instance_ids:
            self.instances[iid]["Tags"] = [{"Key": k, "Value": v} for k, v in
                                           {**self.tags_of(iid), **tags}.items()]

    def untag(self, instance_ids: list[str], keys: list[str]) -> None:
        self.writes.append(("untag", tuple(instance_ids), tuple(keys)))
        for iid in instance_ids:
            self.instances[iid]["Tags"] = [t for t in self.instances[iid]["Tags"]
                                           if t["Key"] not in keys]

    def cancel(self, request_ids: list[str]) -> None:
        self.writes.append(("cancel", tuple(request_ids)))
        for rid in request_ids:
            self.requests[rid]["State"] = "cancelled"

    def terminate(self, instance_ids: list[str]) -> None:
        self.writes.append(("terminate", tuple(instance_ids)))
        for iid in instance_ids:
            self.instances[iid]["State"] = {"Name": "terminated"}

    def launch(self, role, group, instance_type, count, market, bid, token,
               pools=()) -> Launched:
        self.writes.append(("launch", role, count, market, token))
        self.launched.append((role, group, instance_type, count, market, bid))
        if self.fail_launch:
            raise self.fail_launch
        ids = []
        for _ in range(count):
            iid = f"i-{next(self._ids):04d}"
            self.instances[iid] = {
                "InstanceId": iid, "State": {"Name": "running"}, "InstanceType": instance_type,
                "LaunchTime": NOW, "ImageId": "ami-x", "InstanceLifecycle": "spot",
                "PrivateIpAddress": f"10.0.1.{len(self.instances)}", "Tags": []}
            rid = f"sir-{next(self._ids):04d}"
            self.requests[rid] = {
                "SpotInstanceRequestId": rid, "State": "active", "InstanceId": iid,
                "Status": {"Code": "fulfilled"}, "SpotPrice": str(bid), "CreateTime": NOW,
                "Type": "one-time", "LaunchSpecification": {"InstanceType": instance_type},
                "Tags": [{"Key": TAG, "Value": role}, {"Key": TAG_GROUP, "Value": group}]}
            ids.append(rid)
        return Launched(ids, {})


@dataclass
class Outcome:
    ok: bool
    error: str | None = None
    log_tail: tuple[str, ...] = ()


class FakeWorker:
    """Node work that succeeds unless an instance is listed in `failing`."""

    def __init__(self, failing: set[str] = frozenset(), master_raises: bool = False) -> None:
        self.failing = set(failing)
        self.master_raises = master_raises
        self.master_fault = "node"
        self.error: str | None = "connection refused"
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.drains: list[tuple[str, ...]] = []  # the members of each table-only drain
        self.passes = 0  # begin_pass calls

    def begin_pass(self) -> None:
        self.passes += 1

    def _outcome(self, iid: str) -> Outcome:
        if iid in self.failing:
            return Outcome(False, self.error and f"{iid}: {self.error}", ("last log line",))
        return Outcome(True)

    def bootstrap(self, nodes):
        self.calls.append(("bootstrap", tuple(n.instance_id for n in nodes)))
        return {n.instance_id: self._outcome(n.instance_id) for n in nodes}

    def join(self, master, slaves):
        self.calls.append(("join", (master.instance_id, *(s.instance_id for s in slaves))))
        if self.master_raises:
            error = SshError(None, f"{master.instance_id}: connection refused")
            error.fault = self.master_fault  # what ssh.fault_of reads
            raise error
        return {s.instance_id: self._outcome(s.instance_id) for s in slaves}

    def apply_membership(self, master, members, drain=False):
        self.calls.append(("membership", tuple(n.instance_id for n in members)))
        if drain:
            self.drains.append(tuple(n.instance_id for n in members))
        return self._outcome(master.instance_id)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def run(cfg, ec2, worker, now=NOW, **kwargs) -> reconcile.PassReport:
    return reconcile.run_pass(cfg, ec2, worker, now=lambda: now, **kwargs)


def result_of(report, kind):
    found = [r for r in report.results if isinstance(r.action, kind)]
    assert len(found) == 1, [type(r.action).__name__ for r in report.results]
    return found[0]


def failure_tags(ec2) -> list[tuple]:
    return [w for w in ec2.writes if w[0] == "tag" and TAG_FAILURES in w[2]]


# -- convergence and exit codes --------------------------------------------------------------

def test_from_nothing_to_converged_with_exit_codes_10_then_0(tmp_path):
    cfg, ec2, worker = config(tmp_path), FakeEc2(), FakeWorker()
    first = run(cfg, ec2, worker)
    assert [type(r.action) for r in first.results] == [Launch, Launch]
    assert first.exit_code == reconcile.EXIT_PROGRESSING and first.did_something
    second = run(cfg, ec2, worker)
    assert second.exit_code == reconcile.EXIT_PROGRESSING
    assert worker.kinds() == ["bootstrap", "join", "membership"]
    third = run(cfg, ec2, worker)
    assert third.plan.actions == () and third.results == []
    assert third.exit_code == reconcile.EXIT_CONVERGED and third.converged
    assert {n.state for n in third.cluster.nodes} == {"ready"}
    master = next(n for n in third.cluster.nodes if n.role == "master")
    slave = next(n for n in third.cluster.nodes if n.role == "slave")
    assert slave.tags[TAG_JOINED] == join_tag(master.instance_id, "")
    assert JoinBook(cfg.state_dir).read() == {
        slave.instance_id: join_record(master.instance_id, "", None)}
    assert master.tags[TAG_BOOTSTRAP] == reconcile.desired_state(cfg).bootstrap["master"]


def test_converged_needs_the_desired_number_of_ready_slaves(tmp_path):
    cfg, ec2, worker = config(tmp_path, NUM_SLAVES=2), FakeEc2(), FakeWorker()
    for _ in range(3):
        run(cfg, ec2, worker)
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_CONVERGED
    report = run(config(tmp_path, NUM_SLAVES=3), ec2, worker, dry_run=True)
    assert report.exit_code == reconcile.EXIT_PROGRESSING and not report.converged


def test_a_failed_ec2_action_fails_the_pass_and_the_rest_still_runs(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    ec2.fail_launch = AwsError("InsufficientInstanceCapacity", "no capacity")
    report = run(cfg, ec2, FakeWorker())
    assert [r.ok for r in report.results] == [False, False]  # both launches tried
    assert "InsufficientInstanceCapacity" in report.results[0].detail
    assert report.failed and report.exit_code == reconcile.EXIT_FAILED


def test_plan_problems_fail_the_pass_even_when_every_action_worked(tmp_path):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=5, MAX_HOURLY_COST="0.30"), FakeEc2()
    report = run(cfg, ec2, FakeWorker())
    assert report.plan.problems and "MAX_HOURLY_COST" in report.plan.problems[0]
    assert report.results and all(r.ok for r in report.results)
    assert report.failed and report.exit_code == reconcile.EXIT_FAILED


def test_a_failed_node_fails_the_pass_with_its_log(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master")
    report = run(cfg, ec2, FakeWorker(failing={master}))
    result = result_of(report, Bootstrap)
    assert not result.ok and result.detail == "0 of 1 done"
    assert result.node_errors == {master: f"{master}: connection refused\nlast log line"}
    assert report.exit_code == reconcile.EXIT_FAILED


def test_every_pass_first_lets_the_worker_forget_the_nodes_it_gave_up(tmp_path):
    """A node given up in one pass is tried again in the next: begin_pass runs first in
    each pass, before any node work."""
    cfg, ec2, worker = config(tmp_path), FakeEc2(), FakeWorker()
    ec2.add_instance("master")
    seen: list[tuple[int, int]] = []
    original = worker.bootstrap

    def bootstrap(nodes):
        seen.append((worker.passes, len(worker.calls)))
        return original(nodes)

    worker.bootstrap = bootstrap
    run(cfg, ec2, worker)
    assert worker.passes == 1 and seen == [(1, 0)]
    run(cfg, ec2, worker)
    assert worker.passes == 2


def test_dry_run_applies_nothing(tmp_path):
    cfg, ec2, worker = config(tmp_path), FakeEc2(), FakeWorker()
    ec2.add_instance("master", **{TAG_FAILURES: "1"})
    report = run(cfg, ec2, worker, dry_run=True)
    assert [type(a) for a in report.plan.actions] == [Launch, Bootstrap, ApplyMembership]
    assert report.results == [] and ec2.writes == [] and worker.calls == []
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("tokens*"))
    assert report.exit_code == reconcile.EXIT_PROGRESSING


def test_down_wants_no_slaves_and_cancels_then_terminates(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master")
    rid = ec2.add_open_request(1)
    report = run(cfg, ec2, None, down=True)
    assert report.desired_slaves == 0
    assert ec2.writes == [("cancel", (rid,)), ("terminate", (master,))]
    assert run(cfg, ec2, None, down=True).plan.actions == ()


def test_without_ssh_node_work_is_skipped_not_failed(tmp_path):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=0), FakeEc2()
    ec2.add_instance("master")
    report = run(cfg, ec2, None)
    assert [type(r.action) for r in report.results] == [Bootstrap, ApplyMembership]
    assert [(r.action, r.ok, r.skipped, r.detail) for r in report.results] == [
        (a, True, True, "node work is off for this pass") for a in report.plan.actions]
    assert not report.did_something
    assert report.exit_code == reconcile.EXIT_PROGRESSING  # not converged: not bootstrapped


def test_launches_use_one_token_per_decision_from_the_token_book(tmp_path):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=0), FakeEc2()
    ec2.fail_launch = AwsError("RequestLimitExceeded", "slow down")
    run(cfg, ec2, None)
    run(cfg, ec2, None, now=NOW + timedelta(minutes=1))  # same decision, same token
    first, again = (w[4] for w in ec2.writes)
    assert first == again
    key = run(cfg, ec2, None, dry_run=True).plan.actions[0].key
    assert TokenBook(cfg.state_dir).token_for(key, NOW) == first


# -- the open-request timeout is in minutes ---------------------------------------------------

@pytest.mark.parametrize(("minutes_old", "stale"), [(4, False), (6, True)])
def test_spot_open_timeout_minutes_are_minutes(tmp_path, minutes_old, stale):
    cfg = config(tmp_path, NUM_SLAVES=1, SPOT_OPEN_TIMEOUT_MINUTES=5)
    assert reconcile.desired_state(cfg).open_timeout == timedelta(minutes=5)
    ec2 = FakeEc2()
    rid = ec2.add_open_request(minutes_old)
    report = run(cfg, ec2, None, dry_run=True)
    cancels = [a for a in report.plan.actions if isinstance(a, CancelRequests)]
    slave_bids = [a for a in report.plan.actions if isinstance(a, Launch) and a.role == "slave"]
    assert [c.request_ids for c in cancels] == ([(rid,)] if stale else [])
    assert len(slave_bids) == (1 if stale else 0)


# -- failure bookkeeping ----------------------------------------------------------------------

def test_first_failure_counts_one_and_starts_the_unreachable_clock(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master")
    run(cfg, ec2, FakeWorker(failing={master}))
    assert failure_tags(ec2) == [("tag", (master,), {TAG_FAILURES: "1",
                                                     TAG_UNREACHABLE: NOW.isoformat()})]


def test_failures_count_up_by_one_per_pass_and_the_clock_is_kept(tmp_path):
    cfg, ec2 = config(tmp_path, UNRESPONSIVE_MINUTES=60), FakeEc2()
    master = ec2.add_instance("master")
    worker = FakeWorker(failing={master})
    seen = []
    for minute in (0, 1, 2):
        run(cfg, ec2, worker, now=NOW + timedelta(minutes=minute))
        tags = ec2.tags_of(master)
        seen.append((tags[TAG_FAILURES], tags[TAG_UNREACHABLE]))
    assert seen == [(str(n), NOW.isoformat()) for n in (1, 2, 3)]
    report = run(cfg, ec2, worker, now=NOW + timedelta(minutes=3))  # 3 failures: replaced
    assert ("terminate", (master,)) in ec2.writes
    assert any(isinstance(a, Launch) and a.role == "master" for a in report.plan.actions)


def test_failure_count_starts_from_the_existing_tag(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    since = (NOW - timedelta(minutes=3)).isoformat()
    master = ec2.add_instance("master", **{TAG_FAILURES: "1", TAG_UNREACHABLE: since})
    run(cfg, ec2, FakeWorker(failing={master}))
    assert failure_tags(ec2) == [("tag", (master,), {TAG_FAILURES: "2",
                                                     TAG_UNREACHABLE: since})]


def test_a_damaged_failure_tag_counts_as_none_before(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master", **{TAG_FAILURES: "many"})
    run(cfg, ec2, FakeWorker(failing={master}))
    assert ec2.tags_of(master)[TAG_FAILURES] == "1"


def test_two_failed_outcomes_in_one_pass_count_once(tmp_path):
    """A master whose join raises and whose host table update fails in the same pass:
    one failure per pass (a node given up in one step is skipped in the next)."""
    cfg, ec2 = config(tmp_path), FakeEc2()
    digests = reconcile.desired_state(cfg).bootstrap
    master = ec2.add_instance("master", **{TAG_BOOTSTRAP: digests["master"]})
    slave = ec2.add_instance("slave", **{TAG_BOOTSTRAP: digests["slave"]})
    worker = FakeWorker(failing={master}, master_raises=True)
    report = run(cfg, ec2, worker)
    join = result_of(report, Join)
    assert not join.ok and join.detail.startswith(f"master {master}: ")
    assert worker.kinds() == ["join", "membership"]
    assert not result_of(report, ApplyMembership).ok
    assert ec2.tags_of(master)[TAG_FAILURES] == "1"
    run(cfg, ec2, worker)  # the next pass counts again
    assert ec2.tags_of(master)[TAG_FAILURES] == "2"
    assert TAG_FAILURES not in ec2.tags_of(slave)  # the master failed, not the slave


def test_membership_failure_is_charged_to_the_master(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master")
    ec2.add_instance("slave")
    worker = FakeWorker(failing={master})
    run(cfg, ec2, worker)  # bootstrap fails for the master: 1
    assert ec2.tags_of(master)[TAG_FAILURES] == "1"
    worker.failing.clear()
    run(cfg, ec2, worker)  # works: both tags go
    assert not {TAG_FAILURES, TAG_UNREACHABLE} & set(ec2.tags_of(master))
    ec2.untag([master], [TAG_HOSTS])  # the host table must be written again...
    worker.failing.add(master)  # ...and the master does not answer
    report = run(cfg, ec2, worker)
    membership = result_of(report, ApplyMembership)
    assert not membership.ok and membership.node_errors == {
        master: f"{master}: connection refused\nlast log line"}
    assert ec2.tags_of(master)[TAG_FAILURES] == "1"
    assert TAG_HOSTS not in ec2.tags_of(master)


def test_recovery_removes_both_tags_once(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    since = (NOW - timedelta(minutes=3)).isoformat()
    master = ec2.add_instance("master", **{TAG_FAILURES: "2", TAG_UNREACHABLE: since})
    other = ec2.add_instance("slave")
    run(cfg, ec2, FakeWorker())
    untags = [w for w in ec2.writes if w[0] == "untag"]
    assert untags == [("untag", (master,), (TAG_FAILURES, TAG_UNREACHABLE))]
    assert not {TAG_FAILURES, TAG_UNREACHABLE} & set(ec2.tags_of(master))
    assert failure_tags(ec2) == []
    assert other not in untags[0][1]


def test_recovery_of_only_the_clock_tag_is_cleared_too(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master", **{TAG_UNREACHABLE: NOW.isoformat()})
    run(cfg, ec2, FakeWorker())
    assert ("untag", (master,), (TAG_FAILURES, TAG_UNREACHABLE)) in ec2.writes


# -- what is skipped --------------------------------------------------------------------------

def test_join_and_membership_skipped_when_the_master_bootstrap_failed(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master")
    slave = ec2.add_instance("slave")
    worker = FakeWorker(failing={master})
    report = run(cfg, ec2, worker)
    assert worker.calls == [("bootstrap", (master, slave))]
    join, membership = result_of(report, Join), result_of(report, ApplyMembership)
    assert (join.ok, join.skipped, join.detail) == (True, True, "master not bootstrapped yet")
    assert (membership.ok, membership.skipped, membership.detail) == (
        True, True, "master not bootstrapped yet")
    assert membership.ok is True and join.ok is True
    assert ec2.tags_of(slave)[TAG_BOOTSTRAP] == reconcile.desired_state(cfg).bootstrap["slave"]
    assert TAG_JOINED not in ec2.tags_of(slave)
    assert report.exit_code == reconcile.EXIT_FAILED


def test_join_skips_slaves_whose_bootstrap_failed(tmp_path):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=2), FakeEc2()
    master = ec2.add_instance("master")
    good, bad = ec2.add_instance("slave"), ec2.add_instance("slave")
    worker = FakeWorker(failing={bad})
    run(cfg, ec2, worker)
    assert worker.calls[1] == ("join", (master, good))
    assert worker.calls[2] == ("membership", (master, good))
    assert TAG_JOINED not in ec2.tags_of(bad)
    assert ec2.tags_of(good)[TAG_JOINED] == join_tag(master, "")
    assert set(JoinBook(cfg.state_dir).read()) == {good}
    assert TAG_BOOTSTRAP not in ec2.tags_of(bad)


def test_join_with_no_bootstrapped_slave_is_skipped(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    digests = reconcile.desired_state(cfg).bootstrap
    ec2.add_instance("master", **{TAG_BOOTSTRAP: digests["master"]})
    slave = ec2.add_instance("slave")
    worker = FakeWorker(failing={slave})
    report = run(cfg, ec2, worker)
    join = result_of(report, Join)
    assert (join.ok, join.skipped, join.detail) == (True, True, "no bootstrapped slave to join")
    assert join.ok is True
    assert "join" not in worker.kinds()


def test_membership_skipped_when_the_hosts_digest_already_matches(tmp_path):
    cfg, ec2, worker = config(tmp_path), FakeEc2(), FakeWorker()
    for _ in range(3):
        run(cfg, ec2, worker)
    new = ec2.add_instance("slave")  # a second slave whose bootstrap fails:
    worker.failing.add(new)  # the table planned for it ends up the same as before
    worker.calls.clear()
    report = run(config(tmp_path, NUM_SLAVES=2), ec2, worker)
    assert [type(a) for a in report.plan.actions] == [Bootstrap, Join, ApplyMembership]
    membership = result_of(report, ApplyMembership)
    assert (membership.ok, membership.skipped) == (True, True)
    assert membership.detail == "host table already current"
    assert worker.kinds() == ["bootstrap"]


def test_membership_written_with_host_count_and_digest_tag(tmp_path):
    cfg, ec2, worker = config(tmp_path, NUM_SLAVES=2), FakeEc2(), FakeWorker()
    run(cfg, ec2, worker)
    report = run(cfg, ec2, worker)
    membership = result_of(report, ApplyMembership)
    assert (membership.ok, membership.skipped, membership.detail) == (True, False, "3 hosts")
    master = next(n for n in report.cluster.nodes if n.role == "master").instance_id
    assert TAG_HOSTS in ec2.tags_of(master)
    assert len(worker.calls[-1][1]) == 3


def test_new_instances_are_tagged_with_role_and_group(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    run(cfg, ec2, None)
    run(cfg, ec2, None)
    tagged = {w[1]: w[2] for w in ec2.writes if w[0] == "tag" and TAG in w[2]}
    assert sorted(tagged.values(), key=str) == [{TAG: "master", TAG_GROUP: "master"},
                                                {TAG: "slave", TAG_GROUP: "m5.large"}]


# -- the ClientTokens a launch sends (tokens.TokenBook, as the pass uses it) ------------------

def test_token_shape_names_the_decision_and_fits_ec2s_limit(tmp_path):
    key = "0123456789abcdef0123456789abcdef01234567"
    token = TokenBook(tmp_path).token_for(key, NOW)
    assert re.fullmatch(r"dd-0123456789abcdef0123-[0-9a-f]{16}", token), token
    assert len(token) <= 64


@pytest.mark.parametrize(("later", "same"), [
    (timedelta(minutes=59, seconds=59), True), (timedelta(hours=1), False)])
def test_a_token_is_remembered_for_just_under_an_hour(tmp_path, later, same):
    book = TokenBook(tmp_path)
    first = book.token_for("k" * 40, NOW)
    assert (book.token_for("k" * 40, NOW + later) == first) is same


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "null"])
def test_a_token_book_that_is_not_an_object_is_started_afresh(tmp_path, content):
    (tmp_path / "tokens.json").write_text(content)
    token = TokenBook(tmp_path).token_for("c" * 40, NOW)
    assert json.loads((tmp_path / "tokens.json").read_text()) == {
        "c" * 40: {"token": token, "at": NOW.isoformat()}}


# -- results name their action and say what happened ---------------------------------------

def test_every_result_is_for_its_own_action_and_ec2_steps_report_ok(tmp_path):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=0), FakeEc2()
    old = ec2.add_instance("master", minutes_old=90)
    ec2.add_instance("master", minutes_old=5)  # a second master: terminated
    ec2.add_instance("master", **{TAG_BOOTSTRAP: "x"})  # and a third
    ec2.instances[old]["Tags"] = [t for t in ec2.instances[old]["Tags"] if t["Key"] != TAG]
    ec2.requests["sir-x"] = {"SpotInstanceRequestId": "sir-x", "State": "active",
                             "InstanceId": old, "Status": {"Code": "fulfilled"},
                             "Tags": [{"Key": TAG, "Value": "master"}]}
    rid = ec2.add_open_request(90)
    report = run(cfg, ec2, None)
    assert [r.action for r in report.results] == list(report.plan.actions)
    kinds = [type(r.action).__name__ for r in report.results if r.ok is True and not r.skipped]
    assert kinds == ["TagInstances", "CancelRequests", "Terminate"]
    assert ("cancel", (rid,)) in ec2.writes


def test_a_launch_sends_the_groups_parameters_and_reports_the_new_ids(tmp_path):
    groups = [{"INSTANCE_TYPE": "c5.xlarge", "COUNT": 2, "MAX_BID": "0.25"}]
    cfg = config(tmp_path, NUM_SLAVES=None, SLAVE_GROUPS=groups, MASTER_MARKET="on-demand")
    ec2 = FakeEc2()
    report = run(cfg, ec2, None)
    assert ec2.launched == [("master", "master", "m5.large", 1, "on-demand", None),
                            ("slave", "c5.xlarge", "c5.xlarge", 2, "spot", 0.25)]
    details = [r.detail for r in report.results]
    slave_ids = sorted(rid for rid, r in ec2.requests.items()
                       if {"Key": TAG, "Value": "slave"} in r["Tags"])
    assert details[1] == ", ".join(slave_ids) and details[0].startswith("sir-")


def test_a_failed_launch_result_is_for_that_launch(tmp_path):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=0), FakeEc2()
    ec2.fail_launch = AwsError("Unsupported", "no spot here", "use on-demand")
    report = run(cfg, ec2, None)
    assert [(r.action, r.ok, r.detail) for r in report.results] == [
        (report.plan.actions[0], False, "EC2 Unsupported: no spot here (use on-demand)")]


def test_a_master_that_raises_on_join_is_reported_with_its_error(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    digests = reconcile.desired_state(cfg).bootstrap
    master = ec2.add_instance("master", **{TAG_BOOTSTRAP: digests["master"]})
    ec2.add_instance("slave", **{TAG_BOOTSTRAP: digests["slave"]})
    report = run(cfg, ec2, FakeWorker(master_raises=True))
    join = result_of(report, Join)
    assert join.ok is False and join.action is report.plan.actions[0]
    assert join.detail == f"master {master}: {master}: connection refused"
    assert join.node_errors == {master: f"{master}: connection refused"}
    assert join.faults == {master: "node"} and not join.needs_the_operator
    assert [w[1] for w in failure_tags(ec2)] == [(master,)]


def test_a_master_join_refused_for_its_host_key_needs_the_operator(tmp_path):
    """The fault class of a raised master failure reaches the result: not counted, and
    the operator is told (what keeps the CLI from waiting for another pass)."""
    cfg, ec2 = config(tmp_path), FakeEc2()
    digests = reconcile.desired_state(cfg).bootstrap
    master = ec2.add_instance("master", **{TAG_BOOTSTRAP: digests["master"]})
    ec2.add_instance("slave", **{TAG_BOOTSTRAP: digests["slave"]})
    worker = FakeWorker(master_raises=True)
    worker.master_fault = "hostkey"
    join = result_of(run(cfg, ec2, worker), Join)
    assert join.faults == {master: "hostkey"} and join.needs_the_operator
    assert "forget-host-key" in join.node_errors[master]
    assert failure_tags(ec2) == []


def test_a_node_error_without_words_reads_failed(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    master = ec2.add_instance("master")
    worker = FakeWorker(failing={master})
    worker.error = None
    report = run(cfg, ec2, worker)
    bootstrap = result_of(report, Bootstrap)
    assert bootstrap.action is next(a for a in report.plan.actions if isinstance(a, Bootstrap))
    assert bootstrap.node_errors == {master: "failed\nlast log line"}
    run(cfg, ec2, FakeWorker())  # bootstrapped; now only the host table fails
    ec2.untag([master], [TAG_HOSTS])
    membership = result_of(run(cfg, ec2, worker), ApplyMembership)
    assert (membership.ok, membership.detail) == (False, "failed")
    assert membership.ok is False
    assert membership.node_errors == {master: "failed\nlast log line"}
    assert membership.faults == {master: "node"}


def test_membership_failure_detail_is_the_node_error(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    digests = reconcile.desired_state(cfg).bootstrap
    master = ec2.add_instance("master", **{TAG_BOOTSTRAP: digests["master"]})
    report = run(cfg, ec2, FakeWorker(failing={master}))
    assert result_of(report, ApplyMembership).detail == f"{master}: connection refused"


def test_a_slave_whose_bootstrap_is_redone_and_fails_leaves_the_host_table(tmp_path):
    cfg, ec2, worker = config(tmp_path), FakeEc2(), FakeWorker()
    for _ in range(3):
        run(cfg, ec2, worker)
    slave = next(i for i in ec2.instances if ec2.tags_of(i)[TAG] == "slave")
    master = next(i for i in ec2.instances if ec2.tags_of(i)[TAG] == "master")
    ec2.untag([slave], [TAG_BOOTSTRAP])  # joined, but its bootstrap must run again...
    worker.failing.add(slave)  # ...and fails: it is no member until it works
    worker.calls.clear()
    run(cfg, ec2, worker)
    assert worker.calls[-1] == ("membership", (master,))


def test_the_host_table_written_for_a_removal_is_not_written_twice(tmp_path):
    """A ready slave given up and a new one that fails its bootstrap: one table write."""
    cfg, ec2, worker = config(tmp_path, NUM_SLAVES=2), FakeEc2(), FakeWorker()
    for _ in range(3):
        run(cfg, ec2, worker)
    stuck, _kept = (i for i in ec2.instances if ec2.tags_of(i)[TAG] == "slave")
    ec2.tag([stuck], {TAG_FAILURES: "3"})
    new = ec2.add_instance("slave")
    worker.failing.add(new)
    worker.calls.clear()
    report = run(cfg, ec2, worker)
    memberships = [r for r in report.results if isinstance(r.action, ApplyMembership)]
    assert [(r.ok, r.skipped) for r in memberships] == [(True, False), (True, True)]
    assert memberships[1].detail == "host table already current"
    assert worker.kinds().count("membership") == 1
    assert ("terminate", (stuck,)) in ec2.writes


# -- pinned host keys and the local tarball shape what 'joined' means -------------------------

def test_a_pinned_slave_is_recorded_under_its_key_digest_and_stays_converged(tmp_path):
    cfg, ec2, worker = config(tmp_path), FakeEc2(), FakeWorker()
    run(cfg, ec2, worker)
    slave = next(r["InstanceId"] for r in ec2.requests.values()
                 if {"Key": TAG, "Value": "slave"} in r["Tags"])
    key = HostKey.from_line("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9"
                            "okWi0dh2l9GKJl")
    HostKeyStore(cfg.state_dir).pin(slave, key)
    digest = hashlib.sha256(key.line().encode()).hexdigest()[:12]
    assert reconcile.desired_state(cfg, [slave, "i-none"]).pins == {slave: digest}
    run(cfg, ec2, worker)
    master = next(i for i in ec2.instances if ec2.tags_of(i).get(TAG) == "master")
    assert ec2.tags_of(slave)[TAG_JOINED] == master
    assert JoinBook(cfg.state_dir).read() == {slave: f"{master}#{digest}"}
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_CONVERGED


def test_a_local_tarball_adds_its_digest_to_the_join_tag(tmp_path):
    tarball = tmp_path / "disco.tar.gz"
    tarball.write_bytes(b"not really a tarball")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    cfg = config(tmp_path, DISCO_INSTALL="tarball", DISCO_TARBALL=str(tarball),
                 DISCO_TARBALL_SHA256=sha)
    assert reconcile.desired_state(cfg).join_suffix == "@" + sha[:16]
    assert reconcile.desired_state(config(tmp_path)).join_suffix == ""


def test_observe_without_a_clock_uses_an_aware_now(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    rid = ec2.add_open_request(1)
    cluster = reconcile.observe(cfg, ec2)  # the request's age is taken against the real clock
    assert [n.key for n in cluster.nodes] == [rid]
    assert cluster.nodes[0].state in ("open", "gone")


@pytest.mark.parametrize("record", [
    "not a record", {"token": "dd-x"}, {"at": NOW.isoformat()}, {"token": 1, "at": "x"},
    {"token": "dd-x", "at": "yesterday"}, {"token": "dd-x", "at": "2026-11-21T12:00:00"}])
def test_hand_edited_token_records_are_dropped_not_a_crash(tmp_path, record):
    (tmp_path / "tokens.json").write_text(json.dumps({"k" * 40: record}))
    token = TokenBook(tmp_path).token_for("k" * 40, NOW)
    assert token.startswith("dd-kkkk") and token != record
    assert json.loads((tmp_path / "tokens.json").read_text()) == {
        "k" * 40: {"token": token, "at": NOW.isoformat()}}


def test_join_results_are_for_the_join_with_and_without_ssh(tmp_path):
    cfg, ec2 = config(tmp_path), FakeEc2()
    ec2.add_instance("master")
    ec2.add_instance("slave")
    for worker in (None, FakeWorker()):
        report = run(cfg, ec2, worker)
        join = next(a for a in report.plan.actions if isinstance(a, Join))
        assert result_of(report, Join).action is join


# -- tag calls per pass do not grow with the number of nodes ---------------------------------

def host_key(n: int) -> HostKey:
    """A distinct ed25519 public key per n (only its bytes matter here)."""
    return HostKey.from_blob(struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32)
                             + n.to_bytes(32, "big"))


def bootstrapped(cfg, ec2, slaves: int) -> tuple[str, list[str]]:
    """A bootstrapped master and `slaves` bootstrapped, pinned, never joined slaves."""
    digests = reconcile.desired_state(cfg).bootstrap
    master = ec2.add_instance("master", **{TAG_BOOTSTRAP: digests["master"]})
    ids = [ec2.add_instance("slave", **{TAG_BOOTSTRAP: digests["slave"]})
           for _ in range(slaves)]
    store = HostKeyStore(cfg.state_dir)
    for n, iid in enumerate([master, *ids]):
        store.pin(iid, host_key(n))
    return master, ids


def tag_writes(ec2, key: str) -> list[tuple]:
    return [w for w in ec2.writes if w[0] == "tag" and key in w[2]]


@pytest.mark.parametrize("slaves", [1, 20])
def test_joining_k_slaves_costs_one_join_tag_call_and_a_converged_pass_none(tmp_path, slaves):
    cfg, ec2, worker = config(tmp_path, NUM_SLAVES=slaves), FakeEc2(), FakeWorker()
    master, ids = bootstrapped(cfg, ec2, slaves)
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_PROGRESSING
    assert worker.kinds() == ["join", "membership"]
    assert tag_writes(ec2, TAG_JOINED) == [("tag", tuple(ids), {TAG_JOINED: master})]
    assert [w[2].keys() for w in ec2.writes] == [{TAG_JOINED}, {TAG_HOSTS}]  # K=1 or K=20
    pins = reconcile.pin_digests(cfg, ids)
    assert JoinBook(cfg.state_dir).read() == {i: f"{master}#{pins[i]}" for i in ids}
    ec2.writes.clear()
    worker.calls.clear()
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_CONVERGED
    assert (ec2.writes, worker.calls) == ([], [])


def test_a_re_pinned_slave_joins_again_without_a_tag_call_then_converges(tmp_path):
    cfg, ec2, worker = config(tmp_path, NUM_SLAVES=3), FakeEc2(), FakeWorker()
    master, ids = bootstrapped(cfg, ec2, 3)
    run(cfg, ec2, worker)
    store = HostKeyStore(cfg.state_dir)
    store.forget(ids[1])  # the operator forgot its key; the next contact pins another one
    store.pin(ids[1], host_key(99))
    ec2.writes.clear()
    worker.calls.clear()
    report = run(cfg, ec2, worker)
    assert worker.calls[0] == ("join", (master, ids[1]))
    assert result_of(report, Join).ok
    assert tag_writes(ec2, TAG_JOINED) == []  # its tag already names this master
    digest = reconcile.pin_digests(cfg, [ids[1]])[ids[1]]
    assert JoinBook(cfg.state_dir).read()[ids[1]] == f"{master}#{digest}"
    ec2.writes.clear()
    worker.calls.clear()
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_CONVERGED
    assert (ec2.writes, worker.calls) == ([], [])


class TagFailsEc2(FakeEc2):
    """Stops at the join tag (as a crash or a refused call would), after noting what the
    join book held at that moment."""

    def __init__(self, book: JoinBook) -> None:
        super().__init__()
        self.book = book
        self.fail_join_tag = True
        self.book_at_tag: dict[str, str] | None = None

    def tag(self, instance_ids, tags):
        if TAG_JOINED in tags:
            self.book_at_tag = self.book.read()
            if self.fail_join_tag:
                raise AwsError("RequestLimitExceeded", "stopped before the join tag")
        super().tag(instance_ids, tags)


def test_the_join_record_is_written_before_the_tag_and_alone_never_counts(tmp_path):
    cfg = config(tmp_path, NUM_SLAVES=2)
    ec2, worker = TagFailsEc2(JoinBook(cfg.state_dir)), FakeWorker()
    master, ids = bootstrapped(cfg, ec2, 2)
    report = run(cfg, ec2, worker)
    assert not result_of(report, Join).ok
    assert set(ec2.book_at_tag) == set(ids)  # recorded before the tag call
    assert not any(TAG_JOINED in ec2.tags_of(i) for i in ids)
    worker.calls.clear()
    ec2.fail_join_tag = False
    report = run(cfg, ec2, worker)  # recorded but untagged: not joined, so joined again
    assert worker.calls[0] == ("join", (master, *ids))
    assert all(ec2.tags_of(i)[TAG_JOINED] == master for i in ids)
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_CONVERGED


def test_slaves_tagged_by_the_previous_version_are_not_joined_again(tmp_path):
    """Before the shared tag, each slave's tag was its own join record: still converged."""
    cfg, ec2, worker = config(tmp_path, NUM_SLAVES=3), FakeEc2(), FakeWorker()
    master, ids = bootstrapped(cfg, ec2, 3)
    run(cfg, ec2, worker)
    for iid, record in JoinBook(cfg.state_dir).read().items():
        ec2.tag([iid], {TAG_JOINED: record})
    JoinBook(cfg.state_dir).path.unlink()
    ec2.writes.clear()
    worker.calls.clear()
    assert run(cfg, ec2, worker).exit_code == reconcile.EXIT_CONVERGED
    assert (ec2.writes, worker.calls) == ([], [])


@pytest.mark.parametrize("slaves", [1, 20])
def test_k_first_failures_in_one_step_cost_one_tag_call(tmp_path, slaves):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=slaves), FakeEc2()
    master = ec2.add_instance("master")
    ids = [ec2.add_instance("slave") for _ in range(slaves)]
    run(cfg, ec2, FakeWorker(failing=set(ids)))
    assert failure_tags(ec2) == [("tag", tuple(ids), {TAG_FAILURES: "1",
                                                      TAG_UNREACHABLE: NOW.isoformat()})]
    assert TAG_FAILURES not in ec2.tags_of(master)


def test_failures_with_different_histories_cost_one_tag_call_per_history(tmp_path):
    cfg, ec2 = config(tmp_path, NUM_SLAVES=4), FakeEc2()
    ec2.add_instance("master")
    since = (NOW - timedelta(minutes=3)).isoformat()
    old = [ec2.add_instance("slave", **{TAG_FAILURES: "1", TAG_UNREACHABLE: since})
           for _ in range(2)]
    new = [ec2.add_instance("slave") for _ in range(2)]
    run(cfg, ec2, FakeWorker(failing={*old, *new}))
    assert failure_tags(ec2) == [
        ("tag", tuple(old), {TAG_FAILURES: "2", TAG_UNREACHABLE: since}),
        ("tag", tuple(new), {TAG_FAILURES: "1", TAG_UNREACHABLE: NOW.isoformat()})]


def test_the_join_book_keeps_live_instances_only_and_survives_damage(tmp_path):
    book = JoinBook(tmp_path)
    assert book.read() == {}
    book.record({"i-a": "i-m#k1", "i-b": "i-m#k2"}, live=[])
    book.record({"i-c": "i-m#k3"}, live=["i-a"])  # i-b was terminated meanwhile
    assert book.read() == {"i-a": "i-m#k1", "i-c": "i-m#k3"}
    for damage in ("not json", "[1, 2]", '{"i-a": 7}'):
        book.path.write_text(damage)
        assert book.read() == {}
