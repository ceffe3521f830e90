"""LAUNCH_API "fleet": CreateFleet (instant) end to end, the CLI against the moto server with
the sandbox spot market serving CreateFleet (price, capacity, ClientToken).

Runs use `--ec2-only` (no SSH), as in test_cli_ec2.py.
"""

from __future__ import annotations

import pytest

from disposabledisco.cli import main
from disposabledisco.config import ConfigError, load_config
from disposabledisco.ec2 import AwsError, Ec2Gateway

pytestmark = pytest.mark.slow


@pytest.fixture
def config_defaults():
    """Every config here launches by CreateFleet under its own tag key."""
    return {"TAG_KEY": "ddfleet", "LAUNCH_API": "fleet"}


def up(path, *extra) -> int:
    return main(["up", str(path), "--ec2-only", *extra])


def live(ec2_env, tag_key="ddfleet"):
    """(role, type) of every live instance carrying the tag key, from EC2 itself."""
    reservations = ec2_env.client().describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
        {"Name": "tag-key", "Values": [tag_key]}])["Reservations"]
    return sorted(({t["Key"]: t["Value"] for t in i.get("Tags", [])}[tag_key], i["InstanceType"])
                  for r in reservations for i in r["Instances"])


def test_up_from_empty_launches_master_and_slaves_by_create_fleet(
        ec2_env, spot_market, write_config, calls, create_fleet_params):
    sent = create_fleet_params
    path = write_config()
    assert up(path) == 10
    assert calls.count("CreateFleet") == 2  # master, then one call for 3 slaves
    assert not {"RequestSpotInstances", "CreateTags", "DescribeSpotInstanceRequests"} & set(calls)
    assert live(ec2_env) == [("master", "m5.large")] + [("slave", "m5.large")] * 3
    for params, role in zip(sent, ("master", "slave"), strict=True):
        assert params["Type"] == "instant"
        assert params["SpotOptions"] == {"AllocationStrategy": "price-capacity-optimized"}
        assert params["ClientToken"]
        kinds = {s["ResourceType"]: {t["Key"]: t["Value"] for t in s["Tags"]}
                 for s in params["TagSpecifications"]}
        assert kinds["instance"]["ddfleet"] == role and kinds["fleet"]["ddfleet"] == role
    assert sent[0]["ClientToken"] != sent[1]["ClientToken"]
    templates = ec2_env.client().describe_launch_templates()["LaunchTemplates"]
    assert {t["ddfleet"] for t in ({x["Key"]: x["Value"] for x in lt.get("Tags", [])}
                                   for lt in templates)} == {"master", "slave"}


def test_converged_pass_is_one_describe_instances(ec2_env, spot_market, write_config, calls):
    path = write_config()
    assert up(path) == 10
    calls.clear()
    assert up(path) == 10  # nodes still wait for bootstrap: EC2 work is done
    assert calls == ["DescribeInstances"]


def test_group_with_two_types_gets_the_cheaper_then_the_available_one(
        ec2_env, spot_market, write_config):
    spot_market.set_price("m5.large", 0.09)
    spot_market.set_price("m6i.large", 0.03)
    spot_market.set_capacity("m6i.large", 2)
    path = write_config(NUM_SLAVES=None, SLAVE_GROUPS=[
        {"INSTANCE_TYPE": "m5.large", "COUNT": 3, "INSTANCE_TYPES": ["m5.large", "m6i.large"]}])
    up(path)
    assert live(ec2_env) == [("master", "m5.large"), ("slave", "m6i.large"),
                             ("slave", "m6i.large")]  # the cheap pool, as far as it goes
    up(path)  # the cheap pool is full now: the next pass takes the dearer one
    assert live(ec2_env) == [("master", "m5.large"), ("slave", "m5.large"),
                             ("slave", "m6i.large"), ("slave", "m6i.large")]


def test_no_pool_under_the_bid_is_one_aws_error_line(ec2_env, spot_market, write_config):
    spot_market.set_price("m5.large", 0.50)
    gateway = Ec2Gateway(load_config(write_config()))
    with pytest.raises(AwsError) as caught:
        gateway.launch("master", "master", "m5.large", 1, "spot", 0.10, "tok-price")
    assert caught.value.code == "SpotMaxPriceTooLow"
    assert live(ec2_env) == []


def test_retried_launch_with_the_same_client_token_creates_nothing_twice(
        ec2_env, spot_market, write_config):
    gateway = Ec2Gateway(load_config(write_config()))
    first = gateway.launch("slave", "m5.large", "m5.large", 2, "spot", 0.10, "tok-1").ids
    again = Ec2Gateway(load_config(write_config())).launch(
        "slave", "m5.large", "m5.large", 2, "spot", 0.10, "tok-1").ids
    assert first == again and len(first) == 2
    assert live(ec2_env) == [("slave", "m5.large")] * 2
    other = gateway.launch("slave", "m5.large", "m5.large", 1, "spot", 0.10, "tok-2").ids
    assert set(other).isdisjoint(first)
    assert len(live(ec2_env)) == 3


def test_scale_down_terminates_the_extra_slaves(ec2_env, spot_market, write_config):
    path = write_config(NUM_SLAVES=3)
    up(path)
    assert len(live(ec2_env)) == 4
    path = write_config(NUM_SLAVES=1)
    up(path)
    assert live(ec2_env) == [("master", "m5.large"), ("slave", "m5.large")]


def test_fleet_instances_follow_the_market_price(ec2_env, spot_market, write_config):
    """An instant fleet's spot instance is interrupted when the price passes its bid."""
    spot_market.interruption_notice = 0
    up(write_config(NUM_SLAVES=0))
    assert live(ec2_env) == [("master", "m5.large")]
    spot_market.set_price("m5.large", 0.20)
    spot_market.tick(1)
    assert live(ec2_env) == []


@pytest.mark.parametrize("overrides, key", [
    ({"LAUNCH_API": "rocket"}, "LAUNCH_API"),
    ({"LAUNCH_API": "spot-requests", "NUM_SLAVES": None, "SLAVE_GROUPS": [
        {"INSTANCE_TYPE": "m5.large", "COUNT": 1, "INSTANCE_TYPES": ["m5.large", "c5.large"]}]},
     "SLAVE_GROUPS[0].INSTANCE_TYPES"),
    ({"NUM_SLAVES": None, "SLAVE_GROUPS": [
        {"INSTANCE_TYPE": "m5.large", "COUNT": 1, "INSTANCE_TYPES": ["c5.large"]}]},
     "SLAVE_GROUPS[0].INSTANCE_TYPES"),
    ({"NUM_SLAVES": None, "SLAVE_GROUPS": [
        {"INSTANCE_TYPE": "m5.large", "COUNT": 1, "INSTANCE_TYPES": []}]},
     "SLAVE_GROUPS[0].INSTANCE_TYPES"),
    ({"SPOT_REQUEST_TYPE": "persistent"}, "SPOT_REQUEST_TYPE"),
])
def test_bad_launch_settings_are_refused_before_any_call(write_config, calls, capsys,
                                                          overrides, key):
    path = write_config(**overrides)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)
    assert up(path) == 2
    assert key in capsys.readouterr().err
    assert calls == []


def _fleet(client, token, count, overrides):
    name = "tmpl"
    if not client.describe_launch_templates()["LaunchTemplates"]:
        client.create_launch_template(LaunchTemplateName=name,
                                      LaunchTemplateData={"ImageId": "ami-12c6146b"})
    return client.create_fleet(
        Type="instant", ClientToken=token,
        SpotOptions={"AllocationStrategy": "price-capacity-optimized"},
        TargetCapacitySpecification={"TotalTargetCapacity": count,
                                     "DefaultTargetCapacityType": "spot"},
        LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {
            "LaunchTemplateName": name, "Version": "$Latest"}, "Overrides": overrides}])


def test_market_fleet_reports_each_unusable_pool_and_checks_the_token(ec2_env, spot_market):
    """The market's CreateFleet model on its own: an over-bid pool and a full pool are
    Errors entries with EC2's codes, the usable pool launches, and a token reused with
    other parameters is IdempotentParameterMismatch."""
    spot_market.set_price("c5.large", 0.30)
    spot_market.set_capacity("r5.large", 0)
    client = ec2_env.client()
    answer = _fleet(client, "t-1", 2, [{"InstanceType": t, "MaxPrice": "0.2"}
                                       for t in ("c5.large", "r5.large", "m5.large")])
    codes = {e["LaunchTemplateAndOverrides"]["Overrides"]["InstanceType"]: e["ErrorCode"]
             for e in answer["Errors"]}
    assert codes == {"c5.large": "SpotMaxPriceTooLow", "r5.large": "InsufficientInstanceCapacity"}
    assert [(i["InstanceType"], len(i["InstanceIds"])) for i in answer["Instances"]] == [
        ("m5.large", 2)]
    with pytest.raises(Exception, match="IdempotentParameterMismatch"):
        _fleet(client, "t-1", 3, [{"InstanceType": "m5.large", "MaxPrice": "0.2"}])
