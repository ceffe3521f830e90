"""Capacity pools, fast: the planner's pool choice with parked pools (table-driven), the
park book's expiry, the config refusals of SUBNET_ID, and a pass that meets a capacity
error (the EC2 side is tests/test_reconcile_unit.py's FakeEc2; the moto server runs in
tests/test_pools_cli.py)."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import boto3
import pytest
from botocore.stub import Stubber

from disposabledisco import reconcile
from disposabledisco.cli import _parked_only, main
from disposabledisco.cluster import Cluster
from disposabledisco.ec2 import HINTS, AwsError, Ec2Gateway, NoCapacity
from disposabledisco.plan import CancelRequests, Launch, Plan, plan
from disposabledisco.pools import Park, ParkBook, in_force
from disposabledisco.statefiles import StateFileError
from tests.test_plan import NOW, config, converged, node
from tests.test_reconcile_unit import FakeEc2
from tests.test_reconcile_unit import config as unit_config

A, B, C = "subnet-0000000a", "subnet-0000000b", "subnet-0000000c"


def parks(*pools: tuple[str, str, int]) -> dict:
    """Parks in force for `minutes` from NOW (negative: already over), by pool."""
    return {(t, p): Park((t, p), NOW + timedelta(minutes=m), "capacity-not-available")
            for t, p, m in pools}


def slave_launches(the_plan) -> list[tuple[int, tuple]]:
    return [(a.count, a.pools) for a in the_plan.actions
            if isinstance(a, Launch) and a.role == "slave"]


M5, M6 = "m5.large", "m6i.large"


@pytest.mark.parametrize(("settings", "parked", "live_in", "expected"), [
    # spot requests: one subnet per bid, spread over the unparked subnets
    ({"SUBNET_ID": [A, B, C]}, {}, [], [(1, ((M5, A),)), (1, ((M5, B),)), (1, ((M5, C),))]),
    ({"SUBNET_ID": [A, B, C]}, parks((M5, B, 30)), [], [(2, ((M5, A),)), (1, ((M5, C),))]),
    # a park that is over counts for nothing (the boundary: until == now is over)
    ({"SUBNET_ID": [A, B]}, parks((M5, A, 0), (M5, B, -5)), [],
     [(2, ((M5, A),)), (1, ((M5, B),))]),
    # a park of another type leaves this type's pool alone
    ({"SUBNET_ID": [A, B]}, parks((M6, A, 30)), [], [(2, ((M5, A),)), (1, ((M5, B),))]),
    # the subnets with fewest live slaves of the group first (3 more beside 2 in A)
    ({"SUBNET_ID": [A, B, C]}, {}, [A, A], [(2, ((M5, B),)), (1, ((M5, C),))]),
    ({"SUBNET_ID": A}, {}, [], [(3, ((M5, A),))]),
    ({"SUBNET_ID": None, "AVAILABILITY_ZONE": "us-east-1b"}, {}, [],
     [(3, ((M5, "us-east-1b"),))]),
    ({"SUBNET_ID": None}, {}, [], [(3, ((M5, ""),))]),
    # a fleet: one launch over every unparked (type, subnet)
    ({"LAUNCH_API": "fleet", "SUBNET_ID": [A, B], "NUM_SLAVES": None,
      "SLAVE_GROUPS": [{"INSTANCE_TYPE": M5, "COUNT": 3, "INSTANCE_TYPES": [M5, M6]}]},
     parks((M6, A, 30)), [], [(3, ((M5, A), (M5, B), (M6, B)))]),
    # every pool parked: nothing is launched
    ({"SUBNET_ID": [A, B]}, parks((M5, A, 30), (M5, B, 10)), [], []),
    ({"LAUNCH_API": "fleet", "SUBNET_ID": [A]}, parks((M5, A, 30)), [], []),
])
def test_launches_go_to_the_unparked_pools(settings, parked, live_in, expected):
    cfg = config(**settings)
    live = [node(subnet_id=place) for place in live_in]
    cfg = config(**{**settings, "NUM_SLAVES": len(live) + 3}) if live else cfg
    the_plan = plan(cfg, converged(cfg, live), NOW, parked)
    assert slave_launches(the_plan) == expected
    assert bool(the_plan.notes) == (not expected)
    assert not the_plan.problems  # parked pools never fail the pass


def test_every_pool_parked_says_which_and_until_when():
    cfg = config(SUBNET_ID=[A, B])
    the_plan = plan(cfg, converged(cfg, []), NOW, parks((M5, A, 30), (M5, B, 10)))
    [note] = the_plan.notes
    assert note == (
        "no m5.large slave launched: every pool it may use is parked after a capacity error "
        f"(m5.large in {B} until 2026-11-21 12:10 UTC (capacity-not-available); m5.large in "
        f"{A} until 2026-11-21 12:30 UTC (capacity-not-available)); the next pass after "
        "2026-11-21 12:10 UTC tries again (CAPACITY_PARK_MINUTES 0 retries now)")


def test_the_master_avoids_a_parked_pool_too():
    cfg = config(SUBNET_ID=[A, B])
    the_plan = plan(cfg, Cluster(()), NOW, parks((M5, A, 30)))
    master = next(a for a in the_plan.actions if isinstance(a, Launch) and a.role == "master")
    assert master.pools == ((M5, B),)


def test_spread_bids_of_equal_count_get_distinct_launch_keys():
    cfg = config(SUBNET_ID=[A, B], NUM_SLAVES=2)
    launches = [a for a in plan(cfg, converged(cfg, []), NOW).actions
                if isinstance(a, Launch) and a.role == "slave"]
    assert [a.count for a in launches] == [1, 1]
    assert launches[0].key != launches[1].key  # else EC2 would answer the second with the first


@pytest.mark.parametrize(("minutes", "code", "age", "cancelled"), [
    (30, "capacity-not-available", 2, True), (30, "capacity-oversubscribed", 2, True),
    # found only after SPOT_OPEN_TIMEOUT_MINUTES (a pass from cron): parked all the same
    (30, "capacity-not-available", 15, True),
    (30, "price-too-low", 2, False), (30, "pending-evaluation", 2, False),
    (0, "capacity-not-available", 2, False)])
def test_an_open_bid_stuck_in_a_capacity_status_is_cancelled_and_its_pool_parked(
        minutes, code, age, cancelled):
    cfg = config(SUBNET_ID=[A, B], NUM_SLAVES=1, CAPACITY_PARK_MINUTES=minutes)
    stuck = node(state="open" if age < 10 else "gone", minutes_old=age, subnet_id=A,
                 status_code=code, instance=False, request_state="open")
    the_plan = plan(cfg, converged(cfg, [stuck]), NOW)
    cancels = [a for a in the_plan.actions if isinstance(a, CancelRequests)]
    if not cancelled:
        assert not cancels and not the_plan.parks and not slave_launches(the_plan)
        return
    assert [c.request_ids for c in cancels] == [(stuck.request_id,)]
    assert the_plan.parks == (((M5, A), code),)
    assert slave_launches(the_plan) == [(1, ((M5, B),))]  # re-bid elsewhere in this pass


@pytest.mark.parametrize(("settings", "pool"), [
    ({"SUBNET_ID": [A, B]}, (M5, A)),
    ({"SUBNET_ID": None, "AVAILABILITY_ZONE": "us-east-1b"}, (M5, "us-east-1b")),
    ({"SUBNET_ID": None}, (M5, "")),
])
def test_a_stuck_bid_parks_its_pool_named_as_the_config_names_places(settings, pool):
    """EC2 reports a bid's subnet and zone both; the parked pool must use the place the
    config launches by, else the park never matches a pool the planner chooses from."""
    cfg = config(**settings, NUM_SLAVES=1, CAPACITY_PARK_MINUTES=30)
    stuck = node(state="open", minutes_old=2, subnet_id=A, zone="us-east-1b",
                 status_code="capacity-not-available", instance=False, request_state="open")
    assert plan(cfg, converged(cfg, [stuck]), NOW).parks == ((pool, "capacity-not-available"),)


# -- the park book -------------------------------------------------------------------------

@pytest.mark.parametrize(("age_minutes", "parked"), [(0, True), (29, True), (30, False),
                                                     (31, False)])
def test_a_park_lasts_capacity_park_minutes(tmp_path, age_minutes, parked):
    book = ParkBook(tmp_path / "cluster")
    book.park({(M5, A): "InsufficientInstanceCapacity"}, NOW, 30)
    later = NOW + timedelta(minutes=age_minutes)
    assert ((M5, A) in book.parked(later)) == parked


def test_parking_again_extends_and_expired_records_are_dropped(tmp_path):
    book = ParkBook(tmp_path / "cluster")
    book.park({(M5, A): "capacity-not-available"}, NOW, 10)
    book.park({(M5, B): "capacity-not-available"}, NOW + timedelta(minutes=20), 10)
    saved = json.loads(book.path.read_text())
    assert [(r["place"], r["until"]) for r in saved] == [(B, "2026-11-21T12:30:00+00:00")]
    book.park({(M5, B): "InsufficientInstanceCapacity"}, NOW + timedelta(minutes=25), 10)
    assert book.parked(NOW + timedelta(minutes=31))[(M5, B)].code == \
        "InsufficientInstanceCapacity"
    assert oct(os.stat(book.path).st_mode & 0o777) == "0o600"


def test_in_force_keeps_the_latest_park_of_a_pool():
    early, late = (Park((M5, A), NOW + timedelta(minutes=m), "x") for m in (5, 9))
    assert in_force([late, early], NOW) == {(M5, A): late}
    assert in_force([late, early], NOW + timedelta(minutes=9)) == {}


def test_zero_minutes_parks_nothing_and_a_damaged_book_reads_as_empty(tmp_path):
    book = ParkBook(tmp_path / "cluster")
    assert book.park({(M5, A): "x"}, NOW, 0) == [] and not book.path.exists()
    assert book.parked(NOW) == {}  # reading does not even create the folder
    assert not book.path.parent.exists()
    book.path.parent.mkdir(mode=0o700)
    for text in ("{not json", '{"a": 1}', '[{"instance_type": "m5.large"}, 3, '
                 '{"instance_type": "m5.large", "place": "", "until": "2026-11-21T12:30:00",'
                 ' "code": "x"}]'):
        book.path.write_text(text)
        assert book.parked(NOW) == {}


def test_a_planted_link_for_the_book_is_refused(tmp_path):
    book = ParkBook(tmp_path / "cluster")
    book.path.parent.mkdir(mode=0o700)
    (tmp_path / "elsewhere").write_text("[]")
    book.path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateFileError, match="symbolic link"):
        book.park({(M5, A): "x"}, NOW, 30)
    with pytest.raises(StateFileError, match="symbolic link"):
        book.parked(NOW)


# -- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "says"), [
    ([], "SUBNET_ID is [], which is empty; use a subnet id"),
    ([A, A], "which has duplicate items; use a subnet id"),
    ([A, 3], "SUBNET_ID[1] is 3 (a whole number); use a subnet id"),
    ([A, "subnet-xyz"], "SUBNET_ID[1] is \"subnet-xyz\", which is not allowed"),
    ({"a": A}, "SUBNET_ID is {\"a\": \"subnet-0000000a\"} (an object); use a subnet id"),
])
def test_a_bad_subnet_list_is_one_sentence_and_exit_2_before_any_ec2_call(
        tmp_path, capsys, monkeypatch, value, says):
    # an endpoint that answers nothing: an EC2 call would hang or fail with exit 1
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:9")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k",
                                "TAG_KEY": "ddpool", "SUBNET_ID": value,
                                "STATE_DIR": str(tmp_path / "state")}))
    assert main(["up", str(path), "--ec2-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "state").exists()


def test_a_subnet_list_with_an_availability_zone_is_warned_about():
    """A subnet's zone is unknown without an EC2 call: a warning, not a refusal."""
    def about_subnets(**settings):
        return [w for w in config(**settings).warnings if "SUBNET_ID" in w]

    [warning] = about_subnets(SUBNET_ID=[A, B], AVAILABILITY_ZONE="us-east-1a")
    assert warning.startswith("SUBNET_ID lists 2 subnets and AVAILABILITY_ZONE is set")
    assert not about_subnets(SUBNET_ID=[A], AVAILABILITY_ZONE="us-east-1a")
    assert not about_subnets(SUBNET_ID=A, AVAILABILITY_ZONE="us-east-1a")
    assert not about_subnets(SUBNET_ID=[A, B])


def test_a_subnet_list_and_capacity_park_minutes_are_accepted():
    cfg = config(SUBNET_ID=[A, B], CAPACITY_PARK_MINUTES=5)
    assert cfg.places == (A, B) and cfg["CAPACITY_PARK_MINUTES"] == 5
    assert config()["CAPACITY_PARK_MINUTES"] == 30 and config().places == ("",)


# -- a pass that meets a capacity error ---------------------------------------------------------

def test_a_capacity_error_parks_the_pool_and_the_pass_progresses(tmp_path):
    cfg, ec2 = unit_config(tmp_path, NUM_SLAVES=0, SUBNET_ID=[A, B]), FakeEc2()
    ec2.fail_launch = NoCapacity("InsufficientInstanceCapacity", "no m5.large",
                                 {(M5, A): "InsufficientInstanceCapacity"}, "try another")
    report = reconcile.run_pass(cfg, ec2, None, now=lambda: NOW)
    [result] = report.results
    assert result.skipped and result.ok and result.action.pools == ((M5, A),)
    assert result.detail == (f"EC2 InsufficientInstanceCapacity: no capacity in m5.large in "
                             f"{A}: parked until 2026-11-21 12:30 UTC; the next pass "
                             "launches elsewhere (try another)")
    assert report.exit_code == reconcile.EXIT_PROGRESSING
    assert list(ParkBook(cfg.state_dir).parked(NOW)) == [(M5, A)]
    ec2.fail_launch = None
    again = reconcile.run_pass(cfg, ec2, None, now=lambda: NOW + timedelta(minutes=1))
    assert ec2.launched[-1][:3] == ("master", "master", M5)
    assert [r.action.pools for r in again.results] == [((M5, B),)]


def test_a_dry_run_parks_nothing(tmp_path):
    cfg, ec2 = unit_config(tmp_path, NUM_SLAVES=0, SUBNET_ID=[A, B]), FakeEc2()
    rid = "sir-stuck"
    ec2.requests[rid] = {
        "SpotInstanceRequestId": rid, "State": "open", "CreateTime": NOW,
        "Status": {"Code": "capacity-not-available"}, "Type": "one-time", "SpotPrice": "0.1",
        "LaunchSpecification": {"InstanceType": M5, "SubnetId": A},
        "Tags": [{"Key": "dd-unit", "Value": "master"}]}
    dry = reconcile.run_pass(cfg, ec2, None, dry_run=True, now=lambda: NOW)
    assert dry.plan.parks == (((M5, A), "capacity-not-available"),)
    assert ParkBook(cfg.state_dir).parked(NOW) == {}
    real = reconcile.run_pass(cfg, ec2, None, now=lambda: NOW)
    assert list(ParkBook(cfg.state_dir).parked(NOW)) == [(M5, A)]
    assert [type(r.action).__name__ for r in real.results] == ["CancelRequests", "Launch"]
    assert real.results[1].action.pools == ((M5, B),)


# -- the gateway's error mapping (a real boto3 client, answers stubbed) ----------------------

def stubbed_gateway(cfg, sent=None):
    """A gateway over a real boto3 client whose answers come from a Stubber; `sent`
    collects the parameters of every call."""
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    if sent is not None:
        client.meta.events.register("provide-client-params.ec2.*",
                                    lambda params, **_: sent.append(params))
    return Ec2Gateway(cfg, client=client), Stubber(client)


@pytest.mark.parametrize(("market", "operation", "code"), [
    ("spot", "request_spot_instances", "InsufficientInstanceCapacity"),
    ("spot", "request_spot_instances", "MaxSpotInstanceCountExceeded"),
    ("on-demand", "run_instances", "InsufficientInstanceCapacity"),
])
def test_a_capacity_error_of_a_one_pool_create_names_that_pool(market, operation, code):
    sent = []
    gateway, stub = stubbed_gateway(config(SUBNET_ID=[A, B]), sent)
    stub.add_client_error(operation, service_error_code=code, service_message="none left")
    with stub, pytest.raises(NoCapacity) as caught:
        gateway.launch("slave", M5, M5, 2, market, 0.1, "tok", ((M5, B),))
    [params] = sent
    assert params.get("LaunchSpecification", params)["SubnetId"] == B  # the pool's subnet
    assert caught.value.pools == {(M5, B): code} and caught.value.code == code
    assert str(caught.value).startswith(f"EC2 {code}: none left (")
    assert caught.value.advice == HINTS[code]  # a spot limit says to ask AWS, not just wait
    assert str(caught.value).endswith("; those pools are parked and the next pass launches "
                                      "elsewhere (see CAPACITY_PARK_MINUTES))")


def test_another_error_of_a_create_stays_an_aws_error():
    gateway, stub = stubbed_gateway(config(SUBNET_ID=[A, B]))
    stub.add_client_error("request_spot_instances", service_error_code="SpotMaxPriceTooLow")
    with stub, pytest.raises(AwsError) as caught:
        gateway.launch("slave", M5, M5, 1, "spot", 0.1, "tok", ((M5, A),))
    assert not isinstance(caught.value, NoCapacity)


def test_a_fleet_returns_its_full_pools_beside_the_instances_it_launched():
    sent = []
    gateway, stub = stubbed_gateway(config(SUBNET_ID=[A, B], LAUNCH_API="fleet"), sent)
    stub.add_response("create_launch_template", {})
    full = {"LaunchTemplateAndOverrides": {"Overrides": {"InstanceType": M5, "SubnetId": A}},
            "ErrorCode": "InsufficientInstanceCapacity", "ErrorMessage": "none"}
    price = {"LaunchTemplateAndOverrides": {"Overrides": {"InstanceType": M6, "SubnetId": B}},
             "ErrorCode": "SpotMaxPriceTooLow", "ErrorMessage": "dear"}
    stub.add_response("create_fleet", {"FleetId": "fleet-1", "Errors": [full, price],
                                       "Instances": [{"InstanceIds": ["i-1", "i-2"]}]})
    with stub:
        launched = gateway.launch("slave", M5, M5, 2, "spot", 0.1, "tok",
                                  ((M5, A), (M5, B), (M6, B)))
    overrides = sent[1]["LaunchTemplateConfigs"][0]["Overrides"]
    assert [(o["InstanceType"], o["SubnetId"]) for o in overrides] == [(M5, A), (M5, B), (M6, B)]
    assert launched.ids == ["i-1", "i-2"]
    assert launched.full == {(M5, A): "InsufficientInstanceCapacity"}  # not the price error
    stub.add_response("create_fleet", {"FleetId": "fleet-2", "Errors": [price, full],
                                       "Instances": []})
    with stub, pytest.raises(NoCapacity) as caught:
        gateway.launch("slave", M5, M5, 2, "spot", 0.1, "tok2", ((M5, A), (M6, B)))
    assert caught.value.pools == {(M5, A): "InsufficientInstanceCapacity"}


@pytest.mark.parametrize(("notes", "nodes", "stops"), [
    (("every pool parked",), [], True),
    (("every pool parked",), [node("master", state="pending")], False),  # still awaited
    ((), [], False),
])
def test_up_wait_stops_only_when_parked_pools_are_all_that_is_left(notes, nodes, stops):
    report = reconcile.PassReport(Cluster(tuple(nodes)), Plan((), notes=notes), [])
    assert _parked_only(report) is stops
