"""One reconcile pass: observe EC2 → plan → apply → report.

Each action is applied on its own: one that fails is reported and the rest of the pass
still runs. Node work (SSH) follows the EC2 actions and its results are recorded in
instance tags, which is how the next pass knows a node is done without opening SSH.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from . import bootstrap, idle
from .cluster import (
    TAG_BOOTSTRAP,
    TAG_DISCO_RESTART,
    TAG_FAILURES,
    TAG_GROUP,
    TAG_HOSTS,
    TAG_JOINED,
    TAG_UNREACHABLE,
    Cluster,
    Desired,
    Node,
    build_cluster,
    is_joined,
    join_record,
    join_tag,
    ownership,
)
from .config import Config, plural
from .disco import membership_digest
from .ec2 import AwsError, Ec2Gateway, NoCapacity
from .hostkeys import HostKeyStore
from .joins import JoinBook
from .plan import (
    Action,
    ApplyMembership,
    Bootstrap,
    CancelRequests,
    Join,
    Launch,
    Plan,
    TagInstances,
    Terminate,
    multipliers,
    plan,
    plan_down,
)
from .pools import ParkBook, Pool, clock_text, pool_text
from .ssh import SshError, fault_of
from .tokens import TokenBook

EXIT_CONVERGED = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_PROGRESSING = 10
EXIT_LOCKED = 75


class NodeOutcome(Protocol):
    ok: bool
    error: str | None
    log_tail: str | None
    #: "node", "config", "hostkey" or "tamper" (ssh.FAULTS); only "node" counts toward replacement
    fault: str


class NodeWorker(Protocol):
    """What the pass needs from the SSH side (see provision.Provisioner)."""

    def bootstrap(self, nodes: list[Node]) -> dict[str, NodeOutcome]: ...

    def join(self, master: Node, slaves: list[Node]) -> dict[str, NodeOutcome]: ...

    def apply_membership(self, master: Node, members: list[Node],
                         drain: bool = False) -> NodeOutcome: ...

    def idle_probe(self, master: Node) -> str: ...

    def begin_pass(self) -> None:
        """Called first in every pass: a worker that remembers which nodes it gave up on
        forgets them here (provision.Provisioner)."""


@dataclass
class ActionResult:
    action: Action
    ok: bool
    detail: str = ""
    skipped: bool = False
    node_errors: dict[str, str] = field(default_factory=dict)
    #: instance id → fault class (ssh.FAULTS) of each failed node
    faults: dict[str, str] = field(default_factory=dict)

    @property
    def needs_the_operator(self) -> bool:
        """A node failed for a reason another pass will not fix by itself (the config, a
        changed host key, something planted): waiting for the next pass is pointless."""
        return any(f != "node" for f in self.faults.values())


@dataclass
class PassReport:
    """What one pass saw, planned and did."""

    cluster: Cluster
    plan: Plan
    results: list[ActionResult]
    dry_run: bool = False
    desired_slaves: int = 0
    #: 0 while the cluster sleeps after an idle "down" (see idle.py)
    desired_masters: int = 1

    @property
    def failed(self) -> bool:
        return bool(self.plan.problems) or any(not r.ok for r in self.results)

    @property
    def did_something(self) -> bool:
        return any(r.ok and not r.skipped for r in self.results)

    @property
    def converged(self) -> bool:
        """Nothing to do, and exactly the desired nodes are live and ready."""
        live = [n for n in self.cluster.nodes if n.is_live]
        slaves = [n for n in live if n.role == "slave"]
        masters = [n for n in live if n.role == "master"]
        work = [r for r in self.results if not r.skipped] if not self.dry_run else \
            list(self.plan.actions)
        return (not self.failed and not work and len(masters) == self.desired_masters
                and len(slaves) == self.desired_slaves
                and all(n.state == "ready" for n in live))

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        return EXIT_CONVERGED if self.converged else EXIT_PROGRESSING


def desired_state(config: Config, instance_ids: Iterable[str] = ()) -> Desired:
    """What 'done' means this pass; reads a local DISCO_TARBALL or DISCO_SOURCE, the
    pinned host keys and the join records."""
    suffix = ""
    if bootstrap.local_tarball(config) is not None:
        suffix = "@" + bootstrap.tarball_sha256(config)[:16]
    elif config["DISCO_INSTALL"] == "source":  # slaves get the tree built from this source
        suffix = "@" + bootstrap.source_identity(config)[:16]
    return Desired(bootstrap={role: bootstrap.digest(config, role) for role in
                              ("master", "slave")},
                   open_timeout=timedelta(minutes=config["SPOT_OPEN_TIMEOUT_MINUTES"]),
                   join_suffix=suffix, pins=pin_digests(config, instance_ids),
                   joins=JoinBook(config.state_dir).read())


def pin_digests(config: Config, instance_ids: Iterable[str]) -> dict[str, str]:
    """A short digest of each instance's pinned host key (instances never reached: none)."""
    pinned = HostKeyStore(config.state_dir).pinned(instance_ids)
    return {i: hashlib.sha256(key.line().encode()).hexdigest()[:12] for i, key in pinned.items()}


def observe(config: Config, ec2: Ec2Gateway, now: datetime | None = None) -> Cluster:
    seen = ec2.observe()
    ours = ownership(seen.requests, seen.instances, config.tag_key).instances
    desired = desired_state(config, sorted(ours))
    return build_cluster(seen.requests, seen.instances, config.tag_key, desired,
                         now or datetime.now(timezone.utc))


def run_pass(config: Config, ec2: Ec2Gateway, nodes: NodeWorker | None, *,
             dry_run: bool = False, down: bool = False,
             now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> PassReport:
    """Observe, plan and (unless dry_run) apply one pass."""
    moment = now()
    if nodes is not None:
        nodes.begin_pass()
    cluster = observe(config, ec2, moment)
    notes: list[ActionResult] = []
    asleep = False
    if not down:
        config, asleep, notes = _idle_check(config, cluster, nodes, moment, dry_run)
    down = down or asleep
    parks = ParkBook(config.state_dir)
    minutes = config["CAPACITY_PARK_MINUTES"]
    the_plan = plan_down(cluster) if down else plan(
        config, cluster, moment, parks.parked(moment) if minutes else None)
    if not dry_run:
        parks.park(dict(the_plan.parks), moment, minutes)
    report = PassReport(cluster, the_plan, notes, dry_run,
                        0 if down else sum(g.count for g in config.slave_groups),
                        0 if asleep else 1)
    if dry_run:
        return report
    applier = _Applier(config, ec2, nodes, cluster, moment)
    for action in the_plan.actions:
        report.results.append(applier.apply(action))
    return report


def _idle_check(config: Config, cluster: Cluster, nodes: NodeWorker | None, moment: datetime,
                dry_run: bool) -> tuple[Config, bool, list[ActionResult]]:
    """IDLE_MINUTES: the config this pass plans with (slaves at zero while asleep), whether
    the whole cluster must go (an idle "down"), and what to say. Opens SSH only when
    IDLE_MINUTES is set, the cluster is awake and its master is ready."""
    minutes = config["IDLE_MINUTES"]
    sleep = idle.read_sleep(config)
    if sleep is not None and (minutes is None or sleep.slaves != config.desired_slaves):
        if not dry_run:
            idle.clear_sleep(config)
        why = ("IDLE_MINUTES is null" if minutes is None else
               f"the slave count changed from {sleep.slaves} to {config.desired_slaves}")
        return config, False, [_note(f"idle: awake again ({why})")]
    if minutes is None:
        return config, False, []
    if sleep is None:
        master = cluster.master
        if nodes is None or dry_run or master is None or master.state != "ready":
            return config, False, []
        try:
            verdict = idle.judge(nodes.idle_probe(master), minutes)
        except (SshError, ValueError) as error:
            verdict = idle.Verdict(False, "", f"idle check skipped: master "
                                             f"{master.instance_id}: {error}"[:300])
        if not verdict.idle:
            return config, False, [_note(verdict.warning)] if verdict.warning else []
        sleep = idle.Sleep(config["IDLE_ACTION"], config.desired_slaves,
                           moment.isoformat(timespec="seconds"))
        idle.write_sleep(config, sleep)
        what = ("terminating the whole cluster" if sleep.action == "down"
                else "terminating the slaves, keeping the master")
        text = (f"idle: {verdict.note}, IDLE_MINUTES is {minutes}: {what}; change the "
                f"slave count (now {sleep.slaves}) to bring it back")
    else:
        text = "idle: " + idle.wake_text(sleep)
    if sleep.action == "down":
        return config, True, [_note(text)]
    return idle.zero_slaves(config), False, [_note(text)]


def _note(text: str) -> ActionResult:
    """A line in the pass's results that is not a step (skipped: never counts as work)."""
    return ActionResult(idle.IdleNote("idle shutdown", text), True, skipped=True)


class _Applier:
    """Applies actions in order, tracking which nodes got done during this pass."""

    def __init__(self, config: Config, ec2: Ec2Gateway, nodes: NodeWorker | None,
                 cluster: Cluster, now: datetime) -> None:
        self.config = config
        self.now = now
        self.tokens = TokenBook(config.state_dir)
        self.ec2 = ec2
        self.nodes = nodes
        self.by_id = {n.instance_id: n for n in cluster.nodes if n.instance_id}
        desired = cluster.desired.bootstrap
        self.bootstrapped = {i for i, n in self.by_id.items()
                             if n.tags.get(TAG_BOOTSTRAP) == desired.get(n.role)}
        self.joined = {i: n.tags.get(TAG_JOINED) for i, n in self.by_id.items()}
        self.join_records = dict(cluster.desired.joins)
        self.settings_changed: set[str] = set()
        #: nodes whose failure was counted in this pass (a node failing in two steps,
        #: e.g. given up in one and skipped in the next, counts once)
        self.counted: set[str] = set()
        self.digests = desired
        self.join_suffix = cluster.desired.join_suffix

    def apply(self, action: Action) -> ActionResult:
        handler = getattr(self, "_" + type(action).__name__)
        try:
            return handler(action)
        except AwsError as error:
            return ActionResult(action, False, str(error))

    # -- EC2 ---------------------------------------------------------------------------

    def _TagInstances(self, action: TagInstances) -> ActionResult:
        self.ec2.tag(list(action.instance_ids),
                     {self.config.tag_key: action.role, TAG_GROUP: action.group})
        return ActionResult(action, True)

    def _CancelRequests(self, action: CancelRequests) -> ActionResult:
        self.ec2.cancel(list(action.request_ids))
        return ActionResult(action, True)

    def _Terminate(self, action: Terminate) -> ActionResult:
        self.ec2.terminate(list(action.instance_ids))
        return ActionResult(action, True)

    def _Launch(self, action: Launch) -> ActionResult:
        """A capacity error is no failure: its pools are parked and the next pass launches
        elsewhere (skipped: nothing was made)."""
        try:
            launched = self.ec2.launch(action.role, action.group, action.instance_type,
                                       action.count, action.market, action.bid,
                                       self.tokens.token_for(action.key, self.now),
                                       action.pools)
        except NoCapacity as error:
            advice = f" ({error.advice})" if error.advice else ""
            return ActionResult(action, True, f"EC2 {error.code}: {self._park(error.pools)}"
                                f"{advice}", skipped=True)
        parked = f"; {self._park(launched.full)}" if launched.full else ""
        return ActionResult(action, True, ", ".join(launched.ids) + parked)

    def _park(self, pools: dict[Pool, str]) -> str:
        """Park full pools; what to tell the user about it."""
        minutes = self.config["CAPACITY_PARK_MINUTES"]
        parked = ParkBook(self.config.state_dir).park(pools, self.now, minutes)
        names = ", ".join(pool_text(p) for p in pools)
        if not parked:
            return f"no capacity in {names} (CAPACITY_PARK_MINUTES is 0: not parked)"
        return (f"no capacity in {names}: parked until {clock_text(parked[0].until)}; the "
                "next pass launches elsewhere")

    # -- nodes -------------------------------------------------------------------------

    def _no_ssh(self, action: Action) -> ActionResult | None:
        if self.nodes is None:
            return ActionResult(action, True, "node work is off for this pass", skipped=True)
        return None

    def _Bootstrap(self, action: Bootstrap) -> ActionResult:
        if (skip := self._no_ssh(action)) is not None:
            return skip
        targets = [self.by_id[i] for i in action.instance_ids]
        outcomes = self.nodes.bootstrap(targets)
        self._record_failures(outcomes)
        done = [i for i, o in outcomes.items() if o.ok]
        for role in ("master", "slave"):
            ids = [i for i in done if self.by_id[i].role == role]
            if ids:
                self.ec2.tag(ids, {TAG_BOOTSTRAP: self.digests[role]})
        self.bootstrapped.update(done)
        # provision.Stamp.settings_changed: the node wrote new Disco settings
        self.settings_changed.update(i for i in done if getattr(
            getattr(outcomes[i], "value", None), "settings_changed", False))
        return self._node_result(action, outcomes)

    def _Join(self, action: Join) -> ActionResult:
        if (skip := self._no_ssh(action)) is not None:
            return skip
        if action.master_id not in self.bootstrapped:
            return ActionResult(action, True, "master not bootstrapped yet", skipped=True)
        slaves = [self.by_id[i] for i in action.slave_ids if i in self.bootstrapped]
        if not slaves:
            return ActionResult(action, True, "no bootstrapped slave to join", skipped=True)
        try:
            outcomes = self.nodes.join(self.by_id[action.master_id], slaves)
        except (SshError, ValueError) as error:  # the master failed, not the slaves
            failed = {action.master_id: _Failed(str(error), fault=fault_of(error))}
            self._record_failures(failed)
            return self._node_result(action, failed, f"master {action.master_id}: {error}")
        self._record_failures(outcomes)
        done = [i for i, o in outcomes.items() if o.ok]
        if done:
            self._record_joins(action.master_id, done)
        return self._node_result(action, outcomes)

    def _record_joins(self, master_id: str, done: list[str]) -> None:
        """Each slave's pinned key goes to the join book first, then one shared tag value
        to every slave that lacks it: one CreateTags call however many joined."""
        pins = pin_digests(self.config, done)  # as they are now: this pass may have pinned
        records = {i: join_record(master_id, self.join_suffix, pins.get(i)) for i in done}
        JoinBook(self.config.state_dir).record(records, self.by_id)
        self.join_records.update(records)
        value = join_tag(master_id, self.join_suffix)
        untagged = [i for i in done if self.joined.get(i) != value]
        if untagged:
            self.ec2.tag(untagged, {TAG_JOINED: value})
        self.joined.update(dict.fromkeys(done, value))

    def _joined_to(self, master_id: str, slave_ids: list[str]) -> list[str]:
        """Those of these slaves joined to this master, with the pins as they are now
        (this pass may just have pinned them): one pin lookup for all of them."""
        pins = pin_digests(self.config, slave_ids)
        return [i for i in slave_ids if is_joined(self.joined.get(i), self.join_records.get(i),
                                                  master_id, self.join_suffix, pins.get(i))]

    def _record_failures(self, outcomes: dict[str, NodeOutcome]) -> None:
        """Count failures in tags, so a node that never works is replaced after a while.

        Only the node's own faults count (``fault == "node"``): the failure counter and
        the unreachable-since time are left as they are for a host-key refusal (possible
        man in the middle: the node and its evidence stay until the operator acts) and
        for the config's faults (a fresh node would fail the same, so replacing burns
        nodes). Those fail the pass (exit 1) every time instead. A node that works again
        loses both tags, so an old failure never counts against it later. Nodes given the
        same values share one CreateTags call (those failing for the first time all do).
        """
        recovered = [i for i, o in outcomes.items() if o.ok and (
            {TAG_FAILURES, TAG_UNREACHABLE} & set(self.by_id[i].tags))]
        if recovered:
            self.ec2.untag(recovered, [TAG_FAILURES, TAG_UNREACHABLE])
            for instance_id in recovered:
                node = self.by_id[instance_id]
                self.by_id[instance_id] = replace(node, tags={
                    k: v for k, v in node.tags.items()
                    if k not in (TAG_FAILURES, TAG_UNREACHABLE)})
        counted: dict[str, dict[str, str]] = {}
        for instance_id, outcome in outcomes.items():
            if outcome.ok or getattr(outcome, "fault", "node") != "node" \
                    or instance_id in self.counted:
                continue
            self.counted.add(instance_id)
            node = self.by_id[instance_id]
            try:
                failures = int(node.tags.get(TAG_FAILURES, "0")) + 1
            except ValueError:
                failures = 1
            since = node.tags.get(TAG_UNREACHABLE) or self.now.isoformat()
            counted[instance_id] = {TAG_FAILURES: str(failures), TAG_UNREACHABLE: since}
        for ids, tags in shared_values(counted):
            self.ec2.tag(ids, tags)
            for instance_id in ids:
                node = self.by_id[instance_id]
                self.by_id[instance_id] = replace(node, tags={**node.tags, **tags})

    def _node_result(self, action: Action, outcomes: dict[str, Any],
                     detail: str = "") -> ActionResult:
        """The result of node work: each failed node's explanation and fault class."""
        failed = {i: o for i, o in outcomes.items() if not o.ok}
        done = len(outcomes) - len(failed)
        return ActionResult(action, not failed, detail or f"{done} of {len(outcomes)} done",
                            node_errors={i: self._explain(i, o) for i, o in failed.items()},
                            faults={i: getattr(o, "fault", "node") for i, o in failed.items()})

    def _explain(self, instance_id: str, outcome: Any) -> str:
        """The failure for the report: what the operator must do when it is not the
        node's fault (nothing is replaced for it), then the node log's last lines."""
        fault = getattr(outcome, "fault", "node")
        if fault == "hostkey":
            first = (f"{outcome.error or 'host key refused'} — {instance_id} is kept and "
                     f"never replaced for this; if it was really rebuilt, forget its pinned "
                     f"host key: {forget_command(self.config, instance_id)}")
        elif fault == "tamper":
            first = (f"{outcome.error or 'refused'} — {instance_id} is kept for inspection "
                     f"and never replaced for this")
        elif fault == "config":
            first = (f"{outcome.error or 'failed'} — the config's fault: fix the config; "
                     f"{instance_id} is not counted as failing for it")
        else:
            first = outcome.error or "failed"
        return "\n".join([first, *(getattr(outcome, "log_tail", None) or ())])

    def _ApplyMembership(self, action: ApplyMembership) -> ActionResult:
        if (skip := self._no_ssh(action)) is not None:
            return skip
        master = self.by_id[action.master_id]
        drain = bool(action.leaving_ids)
        if drain:  # the planner named what stays in Disco's table, bootstrapped or not
            slaves = [self.by_id[i] for i in action.member_ids if i != action.master_id]
        elif action.master_id not in self.bootstrapped:
            return ActionResult(action, True, "master not bootstrapped yet", skipped=True)
        else:
            slaves = [self.by_id[i] for i in self._joined_to(action.master_id, [
                i for i in action.member_ids
                if i != action.master_id and i in self.bootstrapped])]
        digest = membership_digest(master, slaves, multipliers(self.config))
        # A master whose bootstrap in this pass wrote new settings (replica counts, ...)
        # has a running Disco that has not read them, and one whose restart waited for a
        # job still has to restart: the step runs (a drain never restarts anything).
        restart_due = action.master_id in self.settings_changed or \
            TAG_DISCO_RESTART in master.tags
        if master.tags.get(TAG_HOSTS) == digest and (drain or not restart_due):
            return ActionResult(action, True, "host table already current", skipped=True)
        outcome = self.nodes.apply_membership(master, [master, *slaves], drain=drain)
        self._record_failures({action.master_id: outcome})
        if not outcome.ok:
            return self._node_result(action, {action.master_id: outcome},
                                     outcome.error or "failed")
        self.ec2.tag([action.master_id], {TAG_HOSTS: digest})
        master = self.by_id[action.master_id] = _with_tag(master, TAG_HOSTS, digest)
        # what the master said besides (provision.AppliedTable): a restart of Disco, or
        # one that waits for running jobs (the next pass tries again: progressing)
        applied = getattr(outcome, "value", None)
        if not drain:
            self._mark_restart(master, bool(getattr(applied, "restart_pending", False)))
        note = getattr(applied, "note", "")
        return ActionResult(action, True, plural(1 + len(slaves), "host")
                            + (f"; {note}" if note else ""))

    def _mark_restart(self, master: Node, pending: bool) -> None:
        """Tag the master while its Disco's restart waits for jobs, so the next pass
        plans the step again; untag it once Disco restarted."""
        marked = TAG_DISCO_RESTART in master.tags
        if pending and not marked:
            since = self.now.isoformat(timespec="seconds")
            self.ec2.tag([master.instance_id], {TAG_DISCO_RESTART: since})
            self.by_id[master.instance_id] = _with_tag(master, TAG_DISCO_RESTART, since)
        elif marked and not pending:
            self.ec2.untag([master.instance_id], [TAG_DISCO_RESTART])
            self.by_id[master.instance_id] = replace(master, tags={
                k: v for k, v in master.tags.items() if k != TAG_DISCO_RESTART})


def shared_values(tags_by_id: dict[str, dict[str, str]]) -> list[tuple[list[str], dict[str, str]]]:
    """Instances grouped by identical tags, in first-seen order: one CreateTags per group."""
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for instance_id, tags in tags_by_id.items():
        groups.setdefault(tuple(sorted(tags.items())), []).append(instance_id)
    return [(ids, dict(key)) for key, ids in groups.items()]


def forget_command(config: Config, instance_id: str) -> str:
    """The command line that forgets an instance's pinned host key, ready to paste."""
    path = shlex.quote(str(config.path)) if config.path else "CONFIG"
    return f"disposabledisco forget-host-key {path} {instance_id}"


@dataclass(frozen=True)
class _Failed:
    """A node outcome for a failure that was raised rather than returned."""

    error: str
    ok: bool = False
    log_tail: tuple[str, ...] = ()
    fault: str = "node"


def _with_tag(node: Node, key: str, value: str) -> Node:
    return replace(node, tags={**node.tags, key: value})


