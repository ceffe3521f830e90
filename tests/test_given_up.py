"""A node that stops answering is given up once per pass (real sshd nodes).

The SSH gateway remembers, until the next pass begins, which nodes it gave up on: a
connect that reached its deadline, a session that died under a command, a node cut off by
its per-node deadline. Later steps of the same pass fail such a node at once (GivenUp)
with no new connection attempt, instead of spending another SSH_DEADLINE_SECONDS on it,
and the pass counts its failure once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from disposabledisco import reconcile
from disposabledisco.cluster import TAG_FAILURES
from disposabledisco.config import load_config
from disposabledisco.ec2 import Ec2Gateway
from disposabledisco.plan import ApplyMembership, Join
from disposabledisco.provision import Provisioner, make_provisioner
from disposabledisco.sandbox.nodes import Node as FarmNode
from disposabledisco.sandbox.nodes import NodeFarm
from disposabledisco.ssh import ConnectionLost, GivenUp, SshGateway, Target, Unreachable
from tests.e2e_fixtures import E2eEnv, terminate_cluster

pytestmark = pytest.mark.nodes


def target(node: FarmNode) -> Target:
    return Target(node.instance_id, node.address)


def test_a_node_that_stops_answering_costs_one_deadline_per_pass(
        node_farm: NodeFarm, start_nodes: Callable[..., list[FarmNode]],
        ssh_gateway_factory: Callable[..., SshGateway]) -> None:
    [node] = start_nodes(1)
    gateway = ssh_gateway_factory(deadline_seconds=2.0, connect_timeout=1.0)
    with gateway.connect(target(node)) as session:
        assert session.run("true").ok
    node_farm.kill_sshd(node.instance_id)

    began = time.monotonic()
    with pytest.raises(Unreachable) as first:
        gateway.connect(target(node))
    assert time.monotonic() - began >= 1.9  # the one deadline of this pass
    assert not isinstance(first.value, GivenUp)
    attempts = gateway.connect_attempts

    for _ in range(3):  # later steps of the same pass: no attempt, no wait
        began = time.monotonic()
        with pytest.raises(GivenUp, match="given up earlier in this pass"):
            gateway.connect(target(node))
        assert time.monotonic() - began < 0.2
    outcomes = gateway.run_parallel([target(node)], lambda s: s.run("true"))
    assert outcomes[node.instance_id].given_up and not outcomes[node.instance_id].ok
    assert gateway.connect_attempts == attempts
    assert "no SSH session within 2 s" in gateway.given_up()[node.instance_id]

    gateway.begin_pass()  # the next pass tries it again
    node_farm.restart_sshd(node.instance_id)
    with gateway.connect(target(node)) as session:
        assert session.run("true").ok
    assert gateway.connect_attempts > attempts and gateway.given_up() == {}


def test_a_node_that_dies_under_a_command_is_given_up_the_others_are_not(
        node_farm: NodeFarm, start_nodes: Callable[..., list[FarmNode]],
        ssh_gateway_factory: Callable[..., SshGateway]) -> None:
    dying, alive = start_nodes(2)
    gateway = ssh_gateway_factory(deadline_seconds=2.0, connect_timeout=1.0)
    threading.Timer(1.0, node_farm.kill_sshd, [dying.instance_id]).start()
    outcomes = gateway.run_parallel(
        [target(dying), target(alive)],
        lambda s: s.run("sleep 30" if s.target.instance_id == dying.instance_id else "true"))
    assert isinstance(outcomes[dying.instance_id].exception, ConnectionLost)
    assert outcomes[alive.instance_id].ok
    assert set(gateway.given_up()) == {dying.instance_id}

    attempts = gateway.connect_attempts
    again = gateway.run_parallel([target(dying), target(alive)], lambda s: s.run("true"))
    assert again[dying.instance_id].given_up and again[alive.instance_id].ok
    assert gateway.connect_attempts == attempts + 1  # only the live node was dialled


def test_a_node_cut_by_its_per_node_deadline_is_given_up(
        start_nodes: Callable[..., list[FarmNode]],
        ssh_gateway_factory: Callable[..., SshGateway]) -> None:
    [node] = start_nodes(1)
    gateway = ssh_gateway_factory()
    outcomes = gateway.run_parallel([target(node)], lambda s: s.run("sleep 30"), timeout=1.5)
    assert "per-node deadline" in outcomes[node.instance_id].error
    assert "per-node deadline" in gateway.given_up()[node.instance_id]


class _KillMasterBeforeJoin:
    """The pass's provisioner, with the master's sshd killed right before the join step
    (the master dies mid-pass, after its bootstrap); records what each step cost."""

    def __init__(self, inner: Provisioner, farm: NodeFarm) -> None:
        self.inner = inner
        self.farm = farm
        self.steps: dict[str, tuple[float, int]] = {}  # step -> (seconds, connect attempts)

    def _timed(self, step: str, call: Callable[[], Any]) -> Any:
        attempts, began = self.inner.ssh.connect_attempts, time.monotonic()
        try:
            return call()
        finally:
            self.steps[step] = (time.monotonic() - began,
                                self.inner.ssh.connect_attempts - attempts)

    def begin_pass(self) -> None:
        self.inner.begin_pass()

    def bootstrap(self, nodes: list[Any]) -> Any:
        return self.inner.bootstrap(nodes)

    def join(self, master: Any, slaves: list[Any]) -> Any:
        self.farm.kill_sshd(master.instance_id)
        return self._timed("join", lambda: self.inner.join(master, slaves))

    def apply_membership(self, master: Any, members: list[Any], drain: bool = False) -> Any:
        return self._timed("membership",
                           lambda: self.inner.apply_membership(master, members, drain=drain))

    def idle_probe(self, master: Any) -> str:
        return self.inner.idle_probe(master)


def test_a_master_dying_mid_pass_is_waited_for_once_and_counted_once(e2e: E2eEnv) -> None:
    cfg = e2e.new_config("givenup", 1, SSH_DEADLINE_SECONDS=5)
    config = load_config(cfg())
    ec2 = Ec2Gateway(config)
    worker = _KillMasterBeforeJoin(make_provisioner(config, ec2), e2e.farm)
    try:
        deadline = time.monotonic() + 120
        while "join" not in worker.steps and time.monotonic() < deadline:
            report = reconcile.run_pass(config, ec2, worker)
            time.sleep(0.5)
        assert "join" in worker.steps, "the pass never reached the join step"
        join_seconds, join_attempts = worker.steps["join"]
        member_seconds, member_attempts = worker.steps["membership"]
        assert join_seconds >= 4.9 and join_attempts > 1  # one full deadline, retried
        assert member_seconds < 1.0 and member_attempts == 0  # given up: not dialled again

        results = {type(r.action): r for r in report.results}
        master_id = results[Join].action.master_id
        assert not results[Join].ok and not results[ApplyMembership].ok
        assert "given up earlier in this pass" in results[ApplyMembership].detail
        tags = {t["Key"]: t["Value"] for r in e2e.client.describe_instances(
            InstanceIds=[master_id])["Reservations"] for i in r["Instances"]
            for t in i.get("Tags", [])}
        assert tags[TAG_FAILURES] == "1"  # failed in two steps, counted once
    finally:
        terminate_cluster(e2e.client, cfg.tag_key)
