"""Fault injection against a real cluster: spot market over moto, real sshd nodes, real CLI.

Every scenario injects one kind of fault into a reconcile run (SIGKILL of the reconciler,
interruptions, dead sshd, throttling, eventual consistency, a second reconciler, price and
budget limits, a leak) and must still end converged: exactly 1 + N live instances, no open
or orphaned request, bootstrap side effects exactly once, Disco's host table listing the
master and the live ready slaves, `doctor` 0 and a further pass with nothing to do
(``Case.check_converged``). The reconciler runs as a child (tests/fault_runner.py) so it
can be killed for real. Set FAULTS_REPORT=FILE to get the figures of docs/faults.md.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from disposabledisco.cluster import TAG_FAILURES
from tests.fault_fixtures import INSTANCE_TYPE, Case, FaultLab

pytestmark = pytest.mark.nodes

#: actions of a from-empty run of 1 master + 3 slaves: 2 bids, 2 tag calls, bootstrap,
#: join, host table (test_from_empty_baseline keeps this number honest)
FROM_EMPTY_ACTIONS = 7
REPORT: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    """Write what every scenario needed to $FAULTS_REPORT (docs/faults.md is made from it)."""
    yield
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "w") as handle:
            json.dump(REPORT, handle, indent=1, sort_keys=True)


def note(request: pytest.FixtureRequest, case: Case, **extra: object) -> None:
    """Record the scenario's figures (before the final checks add their own pass)."""
    REPORT[request.node.name] = {**case.summary(), **extra,
                                 "seconds": round(time.monotonic() - case.started, 1),
                                 "instances_ever": len(case.instances()),
                                 "requests_ever": len(case.requests())}


def ids(instances: list[dict]) -> set[str]:
    return {i["InstanceId"] for i in instances}


def tags_of(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


# -- baseline ---------------------------------------------------------------------------
def test_from_empty_baseline(fault_lab: FaultLab, request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("baseline")
    runs = case.converge()
    kinds = [a["kind"] for r in runs for a in r.actions]
    assert len(kinds) == FROM_EMPTY_ACTIONS, f"a from-empty run now has the actions {kinds}: " \
                                             "update FROM_EMPTY_ACTIONS"
    note(request, case, actions=kinds)
    case.check_converged()
    assert len(case.instances()) == 4 and len(case.requests()) == 4


# -- 1. SIGKILL at every action boundary -------------------------------------------------
@pytest.mark.parametrize("k", range(1, FROM_EMPTY_ACTIONS + 1))
def test_sigkill_after_action(fault_lab: FaultLab, request: pytest.FixtureRequest,
                              k: int) -> None:
    case = fault_lab.case(f"kill-after-{k}")
    killed = case.run(kill_after=k)
    assert killed.killed, killed.describe()
    last = killed.actions[-1]
    assert last["n"] == k
    case.converge()
    note(request, case, killed_after=f"{k}: {last['kind']}")
    case.check_converged()
    # nothing was interrupted, so nothing may ever have been bid for or launched twice
    assert len(case.instances()) == 4 and len(case.requests()) == 4


# -- 2. SIGKILL while bootstrap scripts run on the nodes ---------------------------------
@pytest.mark.parametrize("delay", [0.05, 0.25, 0.45])
def test_sigkill_during_bootstrap(fault_lab: FaultLab, request: pytest.FixtureRequest,
                                  delay: float) -> None:
    """The bootstrap takes ~0.5 s here (POST_INIT sleeps 0.2 s before its side effect):
    the delays hit its start, POST_INIT, and its end."""
    case = fault_lab.case(f"kill-in-bootstrap-{int(delay * 100)}")
    killed = case.run(kill_in_bootstrap=delay)
    assert killed.killed, killed.describe()
    kinds = [e["event"] for e in killed.events]
    assert "bootstrap-script" in kinds and "sigkill" in kinds
    assert not [a for a in killed.actions if a["kind"] == "Bootstrap"], \
        "the bootstrap finished before the kill: the scenario did not test anything"
    case.converge()
    note(request, case)
    case.check_converged()
    assert len(case.instances()) == 4 and len(case.requests()) == 4


# -- 3. interruptions during a pass ------------------------------------------------------
def test_interrupt_master_and_slave_during_bootstrap(fault_lab: FaultLab,
                                                     request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("interrupt-in-bootstrap")
    child = case.start()
    child.wait_for(lambda e: e["event"] == "bootstrap-script")
    time.sleep(0.1)
    master = case.live_of("master")[0]["InstanceId"]
    slave = sorted(ids(case.live_of("slave")))[0]
    case.market.interrupt(master, "instance-terminated-no-capacity")
    case.market.interrupt(slave, "instance-terminated-no-capacity")
    first = child.wait()
    if first.code != 0:
        case.converge()
    note(request, case, interrupted=2)
    case.check_converged()
    live = ids(case.live_instances())
    assert master not in live and slave not in live
    assert len(case.instances()) == 6  # exactly one replacement each


def test_replaced_master_rejoins_slaves(fault_lab: FaultLab,
                                        request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("interrupt-master")
    case.converge()
    master = case.live_of("master")[0]["InstanceId"]
    slaves = ids(case.live_of("slave"))
    child = case.start()
    case.market.interrupt(master, "instance-terminated-by-price")
    if child.wait().code != 0:
        case.converge()
    note(request, case, interrupted=1)
    case.check_converged()  # includes: every slave joined to the live master
    assert ids(case.live_of("slave")) == slaves, "the slaves are kept and re-joined"
    assert master not in ids(case.live_instances())


# -- 4. sshd dies in the middle of a bootstrap script ------------------------------------
def kill_sshd_mid_bootstrap(case: Case, one_pass: bool = False,
                            role: str = "slave") -> tuple[object, str]:
    """Start a reconciler and kill a node's sshd 0.1 s into its bootstrap script."""
    if one_pass:  # bid first, so that the killed pass is the one that bootstraps
        assert case.up().code == 10
        deadline = time.monotonic() + 30
        while len(set(case.lab.farm.nodes) & ids(case.live_instances())) < 4:
            assert time.monotonic() < deadline, "the bids were not fulfilled"
            time.sleep(0.05)
    child = case.start(*(["up", str(case.config_path)] if one_pass else []))
    event = child.wait_for(lambda e: e["event"] == "bootstrap")
    victim = sorted(set(event["ids"]) & ids(case.live_of(role)))[0]
    child.wait_for(lambda e: e["event"] == "bootstrap-script" and e["id"] == victim)
    time.sleep(0.1)
    case.lab.farm.kill_sshd(victim)
    return child, victim


def test_sshd_killed_mid_script_then_restarted(fault_lab: FaultLab,
                                                request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("sshd-restarted")
    child, slave = kill_sshd_mid_bootstrap(case)
    time.sleep(0.5)
    case.lab.farm.restart_sshd(slave)
    if child.wait().code != 0:
        case.converge()
    note(request, case)
    case.check_converged()
    assert slave in ids(case.live_instances()), "a node that came back is kept"
    assert len(case.instances()) == 4


def test_sshd_killed_mid_script_replaced_after_unresponsive_minutes(
        fault_lab: FaultLab, request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("sshd-dead", tick=0.1)
    case.write_config(UNRESPONSIVE_MINUTES=1)
    # one pass, not --wait: a second pass in the same run would retry the dead node for
    # the SSH connect deadline (600 s) before UNRESPONSIVE_MINUTES can act
    child, slave = kill_sshd_mid_bootstrap(case, one_pass=True)
    failed = child.wait()
    assert failed.code != 0
    case.advance(61)
    case.converge()
    note(request, case, advanced_seconds=61)
    case.check_converged()
    assert slave not in ids(case.live_instances())
    assert len(case.instances()) == 5


def test_master_sshd_killed_mid_script_replaced_after_unresponsive_minutes(
        fault_lab: FaultLab, request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("master-sshd-dead")
    case.write_config(UNRESPONSIVE_MINUTES=1, SSH_DEADLINE_SECONDS=5)
    child, master = kill_sshd_mid_bootstrap(case, one_pass=True, role="master")
    assert child.wait().code != 0
    case.advance(61)
    retried = case.up()  # the master has failed for longer than UNRESPONSIVE_MINUTES
    assert master not in ids(case.live_instances()), \
        f"the dead master was kept: {[a['kind'] for a in retried.actions]}"
    case.converge()
    note(request, case, advanced_seconds=61)
    case.check_converged()


def test_ready_master_losing_sshd_is_replaced_not_the_slaves(
        fault_lab: FaultLab, request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("ready-master-sshd-dead")
    case.write_config(UNRESPONSIVE_MINUTES=1, SSH_DEADLINE_SECONDS=5)
    case.converge()
    master = case.live_of("master")[0]["InstanceId"]
    lost = sorted(ids(case.live_of("slave")))[0]
    case.lab.farm.kill_sshd(master)
    case.market.interrupt(lost, "instance-terminated-no-capacity")
    assert case.up().code == 1  # bids for the lost slave; the host table cannot be written
    case.advance(1)
    case.up()  # the new slave is bootstrapped; joining it needs the master
    healthy = ids(case.live_of("slave"))  # the two old slaves and the new one
    case.advance(61)  # the master has not answered for longer than UNRESPONSIVE_MINUTES
    third = case.up()
    live = ids(case.live_instances())
    assert master not in live, f"the dead master was kept: {[a['what'] for a in third.actions]}"
    assert healthy <= live, "healthy slaves were replaced instead of the master"
    case.converge()
    note(request, case, advanced_seconds=62)
    assert healthy <= ids(case.live_instances())
    case.check_converged()


def test_recovered_slave_survives_a_later_config_change(
        fault_lab: FaultLab, request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("recovered-then-changed")
    child, slave = kill_sshd_mid_bootstrap(case)
    time.sleep(0.5)
    case.lab.farm.restart_sshd(slave)
    first = child.wait()
    assert [a for a in first.actions if a["kind"] == "Bootstrap" and not a["ok"]], \
        "the killed sshd did not make the bootstrap fail: nothing was tested"
    if first.code != 0:
        case.converge()
    # it failed once, then worked: the failure count is cleared with the success
    assert TAG_FAILURES not in tags_of(
        next(i for i in case.live_instances() if i["InstanceId"] == slave))
    before = ids(case.live_instances())
    case.advance(4 * 60)  # longer than UNRESPONSIVE_MINUTES (3), healthy all along
    case.post_init_version = 2
    case.write_config()
    case.converge()
    note(request, case)
    assert ids(case.live_instances()) == before, "a healthy slave was replaced"
    case.check_converged(post_init_runs=2)


# -- 5. throttling ---------------------------------------------------------------------
def test_throttled_calls_still_converge(fault_lab: FaultLab,
                                        request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("throttled", throttle_rate=0.3)
    runs = case.converge()
    throttled = sum(case.market.throttled.values())
    calls = sum(case.market.calls.values())
    case.market.throttle_rate = 0.0  # the checks below use plain clients
    note(request, case, throttled=throttled, calls=calls)
    assert throttled > 0
    assert sum(len(r.passes) for r in runs) <= 4, [r.describe() for r in runs]
    case.check_converged()
    assert len(case.instances()) == 4 and len(case.requests()) == 4


# -- 6. eventual consistency -------------------------------------------------------------
def test_not_found_window_makes_no_duplicates(fault_lab: FaultLab,
                                              request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("not-found", not_found_window=3.0)
    case.converge()
    launches = [a for r in case.runs for a in r.actions if a["kind"] == "Launch"]
    case.market.not_found_window = 0.0
    note(request, case, launch_calls=len(launches))
    # a pass that did not see its own bids yet bids again with the same ClientToken:
    # EC2 answers with the original requests
    first = {a["what"]: a["detail"] for a in launches[:2]}
    for again in launches[2:]:
        assert again["detail"] == first[again["what"]], "a repeated bid made new requests"
    case.check_converged()
    assert len(case.instances()) == 4 and len(case.requests()) == 4


def test_not_found_window_across_the_hour_makes_no_duplicates(
        fault_lab: FaultLab, request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("not-found-hour", not_found_window=6.0)
    child = case.start()
    child.wait_for(lambda e: e["event"] == "start")
    now = case.market.clock.now()
    into_hour = now.minute * 60 + now.second + now.microsecond / 1e6
    case.advance(3600 - into_hour - 0.4)  # both clocks: 0.4 s before the full hour
    if child.wait().code != 0:
        case.converge()
    launches = [a for r in case.runs for a in r.actions if a["kind"] == "Launch"]
    case.market.not_found_window = 0.0
    note(request, case, launch_calls=len(launches))
    assert len(case.requests()) == 4, f"{len(case.requests())} spot requests for 4 nodes"
    assert len(case.instances()) == 4
    case.check_converged()


# -- 7. two reconcilers at once ----------------------------------------------------------
def test_two_reconcilers_one_locked_out(fault_lab: FaultLab,
                                        request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("two-runs")
    a, b = case.start(), case.start()
    runs = [a.wait(), b.wait()]
    codes = sorted(r.code for r in runs)
    loser = next(r for r in runs if r.code == 75) if 75 in codes else None
    note(request, case)
    assert codes == [0, 75], [r.describe() for r in runs]
    assert loser is not None and not loser.passes and "holds the lock" in loser.stderr
    case.check_converged()
    assert len(case.instances()) == 4 and len(case.requests()) == 4


# -- 8. market and budget rules ----------------------------------------------------------
def test_persistent_requests_scale_down_cancels_first(fault_lab: FaultLab,
                                                      request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("persistent")
    case.write_config(SPOT_REQUEST_TYPE="persistent")
    case.converge()
    before = ids(case.live_of("slave"))
    case.write_config(SPOT_REQUEST_TYPE="persistent", NUM_SLAVES=1)
    down = case.converge()
    gone = before - ids(case.live_of("slave"))
    assert len(gone) == 2
    kinds = [a["kind"] for a in down[0].actions]
    assert kinds.index("CancelRequests") < kinds.index("Terminate"), kinds
    events = case.market.events
    for instance_id in gone:
        mine = [e for e in events if e.instance_id == instance_id]
        order = [e.kind for e in mine]
        assert order.index("cancel") < order.index("terminate"), order
        assert "reopen" not in order
    case.advance(60)  # a reopened persistent request would be fulfilled by now
    assert len(case.live_instances()) == 2 and not [
        r for r in case.requests() if r["State"] == "open"]
    # an interrupted persistent slave: EC2 relaunches it on the same request by itself
    survivor = next(iter(ids(case.live_of("slave"))))
    requests_before = len(case.requests())
    case.market.interrupt(survivor, "instance-terminated-no-capacity")
    case.advance(1)
    case.converge()
    note(request, case, scaled_down=2)
    assert len(case.requests()) == requests_before, "the reopened request was enough"
    case.check_converged()
    assert survivor not in ids(case.live_instances())


def test_price_too_low_falls_back_to_on_demand(fault_lab: FaultLab,
                                               request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("fallback")
    case.market.set_price(INSTANCE_TYPE, 0.20)  # above MAX_BID 0.10
    case.write_config(SPOT_FALLBACK="on-demand", SPOT_OPEN_TIMEOUT_MINUTES=1)
    assert case.up().code == 10
    case.advance(1)
    held = case.up()
    assert held.code == 10 and not held.actions, held.describe()
    codes = {(r["State"], r["Status"]["Code"]) for r in case.requests()}
    assert codes == {("open", "price-too-low")}, codes
    case.advance(61)
    case.converge()
    note(request, case, advanced_seconds=62)
    case.check_converged()
    live = case.live_instances()
    assert all(i.get("InstanceLifecycle") != "spot" for i in live), "all on-demand now"
    assert {r["State"] for r in case.requests()} == {"cancelled"}


def test_leaked_slave_is_terminated(fault_lab: FaultLab,
                                    request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("leak")
    case.converge()
    before = ids(case.live_instances())
    client = case.lab.endpoint.client()
    leaked = client.run_instances(
        ImageId=case.network["image_id"], InstanceType=INSTANCE_TYPE, MinCount=1,
        MaxCount=1, SubnetId=case.network["subnet_id"], KeyName=case.network["key_name"],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": case.tag, "Value": "slave"}]}])["Instances"][0]["InstanceId"]
    case.converge()
    note(request, case, leaked=1)
    case.check_converged()
    assert ids(case.live_instances()) == before
    assert leaked not in ids(case.live_instances())


def test_budget_refuses_scale_up_but_heals(fault_lab: FaultLab,
                                           request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("budget")
    case.write_config(MAX_HOURLY_COST=0.45)  # 4 bids of 0.10 fit, a 5th does not
    case.converge()
    case.write_config(MAX_HOURLY_COST=0.45, NUM_SLAVES=5)
    refused = case.up()
    assert refused.code == 1 and not refused.actions, refused.describe()
    assert "MAX_HOURLY_COST 0.45 USD/h allows 0 of the 2" in refused.stdout + refused.stderr
    victim = sorted(ids(case.live_of("slave")))[0]
    case.market.interrupt(victim, "instance-terminated-no-capacity")
    healed = False
    for _ in range(6):  # as cron would: every run exits 1 (budget) but heals what it may
        run = case.up()
        assert run.code in (1, 10), run.describe()
        assert "MAX_HOURLY_COST" in run.stdout + run.stderr
        live = case.live_of("slave")
        if run.code == 1 and not run.actions and len(live) == 3:
            healed = True
            break
        case.advance(1)
    note(request, case, interrupted=1)
    assert healed, "the interrupted slave was not replaced inside the budget"
    case.check_converged(slaves=3, steady_exit=1)
    assert victim not in ids(case.live_instances())


def test_config_change_reruns_post_init_once(fault_lab: FaultLab,
                                             request: pytest.FixtureRequest) -> None:
    case = fault_lab.case("post-init-change")
    case.converge()
    before = ids(case.live_instances())
    case.post_init_version = 2
    case.write_config()
    runs = case.converge()
    note(request, case)
    assert [a for r in runs for a in r.actions if a["kind"] == "Bootstrap"]
    assert ids(case.live_instances()) == before
    case.check_converged(post_init_runs=2)


def test_failed_bootstrap_is_one_line_not_a_traceback(fault_lab: FaultLab) -> None:
    case = fault_lab.case("post-init-fails")
    case.write_config(POST_INIT="echo failing on purpose >&2; exit 3")
    assert case.up().code == 10
    case.advance(1)
    failed = case.up()
    assert failed.code == 1, failed.describe()
    assert not failed.traceback, failed.stderr[-1500:]
    assert "POST_INIT failed" in failed.stdout + failed.stderr

