"""The planner: a pure diff of the config and the observed cluster into ordered actions.

No I/O happens here, so every decision (what to bid for, what to cancel, which slave to
give up first) is a table-testable function of its inputs.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from .cluster import (
    TAG_BOOTSTRAP,
    TAG_DISCO_RESTART,
    TAG_FAILURES,
    TAG_HOSTS,
    TAG_UNREACHABLE,
    Cluster,
    Node,
    joined_master,
)
from .config import Config, GroupSpec, plural, usd
from .disco import membership_digest
from .pools import CAPACITY_CODES, Park, Pool, clock_text, in_force


@dataclass(frozen=True)
class Action:
    """One step of a pass. `reason` says why, in words a user reads in the report."""

    reason: str

    @property
    def mutates_ec2(self) -> bool:
        return True

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class TagInstances(Action):
    instance_ids: tuple[str, ...]
    role: str
    group: str

    def describe(self) -> str:
        ids = ", ".join(self.instance_ids)
        return f"tag {plural(len(self.instance_ids), f'{self.role} instance')} {ids}"


@dataclass(frozen=True)
class CancelRequests(Action):
    request_ids: tuple[str, ...]

    def describe(self) -> str:
        noun = "spot request" if len(self.request_ids) == 1 else "spot requests"
        return f"cancel {noun} {', '.join(self.request_ids)}"


@dataclass(frozen=True)
class Terminate(Action):
    instance_ids: tuple[str, ...]

    def describe(self) -> str:
        return f"terminate {', '.join(self.instance_ids)}"


@dataclass(frozen=True)
class Launch(Action):
    """Create `count` instances of a group: a spot request, or on-demand instances."""

    role: str
    group: str
    instance_type: str
    count: int
    market: str
    bid: float | None
    key: str  # see launch_key; the ClientToken is looked up from it when applied
    #: the capacity pools it may use: one for a spot request or on-demand launch, every
    #: unparked (type, place) of the group for a fleet; () = instance_type, as configured
    pools: tuple[Pool, ...] = ()

    def describe(self) -> str:
        what = f"bid {usd(self.bid or 0.0)} USD/h for" if self.market == "spot" \
            else "launch on-demand"
        types = " | ".join(dict.fromkeys(t for t, _ in self.pools)) or self.instance_type
        places = ", ".join(dict.fromkeys(p for _, p in self.pools if p))
        return f"{what} {self.count} × {types}{f' in {places}' if places else ''} ({self.role})"


@dataclass(frozen=True)
class NodeAction(Action):
    """Work on the machines themselves (SSH), not on EC2."""

    @property
    def mutates_ec2(self) -> bool:
        return False


@dataclass(frozen=True)
class Bootstrap(NodeAction):
    instance_ids: tuple[str, ...]

    def describe(self) -> str:
        return f"bootstrap {', '.join(self.instance_ids)}"


@dataclass(frozen=True)
class Join(NodeAction):
    master_id: str
    slave_ids: tuple[str, ...]

    def describe(self) -> str:
        return f"join {', '.join(self.slave_ids)} to master {self.master_id}"


@dataclass(frozen=True)
class ApplyMembership(NodeAction):
    """Hosts files and Disco's host table on the master, for the given members.

    With `leaving_ids` it is a drain: those slaves leave Disco's live table before their
    instances are terminated, `member_ids` being exactly what stays in it. A drain changes
    the table only (never Disco's settings, never a restart) and runs whatever the
    master's bootstrap digest, since Disco keeps running with its table meanwhile.
    """

    master_id: str
    member_ids: tuple[str, ...]
    leaving_ids: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"update host table on {self.master_id}: {plural(len(self.member_ids), 'host')}"
        return text + (f", without {', '.join(self.leaving_ids)}" if self.leaving_ids else "")


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    problems: tuple[str, ...] = ()
    #: what waits without being a failure (every pool of a group parked), for the report
    notes: tuple[str, ...] = ()
    #: pools to park (→ EC2's status code): open requests stuck in a capacity status
    parks: tuple[tuple[Pool, str], ...] = ()

    @property
    def ec2_actions(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.mutates_ec2)


def launch_key(tag_key: str, group: GroupSpec, count: int, market: str,
               cluster: Cluster, pools: tuple[Pool, ...] = ()) -> str:
    """The identity of a launch decision: the group, the count and what this pass saw.

    A pass that crashes after a create and runs again before EC2 lists the new request sees
    the same cluster and so makes the same decision with the same key; `tokens` maps it to
    the ClientToken sent the first time, and EC2 answers with the original request instead
    of bidding twice. Any change in what exists gives a new key.
    """
    seen = sorted(n.key for n in cluster.of(group.role, group.name))
    text = "|".join([tag_key, group.role, group.name, *group.choices, str(count), market,
                     *seen, *(f"{t}@{p}" for t, p in pools)])
    return hashlib.sha256(text.encode()).hexdigest()[:40]


MAX_NODE_FAILURES = 3


@dataclass
class _Draft:
    """The plan being assembled: EC2 steps collected per kind, then put in order."""

    config: Config
    cluster: Cluster
    now: datetime
    tags: list[Action] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    terminates: list[str] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    leaving: list[Node] = field(default_factory=list)
    parked: dict[Pool, Park] = field(default_factory=dict)  # in force now
    notes: list[str] = field(default_factory=list)
    parks: dict[Pool, str] = field(default_factory=dict)

    def remove(self, node: Node) -> None:
        """Give a node up: cancel its request first (a persistent one would relaunch)."""
        self.leaving.append(node)
        if node.request_id and node.request_state in ("open", "active"):
            self.cancels.append(node.request_id)
        if node.has_instance:
            self.terminates.append(node.instance_id)


def plan(config: Config, cluster: Cluster, now: datetime,
         parked: Mapping[Pool, Park] | None = None) -> Plan:
    """Everything one pass should do, in the order it must run; launches avoid the
    `parked` pools still in force at `now` (see pools.py)."""
    draft = _Draft(config, cluster, now, parked=in_force((parked or {}).values(), now))
    _tag_untagged(cluster, draft.tags)
    _clean_up_dead(cluster, draft.cancels, draft.terminates)
    _give_up_stuck_bids(draft)
    for node in cluster.nodes:  # a master that never works is replaced too; slaves re-join
        if node.state in ("running", "ready") and unresponsive(config, node, now):
            draft.remove(node)
    groups = [config.master, *config.slave_groups]
    groups += [GroupSpec("slave", name, name, 0, None, 1, "spot") for name in
               sorted(cluster.groups("slave") - {g.name for g in config.slave_groups})]
    for group in groups:
        _size_group(draft, group)
    _keep_to_budget(draft)
    actions: list[Action] = list(draft.tags)
    master = cluster.master
    if master in draft.leaving:
        master = None
    drain = _drain(cluster, master, draft.leaving)
    if drain:
        actions.append(drain)
    if draft.cancels:
        actions.append(CancelRequests("cancel before terminating or re-bidding",
                                      tuple(dict.fromkeys(draft.cancels))))
    if draft.terminates:
        actions.append(Terminate("not wanted, lost or unresponsive",
                                 tuple(dict.fromkeys(draft.terminates))))
    actions.extend(draft.launches)
    node_work = _node_work(cluster, master, draft.leaving, multipliers(config))
    if drain and len(node_work) == 1 and isinstance(node_work[0], ApplyMembership) and \
            node_work[0].member_ids == drain.member_ids:
        node_work = []  # the removal above already writes this very table
    actions.extend(node_work)
    return Plan(tuple(actions), tuple(draft.problems), tuple(draft.notes),
                tuple(draft.parks.items()))


def node_pool(config: Config, node: Node) -> Pool:
    """The capacity pool a node was asked for in, named as `Config.places` names places."""
    place = (node.subnet_id if config["SUBNET_ID"] else
             node.zone if config["AVAILABILITY_ZONE"] else "") or ""
    return (node.instance_type, place)


def _give_up_stuck_bids(draft: _Draft) -> None:
    """An open bid that EC2 holds in a capacity status waits for nothing: cancel it and
    park its pool, so this pass bids elsewhere (only while CAPACITY_PARK_MINUTES is on;
    else it waits out SPOT_OPEN_TIMEOUT_MINUTES as any open bid). One found only after
    that timeout parks its pool too."""
    minutes = draft.config.get("CAPACITY_PARK_MINUTES") or 0
    if minutes <= 0:
        return
    for node in draft.cluster.nodes:
        if node.request_state != "open" or node.status_code not in CAPACITY_CODES:
            continue
        if node.is_live:  # else open too long: _clean_up_dead cancels it already
            draft.remove(node)
        pool = node_pool(draft.config, node)
        draft.parks[pool] = node.status_code
        draft.parked[pool] = Park(pool, draft.now + timedelta(minutes=minutes),
                                  node.status_code)


def unresponsive(config: Config, node: Node, now: datetime) -> bool:
    """Failed its node work too often, or has been failing for UNRESPONSIVE_MINUTES."""
    try:
        failures = int(node.tags.get(TAG_FAILURES, "0"))
    except ValueError:
        failures = 0
    if failures >= MAX_NODE_FAILURES:
        return True
    since = node.tags.get(TAG_UNREACHABLE)
    if not since:
        return False
    try:
        first = datetime.fromisoformat(since)
    except ValueError:
        return False
    if first.tzinfo is None:  # a hand-edited tag without offset: UTC, never a crash
        first = first.replace(tzinfo=timezone.utc)
    return now - first >= timedelta(minutes=config["UNRESPONSIVE_MINUTES"])


def hourly_cost(config: Config, node: Node) -> float:
    """What a node may cost per hour: its bid, else its group's MAX_BID as the estimate."""
    if node.bid:
        return node.bid
    group = next((g for g in config.groups if g.name == node.group), None)
    return (group.max_bid or 0.0) if group else 0.0


def _keep_to_budget(draft: _Draft) -> None:
    """Trim launches so live nodes plus new ones stay within MAX_HOURLY_COST (master first)."""
    budget = draft.config["MAX_HOURLY_COST"]
    if budget is None:
        return
    spent = sum(hourly_cost(draft.config, n) for n in draft.cluster.nodes
                if n.is_live and n not in draft.leaving)
    kept: list[Launch] = []
    for launch in draft.launches:
        price = launch.bid if launch.bid is not None else _group_bid(draft.config, launch)
        affordable = launch.count if price <= 0 else min(
            launch.count, int((budget - spent + 1e-9) // price))
        if affordable < launch.count:
            draft.problems.append(
                f"MAX_HOURLY_COST {usd(budget)} USD/h allows {max(affordable, 0)} of the "
                f"{plural(launch.count, f'{launch.group} {launch.role}')} wanted (live nodes "
                f"cost {usd(spent)} USD/h, {usd(price)} each): raise MAX_HOURLY_COST or lower "
                "the count")
        if affordable > 0:
            kept.append(replace(launch, count=affordable, key=launch_key(
                draft.config.tag_key, _group_of(draft.config, launch), affordable,
                launch.market, draft.cluster, launch.pools)))
            spent += affordable * price
    draft.launches[:] = kept


def _group_of(config: Config, launch: Launch) -> GroupSpec:
    return next(g for g in config.groups if g.name == launch.group and g.role == launch.role)


def _group_bid(config: Config, launch: Launch) -> float:
    return _group_of(config, launch).max_bid or 0.0


def plan_down(cluster: Cluster) -> Plan:
    """Teardown: cancel every request first (a persistent one would relaunch), then terminate.

    Built from `cluster.nodes` only, so it names nothing in `cluster.foreign`: `down` never
    cancels or terminates what is not ours.
    """
    requests = tuple(n.request_id for n in cluster.nodes
                     if n.request_id and n.request_state in ("open", "active"))
    instances = tuple(n.instance_id for n in cluster.nodes if n.has_instance)
    actions: list[Action] = []
    if requests:
        actions.append(CancelRequests("down: cancel every open or active request", requests))
    if instances:
        actions.append(Terminate("down: terminate every instance", instances))
    return Plan(tuple(actions))


def _ids(nodes: list[Node]) -> tuple[str, ...]:
    return tuple(n.instance_id for n in nodes if n.instance_id)


def _in_disco_table(node: Node, master: Node) -> bool:
    """Whether Disco on `master` may have `node` in its live host table: a slave whose
    instance runs and that joined this master, whatever its bootstrap digest (a changed
    setting makes every node "running" again while Disco keeps running with its table)."""
    return (node.role == "slave" and node.instance_state == "running"
            and joined_master(node) == master.instance_id)


def _drain(cluster: Cluster, master: Node | None,
           leaving: list[Node]) -> ApplyMembership | None:
    """The table without the leaving slaves, before they are terminated (a terminated host
    left in Disco's table loses the tasks it runs only once Disco gives up on it).

    Needed when the kept master's instance runs and has applied a table (TAG_HOSTS) that
    may name a leaving slave; its readiness does not matter. What stays is the master and
    every staying slave that may be in the table: a staying slave left out would lose its
    running tasks too."""
    if master is None or master.instance_state != "running" or TAG_HOSTS not in master.tags:
        return None
    drained = [n for n in leaving if _in_disco_table(n, master)]
    if not drained:
        return None
    staying = [n for n in cluster.nodes if n.is_live and n not in leaving
               and _in_disco_table(n, master)]
    return ApplyMembership("remove leaving slaves from Disco before terminating them",
                           master.instance_id, _ids([master, *staying]), _ids(drained))


def _tag_untagged(cluster: Cluster, out: list[Action]) -> None:
    """Instances launched by a spot request carry no tags until we put them there."""
    pending: dict[tuple[str, str], list[str]] = {}
    for node in cluster.nodes:
        if node.has_instance and not node.instance_tagged:
            pending.setdefault((node.role, node.group), []).append(node.instance_id)
    for (role, group), ids in sorted(pending.items()):
        out.append(TagInstances("fulfilled spot instance carries no cluster tag yet",
                                tuple(ids), role, group))


def _clean_up_dead(cluster: Cluster, cancels: list[str], terminates: list[str]) -> None:
    """Requests and instances that count for nothing but could still cost or relaunch."""
    for node in cluster.nodes:
        if node.is_live:
            continue
        if node.request_id and node.request_state == "open":
            cancels.append(node.request_id)  # open too long: cancel, then bid again
        elif node.request_id and node.request_state == "active" and not node.has_instance:
            cancels.append(node.request_id)  # its instance died; never let it relaunch
        if node.instance_state in ("stopping", "stopped"):
            if node.request_id and node.request_state in ("open", "active"):
                cancels.append(node.request_id)
            terminates.append(node.instance_id)


def _blocked(config: Config, cluster: Cluster, group: GroupSpec) -> str | None:
    """A failed bid with the same parameters would fail again: stop bidding, say why."""
    for node in cluster.of(group.role, group.name):
        failed = node.request_state == "failed" or node.status_code == "bad-parameters"
        if failed and node.image_id == config["AMI"] and node.instance_type == group.instance_type:
            return (f"EC2 rejected the {group.role} bid {node.request_id} for "
                    f"{group.instance_type} as bad-parameters: check AMI, INSTANCE_TYPE, "
                    f"KEY_NAME, SECURITY_GROUPS and SUBNET_ID; no new bids until they change")
    return None


def _size_group(draft: _Draft, group: GroupSpec) -> None:
    config, cluster = draft.config, draft.cluster
    live = [n for n in cluster.live(group.role, group.name) if n not in draft.leaving]
    if len(live) > group.count:
        for node in _removal_order(live)[: len(live) - group.count]:
            draft.remove(node)
        return
    missing = group.count - len(live)
    if missing <= 0:
        return
    blocked = _blocked(config, cluster, group)
    if blocked:
        draft.problems.append(blocked)
        return
    fallback = 0
    if group.market == "spot" and config["SPOT_FALLBACK"] == "on-demand":
        stale = [n for n in cluster.of(group.role, group.name)
                 if n.request_state == "open" and not n.is_live]
        fallback = min(missing, len(stale))
    for market, count in (("on-demand", fallback), (group.market, missing - fallback)):
        if count <= 0:
            continue
        why = ("no master" if group.role == "master"
               else f"{len(live)} of {plural(group.count, f'{group.name} slave')} live")
        if market == "on-demand" and group.market == "spot":
            why += f"; spot bids open over {config['SPOT_OPEN_TIMEOUT_MINUTES']} min, " \
                   "falling back to on-demand"
        for pools, share in _placements(draft, group, market, count, live):
            draft.launches.append(Launch(
                why, group.role, group.name, pools[0][0], share, market,
                group.max_bid if market == "spot" else None,
                launch_key(config.tag_key, group, share, market, cluster, pools), pools))


def _placements(draft: _Draft, group: GroupSpec, market: str, count: int,
                live: list[Node]) -> list[tuple[tuple[Pool, ...], int]]:
    """Where `count` new nodes of a group go: (pools, how many) per launch.

    A fleet gets every unparked (type, place) of the group in one launch and EC2 picks;
    a spot request or on-demand launch names one place, so the count is spread over the
    unparked places, those with the fewest of the group's live nodes first. When every
    pool is parked nothing is launched and a note says until when.
    """
    config = draft.config
    fleet = market == "spot" and config.get("LAUNCH_API") == "fleet"
    types = group.choices if fleet else (group.instance_type,)
    pools = [(t, p) for t in types for p in config.places]
    free = [p for p in pools if p not in draft.parked]
    if not free:
        parks = sorted((draft.parked[p] for p in pools), key=lambda k: (k.until, k.pool))
        who = "master" if group.role == "master" else f"{group.name} slave"
        draft.notes.append(
            f"no {who} launched: every pool it may use is parked after "
            f"a capacity error ({'; '.join(p.text() for p in parks)}); the next pass after "
            f"{clock_text(parks[0].until)} tries again (CAPACITY_PARK_MINUTES 0 retries now)")
        return []
    if fleet:
        return [(tuple(free), count)]
    load = Counter(node_pool(config, n)[1] for n in live)
    shares: Counter[Pool] = Counter()
    for _ in range(count):
        pool = min(free, key=lambda p: (load[p[1]] + shares[p], free.index(p)))
        shares[pool] += 1
    return [((pool,), shares[pool]) for pool in free if shares[pool]]


def _removal_order(live: list[Node]) -> list[Node]:
    """Give up open bids first, then nodes not ready yet, then the newest ready ones."""
    def rank(node: Node) -> tuple:
        age = node.age_reference.timestamp() if node.age_reference else float("inf")
        return ({"open": 0, "pending": 1, "running": 1, "ready": 2}[node.state], -age, node.key)
    return sorted(live, key=rank)


def multipliers(config: Config) -> dict[str, int]:
    """Worker multiplier per group name, as the host table digest needs them."""
    return {g.name: g.multiplier for g in (config.master, *config.slave_groups)}


def _node_work(cluster: Cluster, master: Node | None, leaving: list[Node],
               group_multipliers: dict[str, int]) -> list[Action]:
    """Bootstrap what is running but not done, join slaves to the master, sync membership."""
    staying = [n for n in cluster.nodes if n.is_live and n not in leaving]
    running = [n for n in staying if n.state == "running"]
    actions: list[Action] = []
    to_bootstrap = [n for n in running if n.tags.get(TAG_BOOTSTRAP) is None
                    or n.reason == "waiting for bootstrap"]
    if to_bootstrap:
        actions.append(Bootstrap("running but not bootstrapped with the current config",
                                 _ids(to_bootstrap)))
    if master is None or master.state not in ("running", "ready"):
        return actions
    slaves = [n for n in staying if n.role == "slave" and n.state in ("running", "ready")]
    to_join = [n for n in slaves if not cluster.desired.joined(n, master.instance_id)]
    if to_join:
        actions.append(Join("slave not yet joined to this master", master.instance_id,
                            _ids(to_join)))
    ready = [n for n in slaves if n.state == "ready"]
    if actions or master.state != "ready" or \
            master.tags.get(TAG_HOSTS) != membership_digest(master, ready, group_multipliers):
        actions.append(ApplyMembership("membership changed or not applied yet",
                                       master.instance_id, _ids([master, *slaves])))
    elif TAG_DISCO_RESTART in master.tags:
        actions.append(ApplyMembership(
            "Disco's settings changed while a job ran: restart it once no job is active",
            master.instance_id, _ids([master, *slaves])))
    return actions
