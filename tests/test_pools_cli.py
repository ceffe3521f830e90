"""Capacity pools end to end: the CLI against the moto server with the sandbox spot market,
one subnet of which has no capacity (`SpotMarket.set_capacity(type, 0, place=subnet)`).

Runs use `--ec2-only` (no SSH), as in test_cli_ec2.py: nodes stay "waiting for bootstrap"
and `up` answers 10 while it progresses.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta

import pytest

from disposabledisco import reconcile, report
from disposabledisco.cli import main


def up(path, *extra) -> int:
    return main(["up", str(path), "--ec2-only", *extra])


def subnets(ec2_env, count: int) -> list[str]:
    """The sandbox subnet plus count - 1 more, each in its own zone."""
    client = ec2_env.client()
    made = [client.create_subnet(VpcId=ec2_env.vpc_id, CidrBlock=f"127.10.{i}.0/24",
                                 AvailabilityZone=f"{ec2_env.region}{'bcdef'[i - 1]}")
            ["Subnet"]["SubnetId"] for i in range(1, count)]
    return [ec2_env.subnet_id, *made]


def placed(ec2_env, tag_key="ddtest") -> list[tuple[str, str]]:
    """(role, subnet) of every live instance of the cluster, from EC2 itself."""
    reservations = ec2_env.client().describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
    found = []
    for instance in (i for r in reservations for i in r["Instances"]):
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        found.append((tags.get(tag_key, "untagged"), instance["SubnetId"]))
    return sorted(found)


def open_bids(ec2_env) -> list[str]:
    """The subnet of every open spot request."""
    requests = ec2_env.client().describe_spot_instance_requests()["SpotInstanceRequests"]
    return sorted(r["LaunchSpecification"].get("SubnetId", "") for r in requests
                  if r["State"] == "open")


def status_json(path, capsys) -> dict:
    capsys.readouterr()
    main(["status", str(path), "--json"])
    return json.loads(capsys.readouterr().out)


def later(monkeypatch, minutes: float) -> None:
    """Every clock of a pass and of `status` runs `minutes` ahead (a park's expiry)."""
    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(minutes=minutes)

    monkeypatch.setattr(reconcile, "datetime", Later)
    monkeypatch.setattr(report, "datetime", Later)


def test_spot_bids_stuck_without_capacity_are_parked_and_rebid_in_the_other_subnet(
        ec2_env, spot_market, write_config, capsys, monkeypatch):
    a, b = subnets(ec2_env, 2)
    spot_market.set_capacity("m5.large", 0, place=a)
    path = write_config(SUBNET_ID=[a, b], NUM_SLAVES=2)
    assert up(path) == 10
    assert open_bids(ec2_env) == sorted([a, a, b])  # master and one slave in a, one in b
    spot_market.tick(10)  # b fulfils; a's bids stay open as capacity-not-available
    capsys.readouterr()
    assert up(path) == 10  # cancels a's stuck bids, parks a, bids again in b
    out = capsys.readouterr().out
    assert "cancel spot requests" in out and f"× m5.large in {b} (master)" in out
    assert open_bids(ec2_env) == [b, b]
    spot_market.tick(10)
    assert up(path) == 10
    assert placed(ec2_env) == [("master", b), ("slave", b), ("slave", b)]

    parked = status_json(path, capsys)["parked"]
    assert [(p["instance_type"], p["place"], p["code"]) for p in parked] == [
        ("m5.large", a, "capacity-not-available")]
    until = datetime.fromisoformat(parked[0]["until"])
    assert timedelta(minutes=29) < until - datetime.now(until.tzinfo) <= timedelta(minutes=30)
    main(["status", str(path)])
    assert f"parked: m5.large in {a} until " in capsys.readouterr().out

    # 31 minutes on the park is over: the next bid goes to a again (fewest slaves there)
    later(monkeypatch, 31)
    assert status_json(path, capsys)["parked"] == []
    assert up(write_config(SUBNET_ID=[a, b], NUM_SLAVES=3)) == 10
    assert open_bids(ec2_env) == [a]


def test_a_fleet_parks_the_pool_in_its_errors_and_leaves_it_out_of_the_next_overrides(
        ec2_env, spot_market, write_config, capsys, create_fleet_params):
    sent = create_fleet_params
    a, b = subnets(ec2_env, 2)
    spot_market.set_capacity("m5.large", 0, place=a)
    path = write_config(LAUNCH_API="fleet", TAG_KEY="ddpoolf", SUBNET_ID=[a, b], NUM_SLAVES=2)
    assert up(path) == 10
    assert f"no capacity in m5.large in {a}: parked until" in capsys.readouterr().out
    assert placed(ec2_env, "ddpoolf") == [("master", b), ("slave", b), ("slave", b)]
    first = [o["SubnetId"] for o in sent[0]["LaunchTemplateConfigs"][0]["Overrides"]]
    assert first == [a, b]  # one override per (type, subnet)
    [park] = status_json(path, capsys)["parked"]
    assert (park["place"], park["code"]) == (a, "InsufficientInstanceCapacity")
    sent.clear()
    assert up(write_config(LAUNCH_API="fleet", TAG_KEY="ddpoolf", SUBNET_ID=[a, b],
                           NUM_SLAVES=3)) == 10
    [params] = sent
    assert [o["SubnetId"] for o in params["LaunchTemplateConfigs"][0]["Overrides"]] == [b]


def test_every_pool_parked_is_said_plainly_exits_10_and_bids_nothing(
        ec2_env, spot_market, write_config, capsys, calls):
    [a] = subnets(ec2_env, 1)
    spot_market.set_capacity("m5.large", 0, place=a)
    path = write_config(SUBNET_ID=a, NUM_SLAVES=1)
    assert up(path) == 10
    spot_market.tick(10)
    capsys.readouterr()
    calls.clear()
    assert up(path) == 10  # stuck bids cancelled; nowhere else to bid
    out = capsys.readouterr().out
    assert "RequestSpotInstances" not in calls and "CancelSpotInstanceRequests" in calls
    for who in ("master", "m5.large slave"):
        assert (f"parked: no {who} launched: every pool it may use is parked after a "
                f"capacity error (m5.large in {a} until ") in out
    assert "the next pass after" in out and "FAILED" not in out
    calls.clear()
    assert up(path) == 10  # and again: two reads, no create, no wait
    assert calls == ["DescribeSpotInstanceRequests", "DescribeInstances"]
    calls.clear()
    started = time.monotonic()
    assert up(path, "--wait", "--timeout", "120") == 10  # --wait does not poll for the park
    assert time.monotonic() - started < 10 and len(calls) == 2
    assert "waiting for parked capacity pools after" in capsys.readouterr().out


@pytest.mark.parametrize("api", ["spot-requests", "fleet"])
def test_ec2_calls_of_a_launch_pass_with_one_and_three_subnets(
        ec2_env, spot_market, write_config, calls, api):
    """The figures: one subnet vs three for 6 slaves. Spot requests cost one create per
    subnet used; a fleet one create per group whatever the subnets."""
    counts = {}
    for n in (1, 3):
        ec2_env.endpoint.reset()
        net = ec2_env.endpoint.setup_loopback_network()
        env = type(ec2_env)(**{**ec2_env.__dict__, "subnet_id": net["subnet_id"],
                               "vpc_id": net["vpc_id"]})
        spot_market.reset()
        places = subnets(env, n)
        path = write_config(LAUNCH_API=api, SUBNET_ID=places if n > 1 else places[0],
                            NUM_SLAVES=6, AMI=net["image_id"], KEY_NAME=net["key_name"],
                            SECURITY_GROUPS=[net["security_group_id"]])
        calls.clear()
        assert up(path) == 10
        counts[n] = sorted(calls)
        print(api, n, "subnets:", len(calls), "calls:", counts[n])
    create = "CreateFleet" if api == "fleet" else "RequestSpotInstances"
    assert counts[1].count(create) == 2  # master, slaves
    assert counts[3].count(create) == (2 if api == "fleet" else 4)  # master, 3 subnets
    assert len(counts[3]) - len(counts[1]) == (0 if api == "fleet" else 2)
