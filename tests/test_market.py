"""The spot market model, tested through boto3 over HTTP against the local endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from disposabledisco.config import load_config
from disposabledisco.ec2 import AwsError, Ec2Gateway
from disposabledisco.sandbox.market import SpotMarket
from tests.ec2_fixtures import Ec2Env

ITYPE = "m5.large"
TAG_KEY = "disposabledisco-test"


def request_spot(ec2: Any, env: Ec2Env, *, price: str | None = "0.05",
                 kind: str = "one-time", itype: str = ITYPE, count: int = 1,
                 tags: dict[str, str] | None = None, **extra: Any) -> list[dict[str, Any]]:
    spec = {"ImageId": env.image_id, "InstanceType": itype, "KeyName": env.key_name,
            "SubnetId": env.subnet_id, "SecurityGroupIds": [env.security_group_id],
            "UserData": "IyEvYmluL3NoCmVjaG8gaGkK"}
    kwargs: dict[str, Any] = {"InstanceCount": count, "Type": kind, "LaunchSpecification": spec}
    if price is not None:
        kwargs["SpotPrice"] = price
    if tags:
        kwargs["TagSpecifications"] = [{
            "ResourceType": "spot-instances-request",
            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
        }]
    kwargs.update(extra)
    return ec2.request_spot_instances(**kwargs)["SpotInstanceRequests"]  # type: ignore[no-any-return]


def describe(ec2: Any, request_id: str) -> dict[str, Any]:
    found = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])
    return found["SpotInstanceRequests"][0]  # type: ignore[no-any-return]


def instance(ec2: Any, instance_id: str) -> dict[str, Any]:
    found = ec2.describe_instances(InstanceIds=[instance_id])
    return found["Reservations"][0]["Instances"][0]  # type: ignore[no-any-return]


def status(request: dict[str, Any]) -> tuple[str, str]:
    return request["State"], request["Status"]["Code"]


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


# --------------------------------------------------------------------------- fulfilment
def test_request_opens_then_fulfils_after_delay(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 5
    (req,) = request_spot(ec2, ec2_env, kind="persistent")
    rid = req["SpotInstanceRequestId"]
    assert status(req) == ("open", "pending-evaluation")
    assert "InstanceId" not in req

    spot_market.tick(4)
    assert status(describe(ec2, rid)) == ("open", "pending-evaluation")
    assert ec2.describe_instances()["Reservations"] == []

    spot_market.tick(1)
    got = describe(ec2, rid)
    assert status(got) == ("active", "fulfilled")
    inst = instance(ec2, got["InstanceId"])
    assert inst["State"]["Name"] == "running"
    assert inst["InstanceType"] == ITYPE
    assert inst["ImageId"] == ec2_env.image_id
    assert inst["KeyName"] == ec2_env.key_name
    assert inst["SubnetId"] == ec2_env.subnet_id
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [ec2_env.security_group_id]
    assert inst["PrivateIpAddress"] == "127.10.0.4"
    assert inst["InstanceLifecycle"] == "spot"
    assert inst["SpotInstanceRequestId"] == rid
    assert got["LaunchSpecification"]["SecurityGroups"][0]["GroupId"] == (
        ec2_env.security_group_id)
    assert got["Status"]["UpdateTime"] > got["CreateTime"]


def test_zero_delay_fulfils_on_next_tick_not_before(ec2_env: Ec2Env,
                                                    spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    (req,) = request_spot(ec2, ec2_env)
    assert status(describe(ec2, req["SpotInstanceRequestId"]))[0] == "open"
    spot_market.tick()
    assert status(describe(ec2, req["SpotInstanceRequestId"])) == ("active", "fulfilled")


def test_price_too_low_stays_open_until_price_drops(ec2_env: Ec2Env,
                                                    spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    spot_market.set_price(ITYPE, 0.10)
    (req,) = request_spot(ec2, ec2_env, price="0.05")
    rid = req["SpotInstanceRequestId"]
    spot_market.tick(60)
    got = describe(ec2, rid)
    assert status(got) == ("open", "price-too-low")
    assert "InstanceId" not in got
    spot_market.set_price(ITYPE, 0.04)
    spot_market.tick(1)
    assert status(describe(ec2, rid)) == ("active", "fulfilled")


def test_request_without_bid_pays_up_to_on_demand(ec2_env: Ec2Env,
                                                  spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    spot_market.set_price(ITYPE, 5.0)
    (req,) = request_spot(ec2, ec2_env, price=None)
    spot_market.tick()
    assert status(describe(ec2, req["SpotInstanceRequestId"])) == ("active", "fulfilled")


def test_capacity_limits_fulfilment(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    spot_market.set_capacity(ITYPE, 1)
    first, second = request_spot(ec2, ec2_env, count=2)
    spot_market.tick()
    a, b = describe(ec2, first["SpotInstanceRequestId"]), describe(ec2,
                                                               second["SpotInstanceRequestId"])
    assert status(a) == ("active", "fulfilled")
    assert status(b) == ("open", "capacity-not-available")

    ec2.terminate_instances(InstanceIds=[a["InstanceId"]])
    spot_market.tick()
    assert status(describe(ec2, first["SpotInstanceRequestId"])) == (
        "closed", "instance-terminated-by-user")
    assert status(describe(ec2, second["SpotInstanceRequestId"])) == ("active", "fulfilled")


def test_capacity_shrinking_interrupts_newest(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    first, second = request_spot(ec2, ec2_env, count=2)
    spot_market.tick()
    spot_market.set_capacity(ITYPE, 1)
    spot_market.tick()
    assert status(describe(ec2, first["SpotInstanceRequestId"])) == ("active", "fulfilled")
    assert status(describe(ec2, second["SpotInstanceRequestId"])) == (
        "closed", "instance-terminated-no-capacity")


# --------------------------------------------------------------------------- interruptions
def test_interrupting_one_time_request_closes_it(ec2_env: Ec2Env,
                                                 spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    gone: list[str] = []
    spot_market.on_terminate(gone.append)
    (req,) = request_spot(ec2, ec2_env)
    spot_market.tick()
    iid = describe(ec2, req["SpotInstanceRequestId"])["InstanceId"]

    spot_market.interrupt(iid)
    got = describe(ec2, req["SpotInstanceRequestId"])
    assert status(got) == ("closed", "instance-terminated-by-price")
    assert got["InstanceId"] == iid
    inst = instance(ec2, iid)
    assert inst["State"]["Name"] == "terminated"
    assert inst["StateReason"]["Code"] == "Server.SpotInstanceTermination"
    assert gone == [iid]
    spot_market.tick(600)
    assert status(describe(ec2, req["SpotInstanceRequestId"]))[0] == "closed"


def test_interrupting_persistent_request_reopens_and_relaunches(
        ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 5
    (req,) = request_spot(ec2, ec2_env, kind="persistent")
    rid = req["SpotInstanceRequestId"]
    spot_market.tick(5)
    old = describe(ec2, rid)["InstanceId"]

    spot_market.interrupt(old, reason="instance-terminated-no-capacity")
    reopened = describe(ec2, rid)
    assert status(reopened) == ("open", "pending-evaluation")
    assert "InstanceId" not in reopened
    spot_market.tick(5)
    again = describe(ec2, rid)
    assert status(again) == ("active", "fulfilled")
    assert again["InstanceId"] != old
    assert instance(ec2, again["InstanceId"])["State"]["Name"] == "running"
    assert instance(ec2, old)["State"]["Name"] == "terminated"


def test_price_rise_above_bid_interrupts(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    spot_market.set_price(ITYPE, 0.02)
    (req,) = request_spot(ec2, ec2_env, price="0.03")
    spot_market.tick()
    spot_market.set_price(ITYPE, 0.04)
    events = spot_market.tick()
    assert [e.kind for e in events] == ["interrupt", "close"]
    assert status(describe(ec2, req["SpotInstanceRequestId"])) == (
        "closed", "instance-terminated-by-price")


def test_interruption_notice_marks_before_terminating(ec2_env: Ec2Env,
                                                      spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    spot_market.interruption_notice = 120
    (req,) = request_spot(ec2, ec2_env)
    spot_market.tick()
    rid = req["SpotInstanceRequestId"]
    iid = describe(ec2, rid)["InstanceId"]
    spot_market.interrupt(iid)
    assert status(describe(ec2, rid)) == ("active", "marked-for-termination")
    spot_market.tick(119)
    assert instance(ec2, iid)["State"]["Name"] == "running"
    spot_market.tick(1)
    assert status(describe(ec2, rid)) == ("closed", "instance-terminated-by-price")
    assert instance(ec2, iid)["State"]["Name"] == "terminated"


def _random_interruption_minutes(ec2_env: Ec2Env, market: SpotMarket) -> list[int]:
    ec2 = ec2_env.client()
    market.fulfil_delay = 0
    market.interruption_rate = 0.2
    request_spot(ec2, ec2_env, kind="persistent", count=3)
    minutes = []
    for minute in range(20):
        events = market.tick(60)
        minutes += [minute for e in events if e.kind == "interrupt"]
    return minutes


def test_random_interruptions_are_seeded(ec2_env: Ec2Env, local_ec2: Any) -> None:
    runs = []
    for _ in range(2):
        local_ec2.reset()
        env = Ec2Env(**{**ec2_env.__dict__, **_network(local_ec2)})
        with SpotMarket(seed=7).install(local_ec2) as market:
            runs.append(_random_interruption_minutes(env, market))
    assert runs[0] == runs[1]
    assert runs[0], "rate 0.2/min over 60 instance-minutes should interrupt something"


def _network(local_ec2: Any) -> dict[str, str]:
    net = local_ec2.setup_loopback_network()
    return {k: net[k] for k in ("vpc_id", "subnet_id", "security_group_id", "key_name",
                                "image_id")}


def test_zero_rate_never_interrupts(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    assert _random_interruption_minutes_with_rate(ec2_env, spot_market, 0.0) == []


def _random_interruption_minutes_with_rate(env: Ec2Env, market: SpotMarket,
                                           rate: float) -> list[str]:
    ec2 = env.client()
    market.fulfil_delay = 0
    market.interruption_rate = rate
    request_spot(ec2, env, count=2)
    market.tick()
    return [e.kind for _ in range(10) for e in market.tick(60) if e.kind == "interrupt"]


# --------------------------------------------------------------------------- cancel / terminate
def test_cancel_open_request(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    (req,) = request_spot(ec2, ec2_env)
    rid = req["SpotInstanceRequestId"]
    answer = ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[rid])
    assert answer["CancelledSpotInstanceRequests"] == [
        {"SpotInstanceRequestId": rid, "State": "cancelled"}]
    spot_market.tick(60)
    got = describe(ec2, rid)
    assert status(got) == ("cancelled", "canceled-before-fulfillment")
    assert "InstanceId" not in got
    assert ec2.describe_instances()["Reservations"] == []


def test_cancel_active_request_keeps_instance(ec2_env: Ec2Env,
                                              spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    (req,) = request_spot(ec2, ec2_env, kind="persistent")
    rid = req["SpotInstanceRequestId"]
    spot_market.tick()
    iid = describe(ec2, rid)["InstanceId"]
    ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[rid])
    got = describe(ec2, rid)
    assert status(got) == ("cancelled", "request-canceled-and-instance-running")
    assert got["InstanceId"] == iid
    assert instance(ec2, iid)["State"]["Name"] == "running"

    ec2.terminate_instances(InstanceIds=[iid])
    spot_market.tick(60)
    assert status(describe(ec2, rid)) == ("cancelled", "request-canceled-and-instance-running")
    assert len(ec2.describe_instances()["Reservations"]) == 1  # no relaunch


def test_cancel_unknown_request_is_not_found(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    with pytest.raises(ClientError) as exc:
        ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=["sir-00000000"])
    assert error_code(exc) == "InvalidSpotInstanceRequestID.NotFound"
    with pytest.raises(ClientError) as exc:
        ec2.describe_spot_instance_requests(SpotInstanceRequestIds=["sir-00000000"])
    assert error_code(exc) == "InvalidSpotInstanceRequestID.NotFound"


def test_terminating_instance_of_persistent_request_reopens_it(
        ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    (req,) = request_spot(ec2, ec2_env, kind="persistent")
    rid = req["SpotInstanceRequestId"]
    spot_market.tick()
    old = describe(ec2, rid)["InstanceId"]
    ec2.terminate_instances(InstanceIds=[old])
    assert status(describe(ec2, rid)) == ("open", "pending-evaluation")
    spot_market.tick()
    assert describe(ec2, rid)["InstanceId"] not in (None, old)


# --------------------------------------------------------------------------- idempotency
def test_request_spot_instances_client_token(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    first = request_spot(ec2, ec2_env, count=2, ClientToken="tok-1")
    again = request_spot(ec2, ec2_env, count=2, ClientToken="tok-1")
    ids = sorted(r["SpotInstanceRequestId"] for r in first)
    assert sorted(r["SpotInstanceRequestId"] for r in again) == ids
    listed = ec2.describe_spot_instance_requests()["SpotInstanceRequests"]
    assert sorted(r["SpotInstanceRequestId"] for r in listed) == ids

    with pytest.raises(ClientError) as exc:
        request_spot(ec2, ec2_env, count=2, price="0.07", ClientToken="tok-1")
    assert error_code(exc) == "IdempotentParameterMismatch"
    other = request_spot(ec2, ec2_env, ClientToken="tok-2")
    assert other[0]["SpotInstanceRequestId"] not in ids


def test_run_instances_client_token(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    args = {"ImageId": ec2_env.image_id, "InstanceType": "t3.micro", "MinCount": 1,
            "MaxCount": 1, "SubnetId": ec2_env.subnet_id}
    first = ec2.run_instances(ClientToken="run-1", **args)
    again = ec2.run_instances(ClientToken="run-1", **args)
    assert again["ReservationId"] == first["ReservationId"]
    assert [i["InstanceId"] for i in again["Instances"]] == [
        i["InstanceId"] for i in first["Instances"]]
    assert len(ec2.describe_instances()["Reservations"]) == 1
    with pytest.raises(ClientError) as exc:
        ec2.run_instances(ClientToken="run-1", **{**args, "InstanceType": "t3.small"})
    assert error_code(exc) == "IdempotentParameterMismatch"


# --------------------------------------------------------------------------- tags
def test_instance_tag_specifications_are_rejected(ec2_env: Ec2Env,
                                                  spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    with pytest.raises(ClientError) as exc:
        request_spot(ec2, ec2_env, TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": TAG_KEY, "Value": "slave"}]}])
    assert error_code(exc) == "InvalidParameterValue"
    assert "instance" in exc.value.response["Error"]["Message"]
    assert ec2.describe_spot_instance_requests()["SpotInstanceRequests"] == []


def test_request_tags_are_kept_and_filterable_but_not_copied(
        ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    (tagged,) = request_spot(ec2, ec2_env, tags={TAG_KEY: "slave"})
    request_spot(ec2, ec2_env)
    assert tagged["Tags"] == [{"Key": TAG_KEY, "Value": "slave"}]
    found = ec2.describe_spot_instance_requests(
        Filters=[{"Name": "tag-key", "Values": [TAG_KEY]}])["SpotInstanceRequests"]
    assert [r["SpotInstanceRequestId"] for r in found] == [tagged["SpotInstanceRequestId"]]
    spot_market.tick()
    iid = describe(ec2, tagged["SpotInstanceRequestId"])["InstanceId"]
    assert instance(ec2, iid).get("Tags", []) == []


def test_status_code_filter(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    spot_market.set_price(ITYPE, 0.10)
    (low,) = request_spot(ec2, ec2_env, price="0.01")
    (ok,) = request_spot(ec2, ec2_env, price="0.50")
    spot_market.tick()
    found = ec2.describe_spot_instance_requests(
        Filters=[{"Name": "status-code", "Values": ["price-too-low"]}])["SpotInstanceRequests"]
    assert [r["SpotInstanceRequestId"] for r in found] == [low["SpotInstanceRequestId"]]
    found = ec2.describe_spot_instance_requests(
        Filters=[{"Name": "state", "Values": ["active"]}])["SpotInstanceRequests"]
    assert [r["SpotInstanceRequestId"] for r in found] == [ok["SpotInstanceRequestId"]]


# --------------------------------------------------------------------------- throttling
def test_throttling_is_visible_without_retries(ec2_env: Ec2Env,
                                               spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client(config=Config(retries={"total_max_attempts": 1}))
    spot_market.throttle_rate = 1.0
    with pytest.raises(ClientError) as exc:
        ec2.describe_spot_instance_requests()
    assert error_code(exc) == "RequestLimitExceeded"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert spot_market.calls["DescribeSpotInstanceRequests"] == 1
    assert spot_market.throttled["DescribeSpotInstanceRequests"] == 1


def test_throttling_is_absorbed_by_standard_retries(ec2_env: Ec2Env,
                                                    spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client(config=Config(retries={"mode": "standard", "max_attempts": 10}))
    spot_market.throttle_rate = 0.3
    spot_market.throttle_actions = {"DescribeSpotInstanceRequests"}
    request_spot(ec2, ec2_env)
    for _ in range(5):
        assert len(ec2.describe_spot_instance_requests()["SpotInstanceRequests"]) == 1
    throttled = spot_market.throttled["DescribeSpotInstanceRequests"]
    assert throttled > 0
    assert spot_market.calls["DescribeSpotInstanceRequests"] == 5 + throttled
    assert spot_market.calls["RequestSpotInstances"] == 1


def test_other_http_hooks_coexist_with_the_market(ec2_env: Ec2Env,
                                                  spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client(config=Config(retries={"total_max_attempts": 1}))
    seen: list[str | None] = []
    ec2_env.endpoint.set_http_hook(lambda action: seen.append(action))
    spot_market.throttle_rate = 1.0
    with pytest.raises(ClientError):
        ec2.describe_instances()
    ec2_env.endpoint.set_http_hook(None)
    with pytest.raises(ClientError):
        ec2.describe_instances()
    assert seen == ["DescribeInstances"]
    assert spot_market.calls["DescribeInstances"] == 2


# --------------------------------------------------------------------------- consistency
def test_not_found_window_after_create(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    spot_market.not_found_window = 3
    (req,) = request_spot(ec2, ec2_env, tags={TAG_KEY: "master"})
    rid = req["SpotInstanceRequestId"]
    by_tag = [{"Name": "tag-key", "Values": [TAG_KEY]}]
    with pytest.raises(ClientError) as exc:
        describe(ec2, rid)
    assert error_code(exc) == "InvalidSpotInstanceRequestID.NotFound"
    assert ec2.describe_spot_instance_requests(Filters=by_tag)["SpotInstanceRequests"] == []
    with pytest.raises(ClientError) as exc:
        ec2.create_tags(Resources=[rid], Tags=[{"Key": "x", "Value": "y"}])
    assert error_code(exc) == "InvalidSpotInstanceRequestID.NotFound"

    spot_market.tick(3)  # the request becomes visible and is fulfilled now
    got = describe(ec2, rid)
    iid = got["InstanceId"]
    assert [r["SpotInstanceRequestId"] for r in ec2.describe_spot_instance_requests(
        Filters=by_tag)["SpotInstanceRequests"]] == [rid]
    with pytest.raises(ClientError) as exc:
        instance(ec2, iid)
    assert error_code(exc) == "InvalidInstanceID.NotFound"
    with pytest.raises(ClientError) as exc:
        ec2.create_tags(Resources=[iid], Tags=[{"Key": TAG_KEY, "Value": "master"}])
    assert error_code(exc) == "InvalidInstanceID.NotFound"
    assert ec2.describe_instances()["Reservations"] == []

    spot_market.clock.advance(3)
    ec2.create_tags(Resources=[iid], Tags=[{"Key": TAG_KEY, "Value": "master"}])
    found = ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": [TAG_KEY]}])
    assert [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]] == [iid]


# --------------------------------------------------------------------------- observation
def test_on_launch_gets_loopback_private_ips(ec2_env: Ec2Env,
                                             spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0
    launched: list[tuple[str, str]] = []
    terminated: list[str] = []
    spot_market.on_launch(lambda iid, ip: launched.append((iid, ip)))
    spot_market.on_terminate(terminated.append)
    on_demand = ec2.run_instances(ImageId=ec2_env.image_id, InstanceType="t3.micro",
                                  MinCount=1, MaxCount=1, SubnetId=ec2_env.subnet_id)
    od_id = on_demand["Instances"][0]["InstanceId"]
    (req,) = request_spot(ec2, ec2_env)
    spot_market.tick()
    spot_id = describe(ec2, req["SpotInstanceRequestId"])["InstanceId"]
    assert launched == [(od_id, "127.10.0.4"), (spot_id, "127.10.0.5")]
    ec2.terminate_instances(InstanceIds=[od_id, spot_id])
    assert sorted(terminated) == sorted([od_id, spot_id])


def test_run_instances_with_spot_market_options(ec2_env: Ec2Env,
                                                spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.set_price(ITYPE, 0.05)
    args: dict[str, Any] = {
        "ImageId": ec2_env.image_id, "InstanceType": ITYPE, "MinCount": 1, "MaxCount": 1,
        "SubnetId": ec2_env.subnet_id,
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": TAG_KEY, "Value": "slave"}]},
            {"ResourceType": "spot-instances-request",
             "Tags": [{"Key": TAG_KEY, "Value": "slave"}]}],
    }
    with pytest.raises(ClientError) as exc:
        ec2.run_instances(InstanceMarketOptions={
            "MarketType": "spot", "SpotOptions": {"MaxPrice": "0.01"}}, **args)
    assert error_code(exc) == "SpotMaxPriceTooLow"

    answer = ec2.run_instances(InstanceMarketOptions={
        "MarketType": "spot", "SpotOptions": {"MaxPrice": "0.10"}}, **args)
    iid = answer["Instances"][0]["InstanceId"]
    (req,) = ec2.describe_spot_instance_requests(
        Filters=[{"Name": "tag-key", "Values": [TAG_KEY]}])["SpotInstanceRequests"]
    assert status(req) == ("active", "fulfilled")
    assert req["InstanceId"] == iid
    assert instance(ec2, iid)["Tags"] == [{"Key": TAG_KEY, "Value": "slave"}]
    spot_market.interrupt(iid)
    assert status(describe(ec2, req["SpotInstanceRequestId"])) == (
        "closed", "instance-terminated-by-price")

    spot_market.set_capacity(ITYPE, 0)
    with pytest.raises(ClientError) as exc:
        ec2.run_instances(InstanceMarketOptions={"MarketType": "spot"}, **args)
    assert error_code(exc) == "InsufficientInstanceCapacity"


def test_spot_price_history_reports_current_price(ec2_env: Ec2Env,
                                                  spot_market: SpotMarket) -> None:
    ec2 = ec2_env.client()
    spot_market.set_price(ITYPE, 0.0423)
    history = ec2.describe_spot_price_history(InstanceTypes=[ITYPE])["SpotPriceHistory"]
    assert history
    assert {h["SpotPrice"] for h in history} == {"0.042300"}
    assert {h["InstanceType"] for h in history} == {ITYPE}


def test_price_walk_is_seeded(ec2_env: Ec2Env) -> None:
    walks = []
    for _ in range(2):
        market = SpotMarket(seed=3, prices={ITYPE: 0.05, "c5.xlarge": 0.08},
                            price_volatility=0.1)
        walks.append([(market.tick(60), market.price(ITYPE), market.price("c5.xlarge"))[1:]
                      for _ in range(5)])
    assert walks[0] == walks[1]
    assert len({p for p, _ in walks[0]}) > 1


def test_background_ticks_follow_real_time(ec2_env: Ec2Env, spot_market: SpotMarket) -> None:
    import time

    ec2 = ec2_env.client()
    spot_market.fulfil_delay = 0.2
    (req,) = request_spot(ec2, ec2_env)
    spot_market.background(interval=0.05)
    try:
        deadline = time.monotonic() + 10
        while status(describe(ec2, req["SpotInstanceRequestId"]))[0] != "active":
            assert time.monotonic() < deadline, "background market never fulfilled"
            time.sleep(0.05)
    finally:
        spot_market.stop()
    assert spot_market.clock.seconds >= 0.2


def test_uninstall_gives_moto_back(ec2_env: Ec2Env, local_ec2: Any) -> None:
    from moto.ec2.responses import EC2Response

    market = SpotMarket().install(local_ec2)
    market.uninstall()
    assert "request_spot_instances" not in EC2Response.__dict__
    ec2 = ec2_env.client()
    (req,) = request_spot(ec2, ec2_env)
    assert req["State"] == "active"  # moto's own immediate fulfilment
    assert market.calls["RequestSpotInstances"] == 0


def test_fleet_launches_of_one_gateway_create_each_launch_template_once(
        ec2_env: Ec2Env, spot_market: SpotMarket, write_config: Any, calls: list[str]) -> None:
    """Two slave groups share the slave template: one CreateLaunchTemplate for them, not two."""
    path = write_config(TAG_KEY="ddlt", LAUNCH_API="fleet", NUM_SLAVES=None, SLAVE_GROUPS=[
        {"INSTANCE_TYPE": "m5.large", "COUNT": 1}, {"INSTANCE_TYPE": "c5.xlarge", "COUNT": 1}])
    gateway = Ec2Gateway(load_config(path))
    gateway.launch("slave", "m5.large", "m5.large", 1, "spot", 0.5, "token-a")
    gateway.launch("slave", "c5.xlarge", "c5.xlarge", 1, "spot", 0.5, "token-b")
    gateway.launch("master", "master", "m5.large", 1, "spot", 0.5, "token-c")
    assert calls.count("CreateFleet") == 3
    assert calls.count("CreateLaunchTemplate") == 2  # slave (once), master
    names = [t["LaunchTemplateName"] for t in
             ec2_env.client().describe_launch_templates()["LaunchTemplates"]]
    assert len(names) == 2


def test_a_fleet_that_launched_nothing_is_the_first_pools_error_with_its_hint(
        ec2_env: Ec2Env, spot_market: SpotMarket, write_config: Any) -> None:
    spot_market.set_price("m5.large", 0.50)
    gateway = Ec2Gateway(load_config(write_config(TAG_KEY="ddlt", LAUNCH_API="fleet")))
    with pytest.raises(AwsError) as caught:
        gateway.launch("master", "master", "m5.large", 1, "spot", 0.10, "tok-hint")
    assert caught.value.code == "SpotMaxPriceTooLow"
    assert str(caught.value).endswith("(MAX_BID is below the current spot price: raise MAX_BID)")
