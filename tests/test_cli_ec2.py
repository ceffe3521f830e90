"""The EC2 side end to end: the real CLI against a moto server over HTTP on 127.0.0.1.

These runs use `--ec2-only` (no SSH), so nodes honestly stay "waiting for bootstrap"
and `up` answers 10; the node side is tested with real sshd nodes elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from disposabledisco.cli import main
from disposabledisco.config import load_config
from disposabledisco.lock import cluster_lock
from tests.cli_capture import cli

REPO = Path(__file__).resolve().parents[1]
MUTATING = {"RequestSpotInstances", "RunInstances", "CreateTags", "CancelSpotInstanceRequests",
            "TerminateInstances", "DeleteTags"}


def up(path, *extra) -> int:
    return main(["up", str(path), "--ec2-only", *extra])


def live(ec2_env, tag_key="ddtest"):
    """(role, type) of every live instance, and the open/active requests, from EC2 itself."""
    client = ec2_env.client()
    instances = [i for r in client.describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
        for i in r["Instances"]]
    requests = client.describe_spot_instance_requests(
        Filters=[{"Name": "tag-key", "Values": [tag_key]}])["SpotInstanceRequests"]
    roles = sorted(({t["Key"]: t["Value"] for t in i.get("Tags", [])}.get(tag_key, "untagged"),
                    i["InstanceType"]) for i in instances)
    return roles, [r for r in requests if r["State"] in ("open", "active")
                   and r.get("InstanceId") in {i["InstanceId"] for i in instances}]


def converge_ec2(path) -> None:
    """Passes until EC2 has nothing left to do (the nodes still wait for bootstrap)."""
    for _ in range(4):
        report = json.loads(_json_up(path))
        if not [a for a in report["plan"] if a["action"] in
                ("Launch", "TagInstances", "CancelRequests", "Terminate")]:
            return
    raise AssertionError("EC2 side did not settle in 4 passes")


def _json_up(path) -> str:
    code, out, err = cli("up", str(path), "--ec2-only", "--json")
    assert code == 10, out + err
    return out


def test_empty_account_to_master_and_three_slaves(ec2_env, write_config, calls):
    path = write_config()
    assert up(path) == 10
    assert calls.count("RequestSpotInstances") == 2  # master, then one call for 3 slaves
    converge_ec2(path)
    roles, requests = live(ec2_env)
    assert roles == [("master", "m5.large")] + [("slave", "m5.large")] * 3
    assert len(requests) == 4
    every = ec2_env.client().describe_spot_instance_requests()["SpotInstanceRequests"]
    request_tags = [{t["Key"]: t["Value"] for t in r.get("Tags", [])} for r in every]
    assert sorted((t.get("ddtest"), t.get("disposabledisco:group")) for t in request_tags) == [
        ("master", "master")] + [("slave", "m5.large")] * 3


def test_scale_three_five_one_zero(ec2_env, write_config):
    for count in (3, 5, 1, 0):
        path = write_config(NUM_SLAVES=count)
        converge_ec2(path)
        roles, _ = live(ec2_env)
        assert roles.count(("slave", "m5.large")) == count, (count, roles)
        assert roles.count(("master", "m5.large")) == 1


def test_two_slave_groups_of_different_types(ec2_env, write_config, calls):
    path = write_config(NUM_SLAVES=None, SLAVE_GROUPS=[
        {"INSTANCE_TYPE": "m5.large", "COUNT": 2},
        {"INSTANCE_TYPE": "c5.xlarge", "COUNT": 3, "MAX_BID": "0.25", "MULTIPLIER": 2}])
    converge_ec2(path)
    roles, _ = live(ec2_env)
    assert roles == sorted([("master", "m5.large")] + [("slave", "m5.large")] * 2
                           + [("slave", "c5.xlarge")] * 3)
    assert calls.count("RequestSpotInstances") == 3
    bids = {r["LaunchSpecification"]["InstanceType"]: r["SpotPrice"] for r in
            ec2_env.client().describe_spot_instance_requests()["SpotInstanceRequests"]}
    assert float(bids["c5.xlarge"]) == 0.25


def test_on_demand_master_is_tagged_in_the_creating_call(ec2_env, write_config, calls):
    path = write_config(MASTER_MARKET="on-demand", NUM_SLAVES=1)
    up(path)
    assert calls.count("RunInstances") == 1
    client = ec2_env.client()
    masters = client.describe_instances(Filters=[
        {"Name": "tag:ddtest", "Values": ["master"]}])["Reservations"]
    assert len(masters) == 1 and "InstanceLifecycle" not in masters[0]["Instances"][0]


def test_down_leaves_nothing_open_or_running(ec2_env, write_config):
    path = write_config()
    converge_ec2(path)
    assert main(["down", str(path), "--yes"]) == 0
    roles, requests = live(ec2_env)
    assert roles == [] and requests == []
    states = {r["State"] for r in
              ec2_env.client().describe_spot_instance_requests()["SpotInstanceRequests"]}
    assert not states & {"open", "active"}
    assert main(["down", str(path), "--yes"]) == 0  # nothing left: still fine


def test_down_without_yes_and_without_a_terminal_changes_nothing(ec2_env, write_config, calls,
                                                                 monkeypatch):
    path = write_config()
    converge_ec2(path)
    calls.clear()
    with open(os.devnull) as no_terminal:
        monkeypatch.setattr(sys, "stdin", no_terminal)
        assert main(["down", str(path)]) == 2
    assert not MUTATING & set(calls)
    assert len(live(ec2_env)[0]) == 4


def test_dry_run_changes_nothing(ec2_env, write_config, calls, capsys):
    path = write_config(NUM_SLAVES=2)
    converge_ec2(path)
    before = live(ec2_env)
    calls.clear()
    write_config(NUM_SLAVES=4)
    assert up(path, "--dry-run") == 10
    assert main(["down", str(path), "--dry-run"]) == 10
    assert not MUTATING & set(calls), calls
    assert live(ec2_env) == before
    out = capsys.readouterr().out
    assert "would bid" in out and "would cancel" in out


def test_steady_pass_makes_two_reads_and_no_writes(ec2_env, write_config, calls):
    path = write_config()
    converge_ec2(path)
    calls.clear()
    up(path)
    assert sorted(calls) == ["DescribeInstances", "DescribeSpotInstanceRequests"]


def test_endpoint_from_the_standard_environment_variable(ec2_env, write_config):
    path = write_config(ENDPOINT_URL=None)
    assert os.environ["AWS_ENDPOINT_URL_EC2"] == ec2_env.url
    assert main(["status", str(path)]) == 10


def test_status_table_and_json(ec2_env, write_config, capsys):
    path = write_config(NUM_SLAVES=1)
    converge_ec2(path)
    capsys.readouterr()
    main(["status", str(path)])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["ROLE", "INSTANCE", "TYPE", "STATE", "ADDRESS",
                                             "PRICE", "READY"]
    assert "waiting for bootstrap" in table and "127.10.0." in table
    main(["status", str(path), "--json"])
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert sorted(n["role"] for n in nodes) == ["master", "slave"]


def test_second_run_exits_75_while_the_lock_is_held(ec2_env, write_config, calls):
    path = write_config()
    with cluster_lock(load_config(path).state_dir):
        started = time.monotonic()
        run = subprocess.run([sys.executable, str(REPO / "create_cluster.py"), str(path),
                              "--ec2-only"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 75, run.stderr
    assert "holds the lock" in run.stderr
    assert time.monotonic() - started < 30
    assert calls == []


def test_two_concurrent_real_runs(ec2_env, write_config):
    """One `up --wait` holds the lock while it waits; a second real run exits 75 at once."""
    path = write_config(NUM_SLAVES=1)
    command = [sys.executable, str(REPO / "create_cluster.py"), str(path), "--ec2-only"]
    first = subprocess.Popen([*command, "--wait", "--timeout", "60"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wanted = [("master", "m5.large"), ("slave", "m5.large")]
    try:
        lock = load_config(path).state_dir / "lock"
        deadline = time.monotonic() + 30
        # ec2-only never converges: the first run keeps the lock until its timeout
        while not (lock.exists() and lock.read_text().strip() and live(ec2_env)[0] == wanted):
            assert time.monotonic() < deadline and first.poll() is None, first.poll()
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode == 75, second.stderr
        assert first.poll() is None  # the lock was really held by a running `up`
    finally:
        first.kill()
        first.wait()
    roles, requests = live(ec2_env)
    assert roles == wanted  # what the first run launched, and nothing from the second
    every = ec2_env.client().describe_spot_instance_requests()["SpotInstanceRequests"]
    assert len(every) == len(requests) == 2  # one bid each, never a duplicate


def test_create_config_output_validates(tmp_path):
    made = subprocess.run([sys.executable, str(REPO / "create_config.py")], capture_output=True,
                          text=True, timeout=60, check=True)
    config = json.loads(made.stdout)
    assert "$schema" in config
    path = tmp_path / "config.json"
    path.write_text(made.stdout)
    assert main(["validate", str(path)]) == 0


def test_original_2012_config_validates():
    assert main(["validate", str(REPO / "tests" / "configs" / "original_2012.json")]) == 0
