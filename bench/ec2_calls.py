"""EC2 API calls per pass: disposabledisco against the 2012 tool's call pattern.

Runs both against the same local EC2 endpoint (moto over HTTP on 127.0.0.1) and counts
every API call with a botocore `before-call` hook. For each cluster size it measures the
passes that launch the cluster (bids + tagging of fulfilled instances) and one pass over
the converged cluster. Node work (SSH) is switched off here: its results live in instance
tags, which this script sets directly, the way the node phase records them.

    python bench/ec2_calls.py [--sizes 10 100 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disposabledisco.cluster import TAG_BOOTSTRAP, TAG_HOSTS, TAG_JOINED  # noqa: E402
from disposabledisco.config import parse_config  # noqa: E402
from disposabledisco.disco import membership_digest  # noqa: E402
from disposabledisco.ec2 import Ec2Gateway  # noqa: E402
from disposabledisco.plan import multipliers  # noqa: E402
from disposabledisco.reconcile import observe, run_pass  # noqa: E402
from disposabledisco.sandbox.endpoint import LocalEc2  # noqa: E402


def counted(client) -> Counter:
    calls: Counter = Counter()
    client.meta.events.register("before-call.ec2.*",
                                lambda model, **_: calls.update([model.name]))
    return calls


def make_config(endpoint: LocalEc2, network: dict, slaves: int, state_dir: str):
    return parse_config({
        "AMI": network["image_id"], "KEY_NAME": network["key_name"],
        "SECURITY_GROUPS": [network["security_group_id"]], "SUBNET_ID": network["subnet_id"],
        "ENDPOINT_URL": endpoint.url, "REGION": endpoint.region, "TAG_KEY": "bench",
        "NUM_SLAVES": slaves, "STATE_DIR": state_dir, "MGMT_KEY": ""})


def mark_converged(config, admin) -> None:
    """Record the node phase as done in tags, as the SSH side would after bootstrapping."""
    cluster = observe(config, Ec2Gateway(config, client=admin))
    digests = cluster.desired.bootstrap
    master = cluster.master
    slaves = [n for n in cluster.nodes if n.role == "slave" and n.is_live]
    admin.create_tags(Resources=[master.instance_id],
                      Tags=[{"Key": TAG_BOOTSTRAP, "Value": digests["master"]}])
    joined = cluster.desired.join_tag(master.instance_id, "")  # no SSH here: nothing pinned
    for start in range(0, len(slaves), 500):
        admin.create_tags(Resources=[n.instance_id for n in slaves[start:start + 500]],
                          Tags=[{"Key": TAG_BOOTSTRAP, "Value": digests["slave"]},
                                {"Key": TAG_JOINED, "Value": joined}])
    digest = membership_digest(master, slaves, multipliers(config))
    admin.create_tags(Resources=[master.instance_id], Tags=[{"Key": TAG_HOSTS, "Value": digest}])


def ours(endpoint: LocalEc2, network: dict, slaves: int, state_dir: str) -> dict[str, int]:
    config = make_config(endpoint, network, slaves, state_dir)
    client = endpoint.client()
    calls = counted(client)
    gateway = Ec2Gateway(config, client=client)
    launch: Counter = Counter()
    for _ in range(3):  # bid, then tag what was fulfilled, then nothing left to do on EC2
        calls.clear()
        report = run_pass(config, gateway, None)
        if not any(a.mutates_ec2 for a in report.plan.actions):
            break
        launch.update(calls)
    mark_converged(config, endpoint.client())
    calls.clear()
    report = run_pass(config, gateway, None)
    assert report.converged, [a.describe() for a in report.plan.actions]
    return {"launch": sum(launch.values()), "steady": sum(calls.values()),
            "creates": launch["RequestSpotInstances"] + launch["RunInstances"],
            "tags": launch["CreateTags"]}


def original(endpoint: LocalEc2, network: dict, slaves: int) -> dict[str, int]:
    """The 2012 tool: one request + one tag call per node; one describe per request."""
    client = endpoint.client()
    calls = counted(client)
    spec = {"ImageId": network["image_id"], "InstanceType": "m5.large",
            "KeyName": network["key_name"], "SubnetId": network["subnet_id"]}
    ids = []
    for role in ["master"] + ["slave"] * slaves:
        answer = client.request_spot_instances(SpotPrice="0.10", InstanceCount=1,
                                               LaunchSpecification=spec)
        request_id = answer["SpotInstanceRequests"][0]["SpotInstanceRequestId"]
        client.create_tags(Resources=[request_id], Tags=[{"Key": "orig", "Value": role}])
        ids.append(request_id)
    launch = sum(calls.values())
    calls.clear()
    client.describe_spot_instance_requests(Filters=[{"Name": "tag-key", "Values": ["orig"]}])
    for request_id in ids:
        client.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])
    return {"launch": launch, "steady": sum(calls.values()), "creates": len(ids),
            "tags": len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    rows = []
    with LocalEc2() as endpoint, tempfile.TemporaryDirectory() as state_dir:
        for size in args.sizes:
            endpoint.reset()
            network = endpoint.setup_loopback_network(cidr="127.20.0.0/16",
                                                      subnet="127.20.0.0/20")
            mine = ours(endpoint, network, size, state_dir)
            endpoint.reset()
            network = endpoint.setup_loopback_network(cidr="127.20.0.0/16",
                                                      subnet="127.20.0.0/20")
            theirs = original(endpoint, network, size)
            rows.append((size, mine, theirs))
    print("| slaves | launch: all calls | launch: create calls | launch: tag calls "
          "| steady-state pass | steady-state ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, mine, theirs in rows:
        cells = [f"{mine[k]} / {theirs[k]}" for k in ("launch", "creates", "tags", "steady")]
        print(f"| {size} | {' | '.join(cells)} | {theirs['steady'] / mine['steady']:.0f}× fewer |")
    print("\n(each cell: disposabledisco / the 2012 tool's call pattern)")


if __name__ == "__main__":
    main()
