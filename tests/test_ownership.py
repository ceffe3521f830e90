"""The cluster boundary (issue 7): only TAG_KEY=master/slave is ours.

The real CLI runs against the local EC2 endpoint beside resources that are not the
cluster's: instances under TAG_KEY with a value that is no role (running and stopped),
instances of other owners (`Name=prod-web` running, `Name=prod-db` stopped) and a spot
request under TAG_KEY=other with the instance it launched. Each of them must keep its state
and its tags exactly through `up`, `up --dry-run`, `status`, `down --yes` and a whole
lifecycle, every pass printing one warning line about them. The fast half feeds
`build_cluster` malformed EC2 records: it lists or reads them, never raises.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from bench.ec2_calls import mark_converged
from disposabledisco.cli import main
from disposabledisco.cluster import ROLES, TAG_GROUP, Cluster, Desired, Foreign, build_cluster
from disposabledisco.config import load_config
from disposabledisco.ec2 import Ec2Gateway, NotOurs
from disposabledisco.plan import plan, plan_down
from disposabledisco.reconcile import PassReport
from disposabledisco.report import foreign_warning, pass_json, status_table
from tests.test_cli_ec2 import MUTATING, REPO, converge_ec2, live
from tests.test_plan import config as plan_config

TAG = "ddtest"  # write_config's TAG_KEY
WARNING = "not this cluster's and"  # "is not ... is left alone" or "are not ... are"


class Strangers:
    """Resources of other owners in the account, and a snapshot of everything about them."""

    def __init__(self, ec2_env: Any) -> None:
        self.client = ec2_env.client()
        self.env = ec2_env
        self.by_name = {
            "webserver running": self._run({TAG: "webserver"}),
            "webserver stopped": self._run({TAG: "webserver"}, stop=True),
            "capitalised role": self._run({TAG: "Slave"}),
            "empty value": self._run({TAG: ""}),
            "prod-web": self._run({"Name": "prod-web"}),
            "prod-db": self._run({"Name": "prod-db"}, stop=True),
        }
        answer = self.client.request_spot_instances(
            InstanceCount=1, SpotPrice="0.05", LaunchSpecification=self._spec(),
            TagSpecifications=[{"ResourceType": "spot-instances-request",
                                "Tags": [{"Key": TAG, "Value": "other"}]}])
        self.request = answer["SpotInstanceRequests"][0]["SpotInstanceRequestId"]
        found = self.client.describe_spot_instance_requests(
            SpotInstanceRequestIds=[self.request])["SpotInstanceRequests"][0]
        assert found["State"] == "active" and found.get("InstanceId"), found
        self.by_name["instance of the other request"] = found["InstanceId"]
        self.under_tag_key = {self.by_name[n] for n in (
            "webserver running", "webserver stopped", "capitalised role", "empty value")}
        self.under_tag_key.add(self.request)

    def _spec(self) -> dict:
        return {"ImageId": self.env.image_id, "InstanceType": "t3.micro",
                "SubnetId": self.env.subnet_id}

    def _run(self, tags: dict[str, str], stop: bool = False) -> str:
        spec = self._spec()
        answer = self.client.run_instances(
            **spec, MinCount=1, MaxCount=1, TagSpecifications=[
                {"ResourceType": "instance",
                 "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
        instance_id = answer["Instances"][0]["InstanceId"]
        if stop:
            self.client.stop_instances(InstanceIds=[instance_id])
        return instance_id

    def snapshot(self) -> dict[str, tuple]:
        """State and exact tags of every stranger (and of the other owner's request)."""
        reservations = self.client.describe_instances(
            InstanceIds=list(self.by_name.values()))["Reservations"]
        seen = {i["InstanceId"]: (i["State"]["Name"], _tag_set(i)) for r in reservations
                for i in r["Instances"]}
        request = self.client.describe_spot_instance_requests(
            SpotInstanceRequestIds=[self.request])["SpotInstanceRequests"][0]
        seen[self.request] = (request["State"], _tag_set(request))
        return seen


def _tag_set(resource: dict) -> tuple:
    return tuple(sorted((t["Key"], t["Value"]) for t in resource.get("Tags", [])))


@pytest.fixture
def strangers(ec2_env) -> Strangers:
    found = Strangers(ec2_env)
    seen = found.snapshot()
    assert [seen[found.by_name[n]][0] for n in ("prod-web", "prod-db", "webserver stopped")] \
        == ["running", "stopped", "stopped"]
    return found


def ours_live(ec2_env) -> tuple[list[str], list[str]]:
    """Roles of our live instances and ids of our open or active requests, from EC2."""
    roles, _ = live(ec2_env)
    requests = ec2_env.client().describe_spot_instance_requests(Filters=[
        {"Name": f"tag:{TAG}", "Values": list(ROLES)}])["SpotInstanceRequests"]
    return (sorted(role for role, _ in roles if role in ROLES),
            sorted(r["SpotInstanceRequestId"] for r in requests
                   if r["State"] in ("open", "active")))


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if WARNING in line]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_up_dry_run_status_and_down_leave_strangers_exactly_as_they_were(
        ec2_env, write_config, strangers, capsys):
    path = str(write_config())
    before = strangers.snapshot()

    code, _, err = run_cli(capsys, "up", path, "--ec2-only")
    assert code == 10
    assert len(warnings(err)) == 1
    assert strangers.snapshot() == before
    assert len(ours_live(ec2_env)[1]) == 4  # our bids: master and 3 slaves

    code, out, err = run_cli(capsys, "up", path, "--dry-run")
    assert code == 10 and len(warnings(err)) == 1
    assert not any(i in out for i in strangers.by_name.values())  # no stranger in the plan
    assert strangers.snapshot() == before

    code, out, _ = run_cli(capsys, "status", path)
    assert code == 10
    not_ours = {line.split()[2] for line in out.splitlines() if line.startswith("not ours")}
    assert not_ours == strangers.under_tag_key  # the rest is not even seen
    assert f"{TAG}='webserver' is not master or slave" in out
    assert "4 live" in out  # the strangers are not counted

    code, out, _ = run_cli(capsys, "status", path, "--json")
    shown = json.loads(out)
    assert {f["id"] for f in shown["foreign"]} == strangers.under_tag_key
    assert {f["tag_value"] for f in shown["foreign"]} == {"webserver", "Slave", "", "other"}
    assert not {n["instance_id"] for n in shown["nodes"]} & set(strangers.by_name.values())

    code, _, err = run_cli(capsys, "down", path, "--yes")
    assert code == 0 and len(warnings(err)) == 1
    assert strangers.snapshot() == before
    assert ours_live(ec2_env) == ([], [])  # ours are gone, and only ours
    code, out, _ = run_cli(capsys, "down", path, "--yes")
    assert (code, out.strip()) == (0, "nothing to take down")
    assert strangers.snapshot() == before


def test_a_whole_lifecycle_beside_strangers(ec2_env, write_config, strangers, capsys):
    """Up to a converged 1+3 (node phase recorded in tags), scale to 1 slave, down."""
    path = write_config(NUM_SLAVES=3)
    before = strangers.snapshot()
    converge_ec2(path)
    mark_converged(load_config(path), ec2_env.client())
    code, _, err = run_cli(capsys, "up", str(path), "--ec2-only")
    assert code == 0 and len(warnings(err)) == 1  # converged, strangers and all
    assert run_cli(capsys, "status", str(path))[0] == 0
    assert strangers.snapshot() == before

    write_config(NUM_SLAVES=1)
    converge_ec2(path)
    assert ours_live(ec2_env)[0] == ["master", "slave"]
    mark_converged(load_config(path), ec2_env.client())
    assert run_cli(capsys, "up", str(path), "--ec2-only")[0] == 0
    assert strangers.snapshot() == before

    assert run_cli(capsys, "down", str(path), "--yes")[0] == 0
    assert ours_live(ec2_env) == ([], [])
    assert strangers.snapshot() == before


def test_an_instance_of_our_request_retagged_by_someone_else_is_theirs(
        ec2_env, write_config, capsys):
    """The instance's own tag wins: its request (ours) is cancelled, the instance kept."""
    path = write_config(NUM_SLAVES=1)
    converge_ec2(path)
    client = ec2_env.client()
    slave = client.describe_instances(Filters=[{"Name": f"tag:{TAG}", "Values": ["slave"]}])[
        "Reservations"][0]["Instances"][0]
    taken, request = slave["InstanceId"], next(
        r["SpotInstanceRequestId"] for r in
        client.describe_spot_instance_requests()["SpotInstanceRequests"]
        if r.get("InstanceId") == slave["InstanceId"])
    client.create_tags(Resources=[taken], Tags=[{"Key": TAG, "Value": "webserver"}])
    kept = client.describe_instances(InstanceIds=[taken])["Reservations"][0]["Instances"][0]

    code, out, err = run_cli(capsys, "up", str(path), "--ec2-only")
    assert code == 10 and len(warnings(err)) == 1
    assert f"cancel spot request {request}" in out and taken not in out
    assert request not in ours_live(ec2_env)[1]  # cancelled (moto then forgets it)
    converge_ec2(path)
    roles, _ = live(ec2_env)
    assert sorted(r for r, _ in roles) == ["master", "slave", "webserver"]  # replaced

    assert run_cli(capsys, "down", str(path), "--yes")[0] == 0
    after = client.describe_instances(InstanceIds=[taken])["Reservations"][0]["Instances"][0]
    assert (after["State"]["Name"], _tag_set(after)) == ("running", _tag_set(kept))


def test_the_gateway_refuses_writes_to_ids_it_did_not_see_as_ours(
        ec2_env, write_config, strangers, calls):
    gateway = Ec2Gateway(load_config(write_config()))
    gateway.observe()
    webserver, prod_web = strangers.by_name["webserver running"], strangers.by_name["prod-web"]
    attempts = [
        lambda: gateway.terminate([webserver]),
        lambda: gateway.terminate([prod_web]),
        lambda: gateway.tag([prod_web], {TAG: "slave", TAG_GROUP: "m5.large"}),
        lambda: gateway.untag([webserver], [TAG]),
        lambda: gateway.cancel([strangers.request]),
    ]
    calls.clear()
    for attempt in attempts:
        with pytest.raises(NotOurs, match="refused to"):
            attempt()
    assert not MUTATING & set(calls), calls
    # what it creates is its own at once; a mix of ours and theirs is refused as a whole
    [mine] = gateway.launch("slave", "m5.large", "m5.large", 1, "spot", 0.1, "token-1").ids
    with pytest.raises(NotOurs, match=strangers.request):
        gateway.cancel([mine, strangers.request])
    assert not MUTATING - {"RequestSpotInstances"} & set(calls)
    gateway.cancel([mine])
    assert calls.count("CancelSpotInstanceRequests") == 1


def test_a_real_process_prints_one_warning_line_and_no_traceback(ec2_env, write_config,
                                                                strangers):
    path = write_config(NUM_SLAVES=1)
    run = subprocess.run([sys.executable, "-m", "disposabledisco", "up", str(path),
                          "--ec2-only"], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode == 10, run.stderr
    assert "Traceback" not in run.stderr
    [line] = warnings(run.stderr)
    assert line.startswith("warning: 5 resources under TAG_KEY 'ddtest' are not this "
                           "cluster's and are left alone: ")


def test_foreign_warning_agrees_with_one_resource():
    one = Foreign("i-taken", "instance", "webserver", "dd='webserver' is not master or slave")
    cfg = plan_config(TAG_KEY="dd")
    assert foreign_warning(cfg, Cluster((), foreign=(one,))) == (
        "warning: 1 resource under TAG_KEY 'dd' is not this cluster's and is left alone: "
        "instance i-taken (dd='webserver' is not master or slave)")
    assert foreign_warning(cfg, Cluster(())) is None


@pytest.mark.parametrize(("region", "aws_region", "expected"), [
    (None, None, "ENV"), ("eu-west-1", None, "eu-west-1"),
    (None, "ap-south-1", "ap-south-1")])  # boto3 alone would take AWS_DEFAULT_REGION here
def test_the_gateway_changes_the_place_its_lock_is_keyed_on(ec2_env, write_config,
                                                            monkeypatch, region, aws_region,
                                                            expected):
    if aws_region:
        monkeypatch.setenv("AWS_REGION", aws_region)
    config = load_config(write_config(REGION=region))
    client = Ec2Gateway(config).client
    wanted = ec2_env.region if expected == "ENV" else expected
    assert client.meta.region_name == config.region == wanted
    assert client.meta.endpoint_url == config.endpoint_url == ec2_env.url
    assert config.state_dir.name.startswith(f"{TAG}@{config.region}+")


NS = 'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"'
ODD_INSTANCES = f"""<DescribeInstancesResponse {NS}><requestId>r</requestId><reservationSet>
<item><reservationId>r-1</reservationId><instancesSet>
 <item><instanceState><name>running</name></instanceState>
  <tagSet><item><key>{TAG}</key><value>slave</value></item></tagSet></item>
 <item><instanceId>i-odd</instanceId><instanceState><name>rebooting</name></instanceState>
  <tagSet><item><key>{TAG}</key><value>webserver</value></item></tagSet></item>
 <item><instanceId>i-bare</instanceId></item>
</instancesSet></item></reservationSet></DescribeInstancesResponse>"""
ODD_REQUESTS = f"""<DescribeSpotInstanceRequestsResponse {NS}><requestId>r</requestId>
<spotInstanceRequestSet>
 <item><state>open</state><tagSet><item><key>{TAG}</key><value>master</value></item></tagSet>
 </item>
 <item><spotInstanceRequestId>sir-odd</spotInstanceRequestId><state>sleeping</state>
  <spotPrice>cheap</spotPrice><instanceId>i-bare</instanceId>
  <tagSet><item><key>{TAG}</key><value>slave</value></item></tagSet></item>
</spotInstanceRequestSet></DescribeSpotInstanceRequestsResponse>"""


def answer_with(replies: dict[str, str]):
    """An endpoint hook that answers these actions with this XML instead of moto."""
    def hook(action):
        body = replies.get(action)
        return None if body is None else (200, [("Content-Type", "text/xml")], body.encode())
    return hook


def test_odd_describe_answers_end_in_an_exit_code_not_a_traceback(ec2_env, write_config,
                                                                  capsys):
    path = str(write_config(NUM_SLAVES=1))
    ec2_env.endpoint.set_http_hook(answer_with({"DescribeInstances": ODD_INSTANCES,
                                                "DescribeSpotInstanceRequests": ODD_REQUESTS}))
    try:
        code, out, err = run_cli(capsys, "status", path, "--all")
        assert code == 10
        assert "malformed record: no InstanceId" in out
        assert "i-bare" in out and "ended (instance state unknown)" in out  # ours, not live
        code, _, err = run_cli(capsys, "up", path, "--ec2-only", "--dry-run")
        assert code == 10 and len(warnings(err)) == 1
    finally:
        ec2_env.endpoint.set_http_hook(None)


def test_a_create_answer_without_ids_fails_the_pass_in_one_line(ec2_env, write_config,
                                                                capsys):
    path = str(write_config(NUM_SLAVES=1))
    empty = f"<RequestSpotInstancesResponse {NS}><requestId>r</requestId>" \
            "</RequestSpotInstancesResponse>"
    ec2_env.endpoint.set_http_hook(answer_with({"RequestSpotInstances": empty}))
    try:
        code, out, _ = run_cli(capsys, "up", path, "--ec2-only")
    finally:
        ec2_env.endpoint.set_http_hook(None)
    assert code == 1
    assert "EC2 MalformedResponse: the answer to the create lists no SpotInstanceRequestId" \
        in out


# -- build_cluster is total ------------------------------------------------------------------

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
DESIRED = Desired(bootstrap={"master": "d-m", "slave": "d-s"})
GOOD = {"InstanceId": "i-good", "State": {"Name": "running"}, "InstanceType": "m5.large",
        "LaunchTime": NOW, "PrivateIpAddress": "10.0.0.9",
        "Tags": [{"Key": "dd", "Value": "master"}, {"Key": TAG_GROUP, "Value": "master"}]}


def good_request(**fields: Any) -> dict:
    return {"SpotInstanceRequestId": "sir-good", "State": "open", "CreateTime": NOW,
            "Tags": [{"Key": "dd", "Value": "slave"}], **fields}


def everything_downstream(cluster) -> None:
    """The planner, teardown and both reports run over it without raising."""
    cfg = plan_config()
    report = PassReport(cluster, plan(cfg, cluster, NOW), [], True, 3)
    pass_json(report)
    status_table(cfg, cluster)
    plan_down(cluster)


@pytest.mark.parametrize(("record", "reason"), [
    (None, "malformed record: not a mapping (NoneType)"),
    ("i-123", "malformed record: not a mapping (str)"),
    ([], "malformed record: not a mapping (list)"),
    ({}, "malformed record: no InstanceId"),
    ({"InstanceId": None}, "malformed record: no InstanceId"),
    ({"InstanceId": 7, "Tags": [{"Key": "dd", "Value": "slave"}]},
     "malformed record: no InstanceId"),
    ({"InstanceId": "i-x", "Tags": [{"Key": "dd", "Value": None}]},
     "dd='None' is not master or slave"),
    ({"InstanceId": "i-x", "Tags": [{"Key": "dd", "Value": ["master"]}]},
     "dd=\"['master']\" is not master or slave"),
    ({"InstanceId": "i-x", "Tags": "dd=slave"}, "no dd tag and no spot request of ours"),
    ({"InstanceId": "i-x", "Tags": [None, 3, {"Key": None, "Value": "slave"}]},
     "no dd tag and no spot request of ours"),
])
def test_unreadable_or_foreign_instance_records_are_listed_not_raised(record, reason):
    cluster = build_cluster([], [GOOD, record], "dd", DESIRED, NOW)
    assert [n.instance_id for n in cluster.nodes] == ["i-good"]
    assert [f.reason for f in cluster.foreign] == [reason]
    everything_downstream(cluster)


@pytest.mark.parametrize(("fields", "state", "reason"), [
    ({"State": None}, "gone", "instance state unknown"),
    ({"State": "running"}, "gone", "instance state unknown"),
    ({"State": {"Name": 16}}, "gone", "instance state unknown"),
    ({"State": {"Name": "rebooting"}}, "gone", "instance rebooting"),
    ({"LaunchTime": "yesterday", "InstanceType": None}, "running", "waiting for bootstrap"),
    ({"LaunchTime": datetime(2026, 11, 21, 11, 0)}, "running", "waiting for bootstrap"),
    ({"PrivateIpAddress": 10, "Tags": [{"Key": "dd", "Value": "slave"},
                                       {"Key": "disposabledisco:failures", "Value": "x"},
                                       {"Key": "disposabledisco:unreachable-since",
                                        "Value": "2026-11-21T10:00:00"}]},
     "running", "waiting for bootstrap"),
])
def test_odd_fields_of_our_instance_read_as_unknown(fields, state, reason):
    record = {"InstanceId": "i-odd", "Tags": [{"Key": "dd", "Value": "slave"}],
              "State": {"Name": "running"}, **fields}
    cluster = build_cluster([], [GOOD, record], "dd", DESIRED, NOW)
    node = next(n for n in cluster.nodes if n.instance_id == "i-odd")
    assert (node.state, node.reason) == (state, reason)
    assert cluster.foreign == ()
    everything_downstream(cluster)


@pytest.mark.parametrize(("fields", "bid", "state"), [
    ({"SpotPrice": "abc"}, None, "open"),
    ({"SpotPrice": "nan"}, None, "open"),
    ({"SpotPrice": "-1"}, None, "open"),
    ({"SpotPrice": True}, None, "open"),
    ({"SpotPrice": 0.25}, 0.25, "open"),
    ({"CreateTime": None, "Status": "fulfilled", "LaunchSpecification": None}, None, "open"),
    ({"CreateTime": datetime(2026, 11, 21, 9, 0)}, None, "gone"),  # naive: UTC, too old
    ({"State": None}, None, "gone"),
    ({"State": "weird", "InstanceId": 7}, None, "gone"),
])
def test_odd_fields_of_our_request_read_as_unknown(fields, bid, state):
    cluster = build_cluster([good_request(**fields)], [GOOD], "dd", DESIRED, NOW)
    node = next(n for n in cluster.nodes if n.request_id == "sir-good")
    assert (node.bid, node.state) == (bid, state)
    assert node.instance_id is None
    everything_downstream(cluster)


def test_malformed_requests_are_listed_and_an_untagged_instance_needs_a_request_of_ours():
    cluster = build_cluster(
        [None, {"State": "open"}, good_request(SpotInstanceRequestId="sir-o",
                                               Tags=[{"Key": "dd", "Value": "other"}],
                                               InstanceId="i-of-other")],
        [GOOD, {"InstanceId": "i-of-other", "State": {"Name": "running"}}],
        "dd", DESIRED, NOW)
    assert [n.instance_id for n in cluster.nodes] == ["i-good"]
    assert sorted((f.resource_id, f.kind, f.value) for f in cluster.foreign) == [
        ("?", "spot request", None), ("?", "spot request", None),
        ("i-of-other", "instance", None), ("sir-o", "spot request", "other")]


def test_a_request_of_ours_gives_its_untagged_instance_its_role():
    cluster = build_cluster(
        [good_request(State="active", InstanceId="i-new")],
        [{"InstanceId": "i-new", "State": {"Name": "running"}, "InstanceType": "c5.large"}],
        "dd", DESIRED, NOW)
    [node] = cluster.nodes
    assert (node.role, node.instance_id, node.request_id, node.instance_tagged) == (
        "slave", "i-new", "sir-good", False)
    assert cluster.foreign == ()


def test_a_request_of_ours_whose_instance_says_otherwise_keeps_only_the_request():
    cluster = build_cluster(
        [good_request(State="active", InstanceId="i-taken")],
        [{"InstanceId": "i-taken", "State": {"Name": "running"},
          "Tags": [{"Key": "dd", "Value": "webserver"}]}],
        "dd", DESIRED, NOW)
    [node] = cluster.nodes
    assert (node.request_id, node.instance_id, node.state, node.reason) == (
        "sir-good", None, "gone", "its instance i-taken is not ours")
    assert [(f.resource_id, f.value) for f in cluster.foreign] == [("i-taken", "webserver")]
    down = plan_down(cluster)
    assert [a.describe() for a in down.actions] == ["cancel spot request sir-good"]


KEYS = {
    "instance": ["InstanceId", "State", "InstanceType", "LaunchTime", "Tags",
                 "SpotInstanceRequestId", "InstanceLifecycle", "ImageId", "PrivateIpAddress",
                 "PublicIpAddress", "PrivateDnsName", "PublicDnsName"],
    "request": ["SpotInstanceRequestId", "InstanceId", "State", "Type", "Status", "SpotPrice",
                "LaunchSpecification", "CreateTime", "Tags"],
}


def _odd_value(rng: random.Random, depth: int = 0) -> Any:
    """Anything JSON-like or datetime-like, biased to the values EC2 really uses."""
    choices: list[Any] = [
        None, "", "x", "master", "slave", "running", "stopped", "open", "active", "i-1",
        "i-2", "sir-1", "sir-2", "dd", "0.10", "nan", -1, 0, 7, 2.5, True, NOW,
        datetime(2026, 1, 1), "2026-11-21T10:00:00", {"Name": "running"}, {"Code": "x"}]
    if depth < 2:
        choices += [[{"Key": rng.choice(["dd", TAG_GROUP, "Name", None]),
                      "Value": _odd_value(rng, depth + 1)}
                     for _ in range(rng.randint(0, 3))],
                    {k: _odd_value(rng, depth + 1) for k in ("Name", "Code", "InstanceType")}]
    return rng.choice(choices)


def _odd_record(rng: random.Random, kind: str) -> Any:
    if rng.random() < 0.05:
        return _odd_value(rng)
    keys = rng.sample(KEYS[kind], rng.randint(0, len(KEYS[kind])))
    return {k: _odd_value(rng) for k in keys}


def test_build_cluster_and_everything_after_it_survive_three_thousand_random_views():
    rng = random.Random(20261202)
    for _ in range(3000):
        requests = [_odd_record(rng, "request") for _ in range(rng.randint(0, 3))]
        instances = [_odd_record(rng, "instance") for _ in range(rng.randint(0, 3))]
        cluster = build_cluster(requests, instances, "dd", DESIRED,
                                NOW - timedelta(minutes=rng.randint(0, 60)))
        everything_downstream(cluster)
        for kind, field in (("instance", "instance_id"), ("spot request", "request_id")):
            theirs = {f.resource_id for f in cluster.foreign if f.kind == kind}
            assert not {getattr(n, field) for n in cluster.nodes} & theirs, (requests, instances)
