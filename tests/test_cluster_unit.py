"""`cluster.build_cluster`, table-driven: boto3-shaped dicts in, nodes with state and reason out.

Pure and fast: no EC2, no SSH. Every case names the exact (state, reason) pair, so a bug
that takes `pending` for `running`, counts any bootstrap tag as done or lets a stale
bid live forever fails here in milliseconds.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from disposabledisco.cluster import (
    TAG_BOOTSTRAP,
    TAG_GROUP,
    TAG_JOINED,
    Cluster,
    Desired,
    Node,
    build_cluster,
    is_joined,
    join_record,
    join_tag,
    keep_order,
    ssh_address,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
TAG = "dd"
DIGESTS = {"master": "digest-master", "slave": "digest-slave"}
DESIRED = Desired(bootstrap=DIGESTS, open_timeout=timedelta(minutes=10))


def tags(**values: str) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in values.items()]


def request(rid: str = "sir-1", state: str = "active", code: str | None = "fulfilled", *,
            instance_id: str | None = None, minutes_old: float = 5, role: str | None = "slave",
            price: str | None = "0.10", itype: str = "m5.large", extra_tags: dict | None = None,
            ) -> dict:
    """A DescribeSpotInstanceRequests entry."""
    found: dict = {"SpotInstanceRequestId": rid, "State": state, "Type": "one-time",
                   "CreateTime": NOW - timedelta(minutes=minutes_old),
                   "LaunchSpecification": {"InstanceType": itype, "ImageId": "ami-spec"},
                   "Tags": tags(**({TAG: role} if role else {}), **(extra_tags or {}))}
    if code is not None:
        found["Status"] = {"Code": code}
    if price is not None:
        found["SpotPrice"] = price
    if instance_id:
        found["InstanceId"] = instance_id
    return found


def instance(iid: str = "i-1", state: str = "running", *, rid: str | None = None,
             role: str | None = "slave", group: str | None = "m5.large",
             bootstrap: str | None = None, joined: str | None = None,
             minutes_old: float = 4, itype: str = "m5.large", lifecycle: str | None = "spot",
             private_ip: str | None = "10.0.0.5", public_ip: str | None = None,
             private_dns: str = "", public_dns: str = "", image: str = "ami-inst") -> dict:
    """A DescribeInstances entry; tags given as None are left out."""
    values = {TAG: role, TAG_GROUP: group, TAG_BOOTSTRAP: bootstrap, TAG_JOINED: joined}
    found: dict = {"InstanceId": iid, "State": {"Name": state}, "InstanceType": itype,
                   "LaunchTime": NOW - timedelta(minutes=minutes_old), "ImageId": image,
                   "PrivateDnsName": private_dns, "PublicDnsName": public_dns,
                   "Tags": tags(**{k: v for k, v in values.items() if v is not None})}
    for key, value in (("SpotInstanceRequestId", rid), ("InstanceLifecycle", lifecycle),
                       ("PrivateIpAddress", private_ip), ("PublicIpAddress", public_ip)):
        if value is not None:
            found[key] = value
    return found


def build(requests=(), instances=(), desired: Desired = DESIRED, now: datetime = NOW) -> Cluster:
    return build_cluster(list(requests), list(instances), TAG, desired, now)


def one(requests=(), instances=(), **kwargs) -> Node:
    cluster = build(requests, instances, **kwargs)
    assert len(cluster.nodes) == 1, cluster.nodes
    return cluster.nodes[0]


def state(node: Node) -> tuple[str, str]:
    return node.state, node.reason


# -- instance states -------------------------------------------------------------------------

READY_MASTER = dict(role="master", group="master", bootstrap=DIGESTS["master"])


@pytest.mark.parametrize(("name", "expected"), [
    ("pending", ("pending", "instance starting")),
    ("running", ("ready", "bootstrapped")),
    ("stopping", ("gone", "instance stopping")),
    ("stopped", ("gone", "instance stopped")),
    ("shutting-down", ("gone", "instance shutting-down")),
    ("terminated", ("gone", "instance terminated")),
])
def test_instance_state_decides_the_node_state(name, expected):
    node = one([request(instance_id="i-1", role="master")],
               [instance("i-1", name, **READY_MASTER)])
    assert state(node) == expected
    assert node.is_live == (expected[0] in ("pending", "ready"))
    assert node.has_instance == (name in ("pending", "running", "stopping", "stopped"))
    assert (node.instance_state, node.request_state) == (name, "active")


def test_pending_instance_with_the_right_digest_is_not_ready():
    node = one(instances=[instance("i-1", "pending", **READY_MASTER)])
    assert state(node) == ("pending", "instance starting")


# -- bootstrap digests -----------------------------------------------------------------------

@pytest.mark.parametrize(("role", "bootstrap", "expected"), [
    ("master", DIGESTS["master"], ("ready", "bootstrapped")),
    ("master", "digest-of-an-older-config", ("running", "waiting for bootstrap")),
    ("master", DIGESTS["slave"], ("running", "waiting for bootstrap")),
    ("master", None, ("running", "waiting for bootstrap")),
    ("master", "", ("running", "waiting for bootstrap")),
    ("slave", DIGESTS["slave"], ("running", "waiting for the master")),  # no master: not ready
    ("slave", DIGESTS["master"], ("running", "waiting for bootstrap")),
    ("slave", None, ("running", "waiting for bootstrap")),
])
def test_bootstrap_tag_must_equal_this_roles_digest(role, bootstrap, expected):
    group = "master" if role == "master" else "m5.large"
    node = one(instances=[instance(role=role, group=group, bootstrap=bootstrap)])
    assert state(node) == expected


def test_no_desired_digest_means_nothing_is_ready():
    node = one(instances=[instance(role="master", group="master", bootstrap="")],
               desired=Desired())
    assert state(node) == ("running", "waiting for bootstrap")


@pytest.mark.parametrize(("role", "group", "tagged"), [
    ("master", "master", True), (None, "master", False), ("master", None, False),
    (None, None, False)])
def test_instance_tagged_needs_the_cluster_tag_and_the_group_tag_on_the_instance(
        role, group, tagged):
    # the request carries the role: the node's role is right even when the instance is bare
    node = one([request(instance_id="i-1", role="master")],
               [instance(role=role, group=group, bootstrap=DIGESTS["master"])])
    assert node.role == "master"
    assert node.instance_tagged is tagged
    assert state(node) == (("ready", "bootstrapped") if tagged
                           else ("running", "waiting for bootstrap"))


def test_no_instance_is_never_tagged():
    node = one([request(state="open", code="pending-evaluation")])
    assert node.instance_tagged is False
    assert node.has_instance is False


# -- requests --------------------------------------------------------------------------------

@pytest.mark.parametrize(("minutes_old", "code", "expected"), [
    (1, "pending-evaluation", ("open", "pending-evaluation")),
    (1, "capacity-not-available", ("open", "capacity-not-available")),
    (1, None, ("open", "pending-evaluation")),
    (10, "price-too-low", ("open", "price-too-low")),  # exactly the timeout: still waiting
    (10 + 1 / 60, "price-too-low", ("gone", "open too long (price-too-low)")),
    (60, "capacity-not-available", ("gone", "open too long (capacity-not-available)")),
])
def test_open_request_lives_until_open_timeout(minutes_old, code, expected):
    node = one([request(state="open", code=code, minutes_old=minutes_old)])
    assert state(node) == expected
    assert node.is_live == (expected[0] == "open")
    assert node.key == "sir-1" and node.instance_id is None


def test_open_timeout_comes_from_desired():
    stale = request(state="open", code="price-too-low", minutes_old=3)
    short = Desired(bootstrap=DIGESTS, open_timeout=timedelta(minutes=2))
    assert state(one([stale], desired=short)) == ("gone", "open too long (price-too-low)")
    assert state(one([stale])) == ("open", "price-too-low")


@pytest.mark.parametrize(("req_state", "code", "expected"), [
    ("closed", "instance-terminated-by-price", ("gone", "request closed "
                                                       "(instance-terminated-by-price)")),
    ("cancelled", "canceled-before-fulfillment", ("gone", "request cancelled "
                                                          "(canceled-before-fulfillment)")),
    ("failed", "bad-parameters", ("gone", "request failed (bad-parameters)")),
    ("failed", "system-error", ("gone", "request failed (system-error)")),
    ("closed", "bad-parameters", ("gone", "request failed (bad-parameters)")),
    ("closed", None, ("gone", "request closed (None)")),
])
def test_ended_requests_without_an_instance_are_gone(req_state, code, expected):
    node = one([request(state=req_state, code=code)])
    assert state(node) == expected
    assert not node.is_live
    assert (node.request_state, node.status_code) == (req_state, code)


@pytest.mark.parametrize(("req_state", "expected"), [
    ("active", ("pending", "instance not visible yet")),
    ("closed", ("gone", "request closed (fulfilled)")),
    ("cancelled", ("gone", "request cancelled (fulfilled)")),
])
def test_request_naming_an_instance_that_is_not_listed(req_state, expected):
    node = one([request(state=req_state, instance_id="i-9")])
    assert state(node) == expected
    assert node.instance_id == "i-9" and node.instance_state is None
    assert node.key == "i-9"


def test_cancelled_request_with_a_running_instance_is_the_instance():
    node = one([request(state="cancelled", code="request-canceled-and-instance-running",
                        instance_id="i-1", role="master")],
               [instance(**READY_MASTER)])
    assert state(node) == ("ready", "bootstrapped")
    assert node.request_state == "cancelled"
    assert node.status_code == "request-canceled-and-instance-running"


# -- linking requests and instances ----------------------------------------------------------

@pytest.mark.parametrize("side", ["request", "instance", "both"])
def test_request_and_instance_join_into_one_node_from_either_side(side):
    req = request(instance_id="i-1" if side in ("request", "both") else None,
                  minutes_old=9, role="master")
    inst = instance(rid="sir-1" if side in ("instance", "both") else None, minutes_old=7,
                    **READY_MASTER)
    node = one([req], [inst])
    assert (node.request_id, node.instance_id) == ("sir-1", "i-1")
    assert node.created == NOW - timedelta(minutes=9)
    assert node.launched == NOW - timedelta(minutes=7)
    assert node.age_reference == node.launched
    assert state(node) == ("ready", "bootstrapped")


def test_unrelated_request_and_instance_stay_two_nodes():
    cluster = build([request("sir-2", state="open", code="pending-evaluation")],
                    [instance("i-1", rid="sir-other")])
    assert sorted(n.key for n in cluster.nodes) == ["i-1", "sir-2"]
    by_key = {n.key: n for n in cluster.nodes}
    assert by_key["i-1"].request_id is None
    assert by_key["sir-2"].instance_id is None


def test_two_requests_each_find_their_own_instance():
    cluster = build([request("sir-1"), request("sir-2")],
                    [instance("i-2", rid="sir-2"), instance("i-1", rid="sir-1")])
    assert sorted((n.request_id, n.instance_id) for n in cluster.nodes) == [
        ("sir-1", "i-1"), ("sir-2", "i-2")]


def test_instance_without_a_request_is_a_node_of_its_own():
    node = one(instances=[instance(lifecycle=None, rid=None, role="slave")])
    assert (node.request_id, node.request_state, node.created) == (None, None, None)
    assert node.age_reference == NOW - timedelta(minutes=4)


# -- fields ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("with_request", "lifecycle", "market"), [
    (True, "spot", "spot"), (True, None, "spot"), (False, "spot", "spot"),
    (False, None, "on-demand"), (False, "scheduled", "on-demand")])
def test_market_spot_or_on_demand(with_request, lifecycle, market):
    requests = [request(instance_id="i-1")] if with_request else []
    assert one(requests, [instance(lifecycle=lifecycle)]).market == market


@pytest.mark.parametrize(("role_tag", "group_tag", "role", "group"), [
    ("master", None, "master", "master"),
    ("slave", None, "slave", "c5.xlarge"),  # a slave's group defaults to its type
    ("slave", "m5.large", "slave", "m5.large"),
    ("master", "special", "master", "special"),
])
def test_role_and_group_from_tags(role_tag, group_tag, role, group):
    node = one(instances=[instance(role=role_tag, group=group_tag, itype="c5.xlarge")])
    assert (node.role, node.group, node.instance_type) == (role, group, "c5.xlarge")


def test_instance_tags_win_over_request_tags_and_fields_come_from_the_right_side():
    req = request(instance_id="i-1", role="master", price="0.25", itype="m5.large",
                  extra_tags={TAG_GROUP: "from-request", "other": "kept"})
    inst = instance(role="master", group="from-instance", itype="m5.xlarge")
    node = one([req], [inst])
    assert node.group == "from-instance"
    assert node.tags["other"] == "kept"
    assert node.instance_type == "m5.xlarge"  # what runs, not what was asked
    assert node.image_id == "ami-spec"
    assert node.bid == 0.25
    assert node.request_type == "one-time"


def test_fields_of_a_bid_without_instance_come_from_the_request():
    node = one([request(state="open", code="pending-evaluation", itype="c5.large")])
    assert (node.instance_type, node.group, node.image_id) == ("c5.large", "c5.large",
                                                                 "ami-spec")
    assert node.bid == 0.1


def test_no_price_means_no_bid_and_image_from_the_instance():
    node = one(instances=[instance(lifecycle=None)])
    assert node.bid is None
    assert node.image_id == "ami-inst"
    assert one([request(price=None, state="open")]).bid is None


# -- addresses -------------------------------------------------------------------------------

@pytest.mark.parametrize(("private_ip", "public_ip", "public_dns", "setting", "address"), [
    ("10.0.0.5", "54.1.2.3", "ec2-54-1-2-3.compute.example", "auto", "54.1.2.3"),
    ("10.0.0.5", None, "ec2-54-1-2-3.compute.example", "auto", "ec2-54-1-2-3.compute.example"),
    ("10.0.0.5", None, "", "auto", "10.0.0.5"),
    ("10.0.0.5", "54.1.2.3", "", "private_ip", "10.0.0.5"),
    ("10.0.0.5", "54.1.2.3", "", "public_ip", "54.1.2.3"),
    ("10.0.0.5", None, "", "public_ip", None),
    ("10.0.0.5", "54.1.2.3", "pub.example", "public_dns", "pub.example"),
    ("10.0.0.5", "54.1.2.3", "", "private_dns", "ip-10-0-0-5.internal"),
    (None, None, "", "auto", None),
])
def test_ssh_address_per_setting(private_ip, public_ip, public_dns, setting, address):
    node = one(instances=[instance(private_ip=private_ip, public_ip=public_ip,
                                   public_dns=public_dns, private_dns="ip-10-0-0-5.internal")])
    assert (node.private_ip, node.public_ip) == (private_ip, public_ip)
    assert node.public_dns == (public_dns or None)
    assert ssh_address(node, setting) == address


def test_empty_dns_names_are_none():
    node = one(instances=[instance(private_dns="", public_dns="")])
    assert (node.private_dns, node.public_dns) == (None, None)


# -- joining the kept master -----------------------------------------------------------------

def slave_joined_to(master_id: str | None, **kwargs) -> dict:
    """A bootstrapped slave tagged in the per-slave form earlier versions wrote."""
    joined = join_record(master_id, kwargs.pop("suffix", ""), kwargs.pop("pin", None)) \
        if master_id else None
    return instance(kwargs.pop("iid", "i-s"), bootstrap=DIGESTS["slave"], joined=joined,
                    **kwargs)


def slave_tagged(value: str) -> dict:
    """A bootstrapped slave with this `joined` tag (the shared form: master + suffix)."""
    return instance("i-s", bootstrap=DIGESTS["slave"], joined=value)


@pytest.mark.parametrize(("master", "slave", "desired", "expected"), [
    ("ready", slave_joined_to("i-m"), DESIRED, ("ready", "bootstrapped")),
    ("ready", slave_joined_to("i-old"), DESIRED, ("running", "waiting to join the master")),
    ("ready", slave_joined_to(None), DESIRED, ("running", "waiting to join the master")),
    ("running", slave_joined_to("i-m"), DESIRED, ("running", "waiting for the master")),
    ("pending", slave_joined_to("i-m"), DESIRED, ("running", "waiting for the master")),
    (None, slave_joined_to("i-m"), DESIRED, ("running", "waiting for the master")),
    ("ready", slave_joined_to("i-m", suffix="@old"), Desired(DIGESTS, join_suffix="@new"),
     ("running", "waiting to join the master")),
    ("ready", slave_joined_to("i-m", suffix="@new"), Desired(DIGESTS, join_suffix="@new"),
     ("ready", "bootstrapped")),
    ("ready", slave_joined_to("i-m", pin="k1"), Desired(DIGESTS, pins={"i-s": "k1"}),
     ("ready", "bootstrapped")),
    ("ready", slave_joined_to("i-m"), Desired(DIGESTS, pins={"i-s": "k1"}),
     ("running", "waiting to join the master")),  # re-pinned: its key must reach the master
    ("ready", slave_joined_to("i-m", pin="k1"), Desired(DIGESTS, pins={"i-s": "k2"}),
     ("running", "waiting to join the master")),
    ("ready", slave_tagged("i-m"), Desired(DIGESTS, pins={"i-s": "k1"},
                                           joins={"i-s": "i-m#k1"}), ("ready", "bootstrapped")),
    ("ready", slave_tagged("i-m"), Desired(DIGESTS, pins={"i-s": "k2"},
                                           joins={"i-s": "i-m#k1"}),
     ("running", "waiting to join the master")),  # the record names the key it replaced
    ("ready", slave_tagged("i-m"), Desired(DIGESTS, pins={"i-s": "k1"},
                                           joins={"i-x": "i-m#k1"}),
     ("running", "waiting to join the master")),  # another slave's record proves nothing
])
def test_a_bootstrapped_slave_is_ready_only_when_joined_to_the_kept_ready_master(
        master, slave, desired, expected):
    instances = [slave]
    if master:
        instances.append(instance("i-m", {"ready": "running"}.get(master, master),
                                  role="master", group="master",
                                  bootstrap=DIGESTS["master"] if master == "ready" else None))
    cluster = build(instances=instances, desired=desired)
    node = next(n for n in cluster.nodes if n.instance_id == "i-s")
    assert state(node) == expected
    if master:
        assert cluster.master.state == master


@pytest.mark.parametrize(("tag", "record", "suffix", "pin", "joined"), [
    # the shared tag counts with this slave's record of this master, inputs and key
    ("i-m", "i-m#k1", "", "k1", True),
    ("i-m@t2", "i-m@t2#k1", "@t2", "k1", True),
    ("i-m", "i-m#unpinned", "", None, True),
    # ...and not without it: a lost STATE_DIR, a tag of the version before pins joined
    ("i-m", None, "", "k1", False),
    ("i-m", "i-m", "", "k1", False),
    # re-pinned (key forgotten and seen anew), or the pin forgotten and not seen yet
    ("i-m", "i-m#k1", "", "k2", False),
    ("i-m", "i-m#k1", "", None, False),
    # the master changed: joined to the new one, crashed before the tag (or the reverse)
    ("i-old", "i-m#k1", "", "k1", False),
    ("i-m", "i-old#k1", "", "k1", False),
    # what a join installs changed
    ("i-m@t1", "i-m@t2#k1", "@t2", "k1", False),
    ("i-m@t1", "i-m@t1#k1", "@t2", "k1", False),
    # never tagged: the join worked, the pass stopped before its CreateTags
    (None, "i-m#k1", "", "k1", False),
    # the per-slave tags earlier versions wrote still count on their own (no mass re-join
    # on upgrade), under the same rules
    ("i-m#k1", None, "", "k1", True),
    ("i-m#unpinned", None, "", None, True),
    ("i-m#k1", None, "", "k2", False),
    ("i-old#k1", None, "", "k1", False),
    ("i-m@t1#k1", None, "@t2", "k1", False),
    ("i-m#k1", "i-m#k2", "", "k2", False),  # re-joined under k2, its shared tag not written
])
def test_joined_needs_tag_and_record_of_this_master_inputs_and_pin(tag, record, suffix, pin,
                                                                    joined):
    assert is_joined(tag, record, "i-m", suffix, pin) is joined


@pytest.mark.parametrize(("master", "suffix", "pin"), [
    ("i-m", "", "k1"), ("i-m", "", None), ("i-0abc", "@0123456789abcdef", "0a1b2c3d4e5f")])
def test_the_shared_tag_is_the_same_for_every_slave_and_never_a_record(master, suffix, pin):
    shared = join_tag(master, suffix)
    assert shared == f"{master}{suffix}" and "#" not in shared
    assert join_record(master, suffix, pin) == f"{shared}#{pin or 'unpinned'}"


def test_join_rule_leaves_masters_and_unbootstrapped_slaves_alone():
    cluster = build(instances=[instance("i-m", role="master", group="master",
                                        bootstrap=DIGESTS["master"]),
                               instance("i-s", joined=join_record("i-m", "", None))])
    assert [state(n) for n in cluster.nodes] == [("ready", "bootstrapped"),
                                                 ("running", "waiting for bootstrap")]


def test_slaves_join_the_kept_master_not_another_ready_one():
    cluster = build(instances=[
        instance("i-new", role="master", group="master", bootstrap=DIGESTS["master"],
                 minutes_old=5),
        instance("i-old", role="master", group="master", bootstrap=DIGESTS["master"],
                 minutes_old=50),
        slave_joined_to("i-new", iid="i-a"), slave_joined_to("i-old", iid="i-b")])
    assert cluster.master.instance_id == "i-old"
    states = {n.instance_id: state(n) for n in cluster.nodes}
    assert states["i-a"] == ("running", "waiting to join the master")
    assert states["i-b"] == ("ready", "bootstrapped")
    assert cluster.desired is DESIRED


# -- the kept master and the queries ---------------------------------------------------------

def master_node(key: str, state_: str, minutes_old: float | None) -> Node:
    when = NOW - timedelta(minutes=minutes_old) if minutes_old is not None else None
    return Node(role="master", group="master", instance_type="m5.large", instance_id=key,
                launched=when, state=state_)


@pytest.mark.parametrize(("masters", "kept"), [
    ([("i-a", "running", 90), ("i-b", "ready", 5)], "i-b"),  # most advanced first
    ([("i-a", "pending", 90), ("i-b", "running", 5)], "i-b"),
    ([("i-a", "open", 90), ("i-b", "pending", 5)], "i-b"),
    ([("i-a", "ready", 5), ("i-b", "ready", 90)], "i-b"),  # then the oldest
    ([("i-b", "ready", 30), ("i-a", "ready", 30)], "i-a"),  # then the key
    ([("i-a", "ready", None), ("i-b", "ready", 1)], "i-b"),  # no age: last
    ([("i-a", "gone", 90), ("i-b", "running", 1)], "i-b"),  # gone is never kept
    ([("i-a", "gone", 90)], None),
    ([], None),
])
def test_master_choice_follows_keep_order(masters, kept):
    cluster = Cluster(tuple(master_node(*m) for m in masters))
    assert (cluster.master.instance_id if cluster.master else None) == kept


def test_keep_order_ranks_state_then_age_then_key():
    nodes = [master_node("i-c", "open", 1), master_node("i-b", "ready", 1),
             master_node("i-a", "ready", 1), master_node("i-d", "ready", 2),
             master_node("i-e", "strange", 100), master_node("i-f", "gone", 100)]
    assert [n.key for n in sorted(nodes, key=keep_order)] == [
        "i-d", "i-a", "i-b", "i-c", "i-f", "i-e"]


def test_cluster_queries_by_role_group_and_liveness():
    cluster = build(
        [request("sir-o", state="open", code="pending-evaluation", itype="c5.large"),
         request("sir-x", state="closed", code="instance-terminated-by-price")],
        [instance("i-m", role="master", group="master"), instance("i-s"),
         instance("i-t", "terminated")])
    assert sorted(n.key for n in cluster.of("slave")) == ["i-s", "i-t", "sir-o", "sir-x"]
    assert sorted(n.key for n in cluster.live("slave")) == ["i-s", "sir-o"]
    assert [n.key for n in cluster.live("slave", "c5.large")] == ["sir-o"]
    assert [n.key for n in cluster.of("master", "master")] == ["i-m"]
    assert cluster.groups("slave") == {"m5.large", "c5.large"}
    assert cluster.groups("master") == {"master"}


def test_node_key_falls_back_to_a_question_mark():
    assert Node(role="slave", group="g", instance_type="t").key == "?"


# -- dates, prices and a spot instance not tagged yet --------------------------------------------

@pytest.mark.parametrize(("created", "expected"), [
    ((NOW - timedelta(minutes=30)).isoformat(), ("gone", "open too long (price-too-low)")),
    ((NOW - timedelta(minutes=3)).isoformat(), ("open", "price-too-low")),
    # 12:00 at +02:00 is 10:00 UTC: two hours old, not fresh
    (datetime(2026, 11, 21, 12, 0, tzinfo=timezone(timedelta(hours=2))),
     ("gone", "open too long (price-too-low)")),
    (datetime(2026, 11, 21, 11, 55), ("open", "price-too-low")),  # naive: read as UTC
])
def test_request_dates_as_strings_other_zones_or_naive(created, expected):
    req = request(state="open", code="price-too-low")
    req["CreateTime"] = created
    assert state(one([req])) == expected


def test_without_a_clock_build_cluster_uses_the_current_time():
    fresh = request(state="open", code="price-too-low")
    fresh["CreateTime"] = datetime.now(timezone.utc)
    node = build_cluster([fresh], [], TAG, DESIRED, None).nodes[0]
    assert state(node) == ("open", "price-too-low")


@pytest.mark.parametrize(("price", "bid"), [("0.25", 0.25), ("0", None), ("-1", None),
                                            ("", None)])
def test_only_a_positive_spot_price_is_a_bid(price, bid):
    assert one([request(state="open", price=price)]).bid == bid


def test_a_request_without_a_type_gives_an_empty_type():
    req = request(state="open")
    del req["LaunchSpecification"]["InstanceType"]
    node = one([req])
    assert (node.instance_type, node.group) == ("", "")


@pytest.mark.parametrize("side", ["request", "instance"])
def test_an_untagged_spot_instance_takes_its_role_from_its_request(side):
    req = request(instance_id="i-1" if side == "request" else None, role="master")
    inst = instance(rid="sir-1" if side == "instance" else None, role=None, group=None)
    node = one([req], [inst])
    assert (node.role, node.group, node.instance_tagged) == ("master", "master", False)
    assert state(node) == ("running", "waiting for bootstrap")
