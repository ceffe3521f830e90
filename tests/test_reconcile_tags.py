"""Tag calls per pass against the moto server: the same for 1 slave as for 20.

The real EC2 gateway over HTTP (CreateTags counted by the endpoint itself, the `calls`
fixture), the node side as the in-process worker of test_reconcile_unit (every step
works), and real pins in STATE_DIR so each slave's join record names its own key.
"""

from __future__ import annotations

from collections import Counter

import pytest

from disposabledisco import reconcile
from disposabledisco.config import load_config
from disposabledisco.ec2 import Ec2Gateway
from disposabledisco.hostkeys import HostKeyStore
from disposabledisco.joins import JoinBook
from tests.test_reconcile_unit import FakeWorker, host_key


class PinningWorker(FakeWorker):
    """Every step works; bootstrap pins each node's key, as the first SSH contact does."""

    def __init__(self, store: HostKeyStore) -> None:
        super().__init__()
        self.store = store

    def bootstrap(self, nodes):
        for node in nodes:
            self.store.pin(node.instance_id, host_key(int(node.instance_id[2:], 16)))
        return super().bootstrap(nodes)


def create_tags_per_pass(path, calls) -> list[int]:
    """CreateTags of each pass until one is converged; that pass must do nothing at all."""
    config = load_config(path)
    gateway, worker = Ec2Gateway(config), PinningWorker(HostKeyStore(config.state_dir))
    passes: list[Counter] = []
    for _ in range(4):
        calls.clear()
        worker.calls.clear()
        report = reconcile.run_pass(config, gateway, worker)
        passes.append(Counter(calls))
        if report.converged:
            assert worker.calls == [] and set(calls) <= {"DescribeSpotInstanceRequests",
                                                         "DescribeInstances"}, calls
            slaves = {n.instance_id for n in report.cluster.nodes if n.role == "slave"}
            pins = reconcile.pin_digests(config, slaves)
            assert set(JoinBook(config.state_dir).read().values()) == {
                f"{report.cluster.master.instance_id}#{pins[i]}" for i in slaves}
            return [p["CreateTags"] for p in passes]
    raise AssertionError(f"not converged in 4 passes: {passes}")


@pytest.mark.parametrize("launch_api", ["spot-requests", "fleet"])
def test_joining_1_or_20_slaves_in_one_pass_costs_the_same_create_tags(
        ec2_env, write_config, calls, launch_api, tmp_path):
    figures = {}
    for slaves in (1, 20):  # one account, two clusters (each sees only its TAG_KEY)
        path = write_config(NUM_SLAVES=slaves, LAUNCH_API=launch_api,
                            TAG_KEY=f"ddtags{slaves}", STATE_DIR=str(tmp_path / str(slaves)))
        figures[slaves] = create_tags_per_pass(path, calls)
    # launch; tag new instances (role + group: one call per role, none with "fleet",
    # which tags in CreateFleet), bootstrap (one per role), joined, hosts; converged
    tagging = 2 if launch_api == "spot-requests" else 0
    assert figures[1] == figures[20] == [0, tagging + 4, 0], figures
