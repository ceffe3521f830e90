"""The planner, table-driven: situations in, exact actions out (no EC2, no SSH)."""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from disposabledisco.cluster import (
    TAG_BOOTSTRAP,
    TAG_DISCO_RESTART,
    TAG_FAILURES,
    TAG_GROUP,
    TAG_HOSTS,
    TAG_JOINED,
    TAG_UNREACHABLE,
    Cluster,
    Desired,
    Node,
    join_record,
    join_tag,
    joined_master,
)
from disposabledisco.config import parse_config
from disposabledisco.disco import membership_digest
from disposabledisco.plan import (
    ApplyMembership,
    Bootstrap,
    CancelRequests,
    Join,
    Launch,
    TagInstances,
    Terminate,
    hourly_cost,
    launch_key,
    multipliers,
    plan,
    plan_down,
    unresponsive,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
BASE = {"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "TAG_KEY": "dd",
        "INSTANCE_TYPE": "m5.large", "NUM_SLAVES": 3, "MAX_BID": "0.10"}
_numbers = itertools.count(10)  # unbounded: the suite may run twice in one process


def config(**overrides):
    values = {**BASE, **overrides}
    return parse_config({k: v for k, v in values.items() if v is not None})


def node(role="slave", state="ready", *, group=None, minutes_old=60, request="auto",
         instance=True, **fields) -> Node:
    """A node as the cluster model would derive it."""
    number = next(_numbers)
    group = group or ("master" if role == "master" else "m5.large")
    created = NOW - timedelta(minutes=minutes_old)
    iid = f"i-{number:017x}" if instance and state not in ("open",) else None
    rid = f"sir-{number:08x}" if request == "auto" else request
    tags = {"dd": role, TAG_GROUP: group}
    if state == "ready":
        tags[TAG_BOOTSTRAP] = "done"
    base = dict(role=role, group=group, instance_type=fields.pop("instance_type", "m5.large"),
                request_id=rid, request_state="open" if state == "open" else "active",
                request_type="one-time", status_code="fulfilled" if iid else
                "pending-evaluation", bid=0.1, image_id=BASE["AMI"], created=created,
                instance_id=iid, instance_state={"ready": "running", "running": "running",
                                                 "pending": "pending"}.get(state),
                launched=created if iid else None,
                private_ip=str(ipaddress.ip_address("10.0.0.0") + number) if iid else None,
                tags=tags,
                instance_tagged=bool(iid), state=state, reason=state)
    base.update(fields)
    return Node(**base)


def converged(cfg, slaves: list[Node], master: Node | None = None) -> Cluster:
    master = master or node("master")
    joined = join_record(master.instance_id, "", None)  # the per-slave form: counts alone
    slaves = [replace(s, tags={**s.tags, TAG_JOINED: joined}) for s in slaves]
    ready = [s for s in slaves if s.state == "ready"]
    master = replace(master, tags={**master.tags, TAG_HOSTS: membership_digest(
        master, ready, multipliers(cfg))})
    return Cluster((master, *slaves))


def kinds(the_plan) -> list[str]:
    return [type(a).__name__ for a in the_plan.actions]


def launches(the_plan) -> list[tuple]:
    return [(a.role, a.group, a.count, a.market) for a in the_plan.actions
            if isinstance(a, Launch)]


def only(the_plan, kind):
    found = [a for a in the_plan.actions if isinstance(a, kind)]
    assert len(found) == 1, kinds(the_plan)
    return found[0]


# ---------------------------------------------------------------------------------------

def test_empty_account_bids_for_master_first_then_one_request_per_group():
    p = plan(config(), Cluster(()), NOW)
    assert launches(p) == [("master", "master", 1, "spot"), ("slave", "m5.large", 3, "spot")]
    assert p.problems == ()


def test_on_demand_master():
    p = plan(config(MASTER_MARKET="on-demand"), Cluster(()), NOW)
    assert launches(p)[0] == ("master", "master", 1, "on-demand")
    assert [a.bid for a in p.actions if isinstance(a, Launch)] == [None, 0.1]


def test_converged_cluster_needs_nothing():
    cfg = config()
    p = plan(cfg, converged(cfg, [node() for _ in range(3)]), NOW)
    assert p.actions == ()


def test_scale_up_three_to_five_bids_for_two_in_one_request():
    cfg = config(NUM_SLAVES=5)
    p = plan(cfg, converged(cfg, [node() for _ in range(3)]), NOW)
    assert launches(p) == [("slave", "m5.large", 2, "spot")]


def test_scale_down_five_to_one_removes_newest_ready_and_updates_table_first():
    cfg = config(NUM_SLAVES=1)
    slaves = [node(minutes_old=100 - i) for i in range(5)]
    p = plan(cfg, converged(cfg, slaves), NOW)
    assert kinds(p)[:3] == ["ApplyMembership", "CancelRequests", "Terminate"]
    kept = slaves[0].instance_id
    assert set(only(p, Terminate).instance_ids) == {s.instance_id for s in slaves[1:]}
    assert kept in only(p, ApplyMembership).member_ids
    assert not set(only(p, ApplyMembership).member_ids) & set(only(p, Terminate).instance_ids)


def test_scale_down_cancels_open_bids_before_touching_instances():
    cfg = config(NUM_SLAVES=2)
    slaves = [node(), node(), node(state="open"), node(state="open")]
    p = plan(cfg, converged(cfg, slaves), NOW)
    assert set(only(p, CancelRequests).request_ids) == {s.request_id for s in slaves[2:]}
    assert not any(isinstance(a, Terminate) for a in p.actions)


def test_scale_down_gives_up_not_ready_before_ready():
    cfg = config(NUM_SLAVES=2)
    ready_old, ready_new = node(minutes_old=50), node(minutes_old=5)
    booting = node(state="running", minutes_old=90)
    p = plan(cfg, converged(cfg, [ready_old, ready_new, booting]), NOW)
    assert only(p, Terminate).instance_ids == (booting.instance_id,)


def test_scale_to_zero_cancels_requests_then_terminates():
    cfg = config(NUM_SLAVES=0)
    slaves = [node(), node(state="open")]
    p = plan(cfg, converged(cfg, slaves), NOW)
    order = kinds(p)
    assert order.index("CancelRequests") < order.index("Terminate")
    assert set(only(p, CancelRequests).request_ids) == {s.request_id for s in slaves}


def test_two_slave_groups_of_different_types():
    groups = [{"INSTANCE_TYPE": "m5.large", "COUNT": 2},
              {"INSTANCE_TYPE": "c5.xlarge", "COUNT": 3, "MAX_BID": "0.2"}]
    p = plan(config(NUM_SLAVES=None, SLAVE_GROUPS=groups), Cluster(()), NOW)
    assert launches(p)[1:] == [("slave", "m5.large", 2, "spot"), ("slave", "c5.xlarge", 3, "spot")]
    assert [a.bid for a in p.actions if isinstance(a, Launch)][2] == 0.2


def test_group_removed_from_config_is_scaled_to_zero():
    groups = [{"INSTANCE_TYPE": "m5.large", "COUNT": 1}]
    cfg = config(NUM_SLAVES=None, SLAVE_GROUPS=groups)
    old = node(group="c5.xlarge", instance_type="c5.xlarge")
    p = plan(cfg, converged(cfg, [node(), old]), NOW)
    assert only(p, Terminate).instance_ids == (old.instance_id,)


def test_fulfilled_untagged_instance_is_tagged_in_one_batch():
    cfg = config()
    fresh = [node(state="running", instance_tagged=False) for _ in range(3)]
    p = plan(cfg, converged(cfg, fresh), NOW)
    tag = only(p, TagInstances)
    assert set(tag.instance_ids) == {n.instance_id for n in fresh}
    assert (tag.role, tag.group) == ("slave", "m5.large")


def test_stale_open_request_is_cancelled_and_rebid():
    cfg = config(NUM_SLAVES=1)
    stale = node(state="gone", request_state="open", instance=False, minutes_old=30,
                 reason="open too long")
    p = plan(cfg, converged(cfg, [stale]), NOW)
    assert only(p, CancelRequests).request_ids == (stale.request_id,)
    assert launches(p) == [("slave", "m5.large", 1, "spot")]


def test_stale_open_request_falls_back_to_on_demand():
    cfg = config(NUM_SLAVES=2, SPOT_FALLBACK="on-demand")
    stale = node(state="gone", request_state="open", instance=False, minutes_old=30)
    p = plan(cfg, converged(cfg, [stale]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "on-demand"),
                           ("slave", "m5.large", 1, "spot")]


def test_open_request_within_timeout_counts_as_live():
    cfg = config(NUM_SLAVES=2)
    p = plan(cfg, converged(cfg, [node(), node(state="open", minutes_old=2)]), NOW)
    assert launches(p) == []


def test_bad_parameters_stop_bids_for_that_group():
    cfg = config(NUM_SLAVES=1)
    failed = node(state="gone", request_state="failed", status_code="bad-parameters",
                  instance=False)
    p = plan(cfg, converged(cfg, [failed]), NOW)
    assert launches(p) == []
    assert "bad-parameters" in p.problems[0] and "no new bids" in p.problems[0]


def test_bad_parameters_with_an_older_ami_do_not_block_the_fixed_config():
    cfg = config(NUM_SLAVES=1)
    failed = node(state="gone", request_state="failed", status_code="bad-parameters",
                  instance=False, image_id="ami-00000000")
    p = plan(cfg, converged(cfg, [failed]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "spot")]
    assert p.problems == ()


def test_two_live_masters_keep_the_older_ready_one():
    cfg = config(NUM_SLAVES=0)
    old = node("master", minutes_old=90)
    new = node("master", state="running", minutes_old=1)
    p = plan(cfg, Cluster((replace(old, tags={**old.tags, TAG_HOSTS: membership_digest(
        old, [], multipliers(cfg))}), new)), NOW)
    assert only(p, Terminate).instance_ids == (new.instance_id,)
    assert launches(p) == []


def test_interrupted_slave_is_replaced():
    cfg = config(NUM_SLAVES=2)
    lost = node(state="gone", request_state="closed", status_code="instance-terminated-by-price",
                instance_state="terminated")
    p = plan(cfg, converged(cfg, [node(), lost]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "spot")]
    assert not any(isinstance(a, (CancelRequests, Terminate)) for a in p.actions)


def test_active_request_whose_instance_died_is_cancelled():
    cfg = config(NUM_SLAVES=1)
    dead = node(state="gone", instance_state="terminated")
    p = plan(cfg, converged(cfg, [node(), dead]), NOW)
    assert only(p, CancelRequests).request_ids == (dead.request_id,)


def test_stopped_instance_is_terminated_and_its_request_cancelled():
    cfg = config(NUM_SLAVES=1)
    stopped = node(state="gone", instance_state="stopped", request_type="persistent")
    p = plan(cfg, converged(cfg, [node(), stopped]), NOW)
    assert only(p, CancelRequests).request_ids == (stopped.request_id,)
    assert only(p, Terminate).instance_ids == (stopped.instance_id,)


def test_running_nodes_get_bootstrapped_and_joined():
    cfg = config(NUM_SLAVES=2)
    fresh = [node(state="running"), node(state="running")]
    p = plan(cfg, Cluster((*converged(cfg, []).nodes, *fresh)), NOW)
    assert set(only(p, Bootstrap).instance_ids) == {n.instance_id for n in fresh}
    assert set(only(p, Join).slave_ids) == {n.instance_id for n in fresh}
    assert kinds(p)[-3:] == ["Bootstrap", "Join", "ApplyMembership"]


def test_new_master_is_bootstrapped_and_slaves_rejoin_it():
    cfg = config(NUM_SLAVES=2)
    slaves = [replace(n, tags={**n.tags, TAG_JOINED: "i-oldmaster"}) for n in (node(), node())]
    master = node("master", state="running")
    p = plan(cfg, Cluster((master, *slaves)), NOW)
    assert only(p, Bootstrap).instance_ids == (master.instance_id,)
    assert set(only(p, Join).slave_ids) == {s.instance_id for s in slaves}
    assert not any(isinstance(a, Terminate) for a in p.actions)


def test_no_master_means_no_join_but_slaves_still_bootstrap():
    cfg = config(NUM_SLAVES=1)
    slave = node(state="running")
    p = plan(cfg, Cluster((slave,)), NOW)
    assert launches(p) == [("master", "master", 1, "spot")]
    assert only(p, Bootstrap).instance_ids == (slave.instance_id,)
    assert not any(isinstance(a, Join) for a in p.actions)


def test_never_more_live_than_desired():
    cfg = config(NUM_SLAVES=2)
    slaves = [node(state="running"), node(state="running")] + [node(state="open")
                                                               for _ in range(3)]
    p = plan(cfg, converged(cfg, slaves), NOW)
    assert set(only(p, CancelRequests).request_ids) == {s.request_id for s in slaves[2:]}
    assert launches(p) == []


def test_instance_not_visible_yet_counts_and_prevents_a_second_bid():
    cfg = config(NUM_SLAVES=1)
    invisible = node(state="pending", instance_state=None, reason="instance not visible yet")
    p = plan(cfg, converged(cfg, [invisible]), NOW)
    assert launches(p) == []


def test_membership_change_is_planned_when_a_ready_slave_is_missing_from_the_table():
    cfg = config(NUM_SLAVES=2)
    cluster = converged(cfg, [node()])
    extra = replace(node(), tags={**node().tags,
                                  TAG_JOINED: join_record(cluster.master.instance_id, "", None)})
    p = plan(cfg, Cluster((*cluster.nodes, extra)), NOW)
    assert isinstance(p.actions[-1], ApplyMembership)
    assert extra.instance_id in p.actions[-1].member_ids


def test_down_cancels_everything_before_terminating():
    nodes = (node("master"), node(), node(state="open"),
             node(state="gone", request_state="closed", instance_state="terminated"))
    p = plan_down(Cluster(nodes))
    assert kinds(p) == ["CancelRequests", "Terminate"]
    assert set(p.actions[0].request_ids) == {n.request_id for n in nodes[:3]}
    assert set(p.actions[1].instance_ids) == {n.instance_id for n in nodes[:2]}


def test_down_of_nothing_is_empty():
    assert plan_down(Cluster(())).actions == ()


@pytest.mark.parametrize(("change", "same_key"), [
    ("same", True), ("later", True), ("new-node", False), ("count", False), ("market", False)])
def test_launch_key_names_the_decision_and_what_was_observed(change, same_key):
    group = config().slave_groups[0]
    cluster = Cluster((node(),))
    pools = ((group.instance_type, config().places[0]),)  # where plan() puts the bid
    base = launch_key("dd", group, 2, "spot", cluster, pools)
    other = {
        "same": lambda: launch_key("dd", group, 2, "spot", cluster, pools),
        "later": lambda: plan(config(NUM_SLAVES=3), cluster, NOW + timedelta(hours=5)),
        "new-node": lambda: launch_key("dd", group, 2, "spot",
                                       Cluster((*cluster.nodes, node()))),
        "count": lambda: launch_key("dd", group, 3, "spot", cluster),
        "market": lambda: launch_key("dd", group, 2, "on-demand", cluster),
    }[change]()
    if change == "later":
        other = next(a for a in other.actions if isinstance(a, Launch) and a.role == "slave").key
    assert (other == base) == same_key


def test_slave_failing_for_unresponsive_minutes_is_replaced():
    cfg = config(NUM_SLAVES=2, UNRESPONSIVE_MINUTES=15)
    stuck = node(state="running", tags={"dd": "slave", TAG_GROUP: "m5.large",
                                        TAG_UNREACHABLE: (NOW - timedelta(minutes=20)).isoformat()})
    fresh = node(state="running", tags={"dd": "slave", TAG_GROUP: "m5.large",
                                        TAG_UNREACHABLE: (NOW - timedelta(minutes=5)).isoformat()})
    p = plan(cfg, Cluster((*converged(cfg, []).nodes, stuck, fresh)), NOW)
    assert only(p, Terminate).instance_ids == (stuck.instance_id,)
    assert stuck.request_id in only(p, CancelRequests).request_ids
    assert launches(p) == [("slave", "m5.large", 1, "spot")]
    assert only(p, Bootstrap).instance_ids == (fresh.instance_id,)


def test_slave_failing_its_bootstrap_three_times_is_replaced():
    cfg = config(NUM_SLAVES=1)
    broken = node(state="running", tags={"dd": "slave", TAG_GROUP: "m5.large",
                                         TAG_FAILURES: "3"})
    p = plan(cfg, Cluster((*converged(cfg, []).nodes, broken)), NOW)
    assert only(p, Terminate).instance_ids == (broken.instance_id,)
    assert launches(p) == [("slave", "m5.large", 1, "spot")]


def test_budget_refuses_scale_up_past_max_hourly_cost():
    cfg = config(NUM_SLAVES=10, MAX_HOURLY_COST="0.55")
    p = plan(cfg, converged(cfg, [node(), node()]), NOW)
    assert launches(p) == [("slave", "m5.large", 2, "spot")]  # 3 live × 0.1 + 2 × 0.1 ≤ 0.55
    assert "MAX_HOURLY_COST" in p.problems[0] and "2 of the 8" in p.problems[0]


def test_budget_still_heals_inside_it():
    cfg = config(NUM_SLAVES=3, MAX_HOURLY_COST="0.40")
    lost = node(state="gone", request_state="closed", instance_state="terminated")
    p = plan(cfg, converged(cfg, [node(), node(), lost]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "spot")]
    assert p.problems == ()


def test_new_tarball_makes_joined_slaves_join_again():
    cfg = config(NUM_SLAVES=1)
    cluster = converged(cfg, [node()])
    rebuilt = Cluster(cluster.nodes, Desired(join_suffix="@newtarball"))
    p = plan(cfg, rebuilt, NOW)
    slave = next(n for n in cluster.nodes if n.role == "slave")
    assert only(p, Join).slave_ids == (slave.instance_id,)


def test_a_re_pinned_slave_joins_again():
    cfg = config(NUM_SLAVES=1)
    cluster = converged(cfg, [node()])
    slave = next(n for n in cluster.nodes if n.role == "slave")
    re_pinned = Cluster(cluster.nodes, Desired(pins={slave.instance_id: "newkeydigest"}))
    assert only(plan(cfg, re_pinned, NOW), Join).slave_ids == (slave.instance_id,)


def test_slaves_sharing_one_join_tag_are_told_apart_by_their_join_records():
    cfg = config(NUM_SLAVES=3)
    cluster = converged(cfg, [node(), node(), node()])
    master = cluster.master.instance_id
    kept, re_pinned, unrecorded = (n.instance_id for n in cluster.nodes if n.role == "slave")
    shared = tuple(replace(n, tags={**n.tags, TAG_JOINED: join_tag(master, "")})
                   if n.role == "slave" else n for n in cluster.nodes)
    desired = Desired(pins={kept: "k1", re_pinned: "k2", unrecorded: "k3"},
                      joins={kept: f"{master}#k1", re_pinned: f"{master}#k0"})
    assert only(plan(cfg, Cluster(shared, desired), NOW), Join).slave_ids == (
        re_pinned, unrecorded)


def test_master_that_never_answers_is_replaced_and_slaves_kept():
    cfg = config(NUM_SLAVES=1)
    master = node("master", state="running", tags={
        "dd": "master", TAG_GROUP: "master",
        TAG_UNREACHABLE: (NOW - timedelta(minutes=30)).isoformat()})
    slave = node()
    p = plan(cfg, Cluster((master, slave)), NOW)
    assert only(p, Terminate).instance_ids == (master.instance_id,)
    assert launches(p) == [("master", "master", 1, "spot")]
    assert not any(isinstance(a, (Join, ApplyMembership)) for a in p.actions)


def test_on_demand_fallback_is_capped_at_the_missing_count():
    cfg = config(NUM_SLAVES=2, SPOT_FALLBACK="on-demand")
    stale = [node(state="gone", request_state="open", instance=False, minutes_old=30)
             for _ in range(3)]
    p = plan(cfg, converged(cfg, [node(), *stale]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "on-demand")]
    assert set(only(p, CancelRequests).request_ids) == {s.request_id for s in stale}
    assert only(p, Launch).bid is None and "falling back to on-demand" in only(p, Launch).reason


def test_no_fallback_without_stale_bids_or_when_the_setting_is_off():
    fresh_gone = node(state="gone", request_state="closed", instance_state="terminated")
    cfg = config(NUM_SLAVES=1, SPOT_FALLBACK="on-demand")
    assert launches(plan(cfg, converged(cfg, [fresh_gone]), NOW)) == [
        ("slave", "m5.large", 1, "spot")]
    stale = node(state="gone", request_state="open", instance=False, minutes_old=30)
    cfg = config(NUM_SLAVES=1)
    assert launches(plan(cfg, converged(cfg, [stale]), NOW)) == [
        ("slave", "m5.large", 1, "spot")]


def test_budget_counts_launches_already_kept_in_the_same_pass():
    cfg = config(NUM_SLAVES=3, MAX_HOURLY_COST="0.30")
    p = plan(cfg, Cluster(()), NOW)
    assert launches(p) == [("master", "master", 1, "spot"), ("slave", "m5.large", 2, "spot")]
    assert "allows 2 of the 3" in p.problems[0]
    assert "live nodes cost 0.10 USD/h, 0.10 each" in p.problems[0]  # as MAX_BID is written
    assert "allows 2 of the 3 m5.large slaves wanted" in p.problems[0]


def test_budget_across_two_slave_groups_charges_the_first_to_the_second():
    groups = [{"INSTANCE_TYPE": "m5.large", "COUNT": 2},
              {"INSTANCE_TYPE": "c5.xlarge", "COUNT": 2, "MAX_BID": "0.2"}]
    cfg = config(NUM_SLAVES=None, SLAVE_GROUPS=groups, MAX_HOURLY_COST="0.50")
    p = plan(cfg, Cluster(()), NOW)
    # master 0.1 + 2 × 0.1 = 0.3 spent: 0.2 left, one c5.xlarge at 0.2
    assert launches(p)[1:] == [("slave", "m5.large", 2, "spot"), ("slave", "c5.xlarge", 1, "spot")]
    assert len(p.problems) == 1 and "c5.xlarge" in p.problems[0]
    kept = [a for a in p.actions if isinstance(a, Launch)][2]
    assert kept.key == launch_key("dd", cfg.slave_groups[1], 1, "spot", Cluster(()), kept.pools)


def test_budget_that_allows_nothing_more_launches_nothing():
    cfg = config(NUM_SLAVES=3, MAX_HOURLY_COST="0.30")
    p = plan(cfg, converged(cfg, [node(), node()]), NOW)
    assert launches(p) == []
    assert "allows 0 of the 1" in p.problems[0]


def test_budget_of_an_on_demand_master_uses_no_bid():
    cfg = config(NUM_SLAVES=1, MASTER_MARKET="on-demand", MAX_HOURLY_COST="0.10")
    p = plan(cfg, Cluster(()), NOW)
    # the on-demand master has no MAX_BID to count: the one slave still fits
    assert launches(p) == [("master", "master", 1, "on-demand"), ("slave", "m5.large", 1, "spot")]
    assert p.problems == ()


def test_budget_leaves_out_nodes_being_removed():
    cfg = config(NUM_SLAVES=1, MAX_HOURLY_COST="0.20")
    stuck = node(state="running", tags={"dd": "slave", TAG_GROUP: "m5.large",
                                        TAG_FAILURES: "3"})
    p = plan(cfg, converged(cfg, [stuck]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "spot")]  # 0.1 master + 0.1 new
    assert p.problems == ()


def test_bad_parameters_for_another_master_type_do_not_block_the_new_type():
    cfg = config(NUM_SLAVES=0, MASTER_INSTANCE_TYPE="c5.large")
    failed = node("master", state="gone", request_state="failed", status_code="bad-parameters",
                  instance=False, instance_type="m5.large")
    p = plan(cfg, Cluster((failed,)), NOW)
    assert launches(p) == [("master", "master", 1, "spot")]
    assert only(p, Launch).instance_type == "c5.large"
    assert p.problems == ()
    same = replace(failed, instance_type="c5.large")
    p = plan(cfg, Cluster((same,)), NOW)
    assert launches(p) == [] and "c5.large as bad-parameters" in p.problems[0]


def test_bad_parameters_in_one_slave_group_do_not_block_another():
    groups = [{"INSTANCE_TYPE": "m5.large", "COUNT": 1}, {"INSTANCE_TYPE": "c5.xlarge", "COUNT": 1}]
    cfg = config(NUM_SLAVES=None, SLAVE_GROUPS=groups)
    failed = node(state="gone", request_state="closed", status_code="bad-parameters",
                  instance=False, group="c5.xlarge", instance_type="c5.xlarge")
    p = plan(cfg, converged(cfg, [failed]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "spot")]
    assert len(p.problems) == 1 and failed.request_id in p.problems[0]
    assert p.problems[0].startswith("EC2 rejected the slave bid")


def test_a_failed_request_blocks_even_without_the_bad_parameters_code():
    cfg = config(NUM_SLAVES=1)
    failed = node(state="gone", request_state="failed", status_code="system-error",
                  instance=False)
    p = plan(cfg, converged(cfg, [failed]), NOW)
    assert launches(p) == [] and len(p.problems) == 1


# -- leaving slaves out of Disco's table first, whatever the nodes' readiness ----------------

def changed_settings(nodes: tuple[Node, ...]) -> Cluster:
    """The cluster model after a change of every bootstrap digest (e.g. NUM_SLAVES 2 -> 1
    lowers DDFS replicas): no node is ready, and Disco runs on with its table."""
    return Cluster(tuple(replace(n, state="running", reason="waiting for bootstrap")
                         for n in nodes))


def test_a_scale_down_that_changes_the_settings_drains_the_leaving_slave_first():
    cfg = config(NUM_SLAVES=1)
    kept, newest = node(minutes_old=90), node(minutes_old=10)
    cluster = changed_settings(converged(config(NUM_SLAVES=2), [kept, newest]).nodes)
    master = cluster.master
    p = plan(cfg, cluster, NOW)
    assert kinds(p) == ["ApplyMembership", "CancelRequests", "Terminate", "Bootstrap",
                        "ApplyMembership"]
    drain = p.actions[0]
    assert drain.reason == "remove leaving slaves from Disco before terminating them"
    assert (drain.leaving_ids, only(p, Terminate).instance_ids) == ((newest.instance_id,),) * 2
    # the staying slave is not ready either, but it is in Disco's table: it stays there
    assert drain.member_ids == (master.instance_id, kept.instance_id)
    assert p.actions[-1].leaving_ids == ()  # the full step, after the bootstrap


def test_the_drain_keeps_a_staying_slave_that_is_in_the_table_but_not_ready():
    """A ready slave replaced for failing while the other must re-join (a new tarball):
    that one is still in Disco's table with running tasks, so the drain keeps it."""
    cfg = config(NUM_SLAVES=2)
    staying, failing = node(), node()
    cluster = converged(cfg, [staying, failing])
    nodes = tuple(replace(n, state="running", reason="waiting to join the master")
                  if n.instance_id == staying.instance_id else
                  replace(n, tags={**n.tags, TAG_FAILURES: "3"})
                  if n.instance_id == failing.instance_id else n for n in cluster.nodes)
    drain = plan(cfg, Cluster(nodes), NOW).actions[0]
    assert drain.member_ids == (cluster.master.instance_id, staying.instance_id)
    assert drain.leaving_ids == (failing.instance_id,)


def drains(the_plan) -> list[ApplyMembership]:
    return [a for a in the_plan.actions if isinstance(a, ApplyMembership) and a.leaving_ids]


def test_no_drain_where_disco_has_no_table_with_the_leaving_slave():
    cfg = config(NUM_SLAVES=0)
    cluster = converged(cfg, [node()])
    master, slave = cluster.nodes
    untabled = replace(master, tags={k: v for k, v in master.tags.items() if k != TAG_HOSTS})
    for nodes in [(untabled, slave),  # the master never applied a table
                  (master, replace(slave, tags={**slave.tags, TAG_JOINED: "i-oldmaster"})),
                  (replace(master, state="pending", instance_state="pending"), slave)]:
        assert drains(plan(cfg, Cluster(nodes), NOW)) == [], nodes


def test_a_master_whose_disco_restart_waits_for_a_job_gets_the_step_again():
    """Converged but tagged as waiting to restart Disco: every pass tries again (the
    node script restarts once no job is active); untagged it is converged again."""
    cfg = config(NUM_SLAVES=1)
    cluster = converged(cfg, [node()])
    master, slave = cluster.nodes
    waiting = replace(master, tags={**master.tags, TAG_DISCO_RESTART: NOW.isoformat()})
    step = only(plan(cfg, Cluster((waiting, slave)), NOW), ApplyMembership)
    assert step.member_ids == (master.instance_id, slave.instance_id)
    assert step.reason.startswith("Disco's settings changed while a job ran")
    assert plan(cfg, cluster, NOW).actions == ()


def test_joined_master_reads_the_master_from_any_join_tag():
    """Today's shared value and the older per-slave form (the join record) both name it."""
    assert joined_master(node(tags={TAG_JOINED: join_tag("i-0abc", "@0123")})) == "i-0abc"
    assert joined_master(node(tags={TAG_JOINED: join_record("i-0abc", "@0123", "f00d")})) == \
        "i-0abc"
    assert joined_master(node(tags={TAG_JOINED: join_record("i-0abc", "", None)})) == "i-0abc"
    assert joined_master(node(tags={})) is None


# -- what the report says: reasons and descriptions ---------------------------------------

def test_each_action_says_why_in_the_report():
    cfg = config(NUM_SLAVES=2, UNRESPONSIVE_MINUTES=15)
    master = node("master")
    stuck = node(tags={"dd": "slave", TAG_GROUP: "m5.large", TAG_FAILURES: "3"})
    fresh = node(state="running", instance_tagged=False)
    p = plan(cfg, Cluster((*converged(cfg, [stuck], master).nodes, fresh)), NOW)
    assert [(type(a).__name__, a.reason) for a in p.actions] == [
        ("TagInstances", "fulfilled spot instance carries no cluster tag yet"),
        ("ApplyMembership", "remove leaving slaves from Disco before terminating them"),
        ("CancelRequests", "cancel before terminating or re-bidding"),
        ("Terminate", "not wanted, lost or unresponsive"),
        ("Launch", "1 of 2 m5.large slaves live"),
        ("Bootstrap", "running but not bootstrapped with the current config"),
        ("Join", "slave not yet joined to this master"),
        ("ApplyMembership", "membership changed or not applied yet")]
    assert p.actions[1].master_id == master.instance_id
    assert p.actions[1].member_ids == (master.instance_id,)
    assert launches(plan(cfg, Cluster(()), NOW))[0] == ("master", "master", 1, "spot")
    assert only(plan(config(NUM_SLAVES=0), Cluster(()), NOW), Launch).reason == "no master"


def test_the_fallback_reason_names_the_timeout():
    cfg = config(NUM_SLAVES=1, SPOT_FALLBACK="on-demand", SPOT_OPEN_TIMEOUT_MINUTES=7)
    stale = node(state="gone", request_state="open", instance=False, minutes_old=30)
    assert only(plan(cfg, converged(cfg, [stale]), NOW), Launch).reason == (
        "0 of 1 m5.large slave live; spot bids open over 7 min, falling back to on-demand")


def test_down_says_why():
    p = plan_down(Cluster((node(),)))
    assert [a.reason for a in p.actions] == ["down: cancel every open or active request",
                                             "down: terminate every instance"]


def test_action_descriptions():
    assert TagInstances("", ("i-1", "i-2"), "slave", "g").describe() == \
        "tag 2 slave instances i-1, i-2"
    assert TagInstances("", ("i-1",), "master", "g").describe() == "tag 1 master instance i-1"
    assert CancelRequests("", ("sir-1", "sir-2")).describe() == \
        "cancel spot requests sir-1, sir-2"
    assert CancelRequests("", ("sir-1",)).describe() == "cancel spot request sir-1"
    assert Terminate("", ("i-1", "i-2")).describe() == "terminate i-1, i-2"
    assert Launch("", "slave", "g", "c5.large", 3, "spot", 0.125, "k").describe() == \
        "bid 0.125 USD/h for 3 × c5.large (slave)"
    assert Launch("", "slave", "g", "c5.large", 3, "spot", 0.1, "k").describe() == \
        "bid 0.10 USD/h for 3 × c5.large (slave)"  # as the config writes "0.10", not 0.1
    assert Launch("", "master", "master", "m5.large", 1, "on-demand", None, "k").describe() == \
        "launch on-demand 1 × m5.large (master)"
    assert Bootstrap("", ("i-1", "i-2")).describe() == "bootstrap i-1, i-2"
    assert Join("", "i-m", ("i-1", "i-2")).describe() == "join i-1, i-2 to master i-m"
    assert ApplyMembership("", "i-m", ("i-m", "i-1")).describe() == \
        "update host table on i-m: 2 hosts"
    assert ApplyMembership("", "i-m", ("i-m",)).describe() == "update host table on i-m: 1 host"
    assert ApplyMembership("", "i-m", ("i-m",), ("i-1", "i-2")).describe() == \
        "update host table on i-m: 1 host, without i-1, i-2"


# -- rules the tables above leave open ------------------------------------------------------

def test_hourly_cost_is_the_bid_else_the_groups_max_bid_else_nothing():
    cfg = config(MASTER_MARKET="on-demand", MAX_BID="0.10")
    assert hourly_cost(cfg, node(bid=0.3)) == 0.3
    assert hourly_cost(cfg, node(bid=None)) == 0.1
    assert hourly_cost(cfg, node("master", bid=None)) == 0.0
    assert hourly_cost(cfg, node(group="gone-group", bid=None)) == 0.0


def test_budget_counts_a_live_node_without_a_bid_at_its_groups_max_bid():
    cfg = config(NUM_SLAVES=2, MAX_HOURLY_COST="0.25")
    on_demand = node(bid=None, market="on-demand")
    p = plan(cfg, converged(cfg, [on_demand]), NOW)
    assert launches(p) == [] and "allows 0 of the 1" in p.problems[0]


def test_budget_charges_each_kept_launch_before_the_next_group():
    groups = [{"INSTANCE_TYPE": "m5.large", "COUNT": 1},
              {"INSTANCE_TYPE": "c5.xlarge", "COUNT": 2, "MAX_BID": "0.1"}]
    cfg = config(NUM_SLAVES=None, SLAVE_GROUPS=groups, MAX_HOURLY_COST="0.30")
    p = plan(cfg, converged(cfg, []), NOW)  # the master costs 0.1 already
    assert launches(p) == [("slave", "m5.large", 1, "spot"), ("slave", "c5.xlarge", 1, "spot")]


def test_stopping_and_stopped_instances_are_terminated_and_open_requests_cancelled():
    cfg = config(NUM_SLAVES=1)
    stopping = node(state="gone", instance_state="stopping", request_state="open")
    stopped = node(state="gone", instance_state="stopped", request=None, market="on-demand")
    p = plan(cfg, converged(cfg, [node(), stopping, stopped]), NOW)
    assert only(p, Terminate).instance_ids == (stopping.instance_id, stopped.instance_id)
    assert only(p, CancelRequests).request_ids == (stopping.request_id,)


def test_an_unresponsive_on_demand_node_is_terminated_without_a_cancel():
    cfg = config(NUM_SLAVES=0, MASTER_MARKET="on-demand")
    master = node("master", request=None, market="on-demand",
                  tags={"dd": "master", TAG_GROUP: "master", TAG_FAILURES: "3"})
    p = plan(cfg, Cluster((master,)), NOW)
    assert kinds(p) == ["Terminate", "Launch"]


def test_a_ready_node_failing_three_times_is_replaced_too():
    cfg = config(NUM_SLAVES=1)
    broken = node(tags={"dd": "slave", TAG_GROUP: "m5.large", TAG_FAILURES: "3"})
    p = plan(cfg, converged(cfg, [broken]), NOW)
    assert only(p, Terminate).instance_ids == (broken.instance_id,)


def test_a_slave_that_never_became_ready_leaves_without_a_table_update():
    """Never bootstrapped, so never joined: it is in no Disco table to drain."""
    cfg = config(NUM_SLAVES=1)
    stuck = node(state="running", tags={"dd": "slave", TAG_GROUP: "m5.large", TAG_FAILURES: "3"})
    p = plan(cfg, Cluster((*converged(cfg, []).nodes, stuck)), NOW)
    assert kinds(p) == ["CancelRequests", "Terminate", "Launch"]


@pytest.mark.parametrize("naive", [False, True])  # a hand-edited tag without offset is UTC
@pytest.mark.parametrize(("minutes", "gone"), [(14, False), (15, True)])
def test_unresponsive_minutes_boundary(minutes, gone, naive):
    cfg = config(UNRESPONSIVE_MINUTES=15)
    since = NOW - timedelta(minutes=minutes)
    text = (since.replace(tzinfo=None) if naive else since).isoformat()
    assert unresponsive(cfg, node(tags={TAG_UNREACHABLE: text}), NOW) is gone


@pytest.mark.parametrize(("tags", "gone"), [
    ({TAG_UNREACHABLE: "yesterday"}, False), ({TAG_FAILURES: "many"}, False),
    ({TAG_FAILURES: "2"}, False), ({TAG_FAILURES: "3"}, True), ({}, False)])
def test_unresponsive_reads_damaged_tags_as_nothing(tags, gone):
    assert unresponsive(config(), node(tags=tags), NOW) is gone


def test_scale_down_gives_up_a_pending_node_before_an_older_ready_one():
    cfg = config(NUM_SLAVES=1)
    ready, pending = node(minutes_old=5), node(state="pending", minutes_old=50)
    p = plan(cfg, converged(cfg, [ready, pending]), NOW)
    assert only(p, Terminate).instance_ids == (pending.instance_id,)


def test_an_old_bad_parameters_request_is_no_problem_once_the_group_is_full():
    cfg = config(NUM_SLAVES=1)
    failed = node(state="gone", request_state="failed", status_code="bad-parameters",
                  instance=False)
    p = plan(cfg, converged(cfg, [node(), failed]), NOW)
    assert p.problems == () and p.actions == ()


def test_fallback_counts_only_stale_bids_of_its_own_group():
    groups = [{"INSTANCE_TYPE": "m5.large", "COUNT": 1}, {"INSTANCE_TYPE": "c5.xlarge", "COUNT": 1}]
    cfg = config(NUM_SLAVES=None, SLAVE_GROUPS=groups, SPOT_FALLBACK="on-demand")
    stale = node(state="gone", request_state="open", instance=False, minutes_old=30,
                 group="c5.xlarge", instance_type="c5.xlarge")
    p = plan(cfg, converged(cfg, [stale]), NOW)
    assert launches(p) == [("slave", "m5.large", 1, "spot"), ("slave", "c5.xlarge", 1, "on-demand")]


def test_launch_key_is_40_hex_and_ignores_other_groups():
    group = config().slave_groups[0]
    key = launch_key("dd", group, 2, "spot", Cluster((node(),)))
    assert len(key) == 40 and int(key, 16) >= 0
    other = node(group="c5.xlarge", instance_type="c5.xlarge")
    assert launch_key("dd", group, 1, "spot", Cluster((other,))) == \
        launch_key("dd", group, 1, "spot", Cluster(()))


def test_the_planner_imports_no_io_module() -> None:
    """plan.py is pure: importing it must not pull in the SSH or EC2 gateways."""
    code = ("import sys, disposabledisco.plan\n"
            "print(sorted(m for m in sys.modules if m in ('paramiko', 'boto3', "
            "'disposabledisco.remote', 'disposabledisco.ssh', 'disposabledisco.ec2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out
