"""The observed cluster: spot requests and instances joined into nodes.

EC2 gives two views of one machine (the spot request and the instance it launched) that
disagree in known ways: real EC2 links them from the instance side
(`SpotInstanceRequestId`), some endpoints only from the request side (`InstanceId`), a
cancelled request may still have a running instance, and an instance may outlive its
request record. This module joins both views into one `Node` per machine (or per open
bid) so the planner never has to care.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

TAG_GROUP = "disposabledisco:group"
TAG_BOOTSTRAP = "disposabledisco:bootstrap"
TAG_JOINED = "disposabledisco:joined"
TAG_HOSTS = "disposabledisco:hosts"
TAG_FAILURES = "disposabledisco:failures"
TAG_UNREACHABLE = "disposabledisco:unreachable-since"

ROLES = ("master", "slave")
LIVE_INSTANCE_STATES = ("pending", "running")
OPEN_REQUEST_STATES = ("open",)
ENDED_REQUEST_STATES = ("closed", "cancelled", "failed")


@dataclass(frozen=True)
class Desired:
    """What 'done' means for a node this pass: the bootstrap hash per role and the master."""

    bootstrap: Mapping[str, str] = field(default_factory=dict)
    open_timeout: timedelta = timedelta(minutes=10)
    join_suffix: str = ""  # changes when what a join installs changes (a local tarball)
    pins: Mapping[str, str] = field(default_factory=dict)  # instance id → host key digest

    def join_tag(self, master_id: str, slave_id: str) -> str:
        """The `joined` tag of a slave joined to this master with today's inputs.

        It names the slave's pinned host key too: the master's known_hosts is written
        at join, so a re-pinned slave (its key forgotten and seen anew) must join again.
        """
        return join_tag(master_id, self.join_suffix, self.pins.get(slave_id))


def join_tag(master_id: str, suffix: str, pin: str | None) -> str:
    return f"{master_id}{suffix}#{pin or 'unpinned'}"


@dataclass(frozen=True)
class Node:
    """One machine of the cluster, or one bid for a machine that does not exist yet."""

    role: str
    group: str
    instance_type: str
    market: str = "spot"
    request_id: str | None = None
    request_state: str | None = None
    request_type: str | None = None
    status_code: str | None = None
    bid: float | None = None
    image_id: str | None = None
    created: datetime | None = None
    instance_id: str | None = None
    instance_state: str | None = None
    launched: datetime | None = None
    private_ip: str | None = None
    public_ip: str | None = None
    private_dns: str | None = None
    public_dns: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    instance_tagged: bool = False
    state: str = "gone"
    reason: str = ""

    @property
    def key(self) -> str:
        """A stable identity: the instance id once there is one, else the request id."""
        return self.instance_id or self.request_id or "?"

    @property
    def is_live(self) -> bool:
        """Counts towards the desired size: it exists, or is a bid still worth waiting for."""
        return self.state in ("open", "pending", "running", "ready")

    @property
    def has_instance(self) -> bool:
        return self.instance_id is not None and self.instance_state in (
            "pending", "running", "stopping", "stopped")

    @property
    def age_reference(self) -> datetime | None:
        return self.launched or self.created


def ssh_address(node: Node, setting: str) -> str | None:
    """The address to reach a node over SSH, per `SSH_ADDRESS`."""
    if setting == "auto":
        return node.public_ip or node.public_dns or node.private_ip
    return getattr(node, setting, None) or None


@dataclass(frozen=True)
class Cluster:
    """Every node found by the cluster's tag key, with queries the planner needs."""

    nodes: tuple[Node, ...]
    desired: Desired = field(default_factory=Desired)

    def of(self, role: str, group: str | None = None) -> list[Node]:
        return [n for n in self.nodes
                if n.role == role and (group is None or n.group == group)]

    def live(self, role: str, group: str | None = None) -> list[Node]:
        return [n for n in self.of(role, group) if n.is_live]

    @property
    def master(self) -> Node | None:
        """The live master that the planner keeps (the most advanced, then the oldest)."""
        masters = sorted(self.live("master"), key=keep_order)
        return masters[0] if masters else None

    def groups(self, role: str) -> set[str]:
        return {n.group for n in self.of(role)}


STATE_RANK = {"ready": 0, "running": 1, "pending": 2, "open": 3, "gone": 4}


def keep_order(node: Node) -> tuple:
    """Sort key: nodes worth keeping first (ready before running …; older before newer)."""
    age = node.age_reference.timestamp() if node.age_reference else float("inf")
    return (STATE_RANK.get(node.state, 9), age, node.key)


def build_cluster(requests: Iterable[Mapping], instances: Iterable[Mapping], tag_key: str,
                  desired: Desired, now: datetime) -> Cluster:
    """Join raw EC2 descriptions (boto3 shapes) into nodes."""
    by_id = {i["InstanceId"]: i for i in instances}
    request_of_instance = {i["InstanceId"]: i.get("SpotInstanceRequestId") for i in by_id.values()}
    nodes: list[Node] = []
    claimed: set[str] = set()
    for request in requests:
        instance_id = request.get("InstanceId") or next(
            (iid for iid, rid in request_of_instance.items()
             if rid == request["SpotInstanceRequestId"]), None)
        instance = by_id.get(instance_id) if instance_id else None
        if instance_id:
            claimed.add(instance_id)
        nodes.append(_node(tag_key, desired, now, request, instance, instance_id))
    for instance_id, instance in by_id.items():
        if instance_id not in claimed:
            nodes.append(_node(tag_key, desired, now, None, instance, instance_id))
    return _require_join(Cluster(tuple(nodes), desired))


def _require_join(cluster: Cluster) -> Cluster:
    """A bootstrapped slave is ready only once it is joined to the master that is kept."""
    master = cluster.master
    master_id = master.instance_id if master and master.state == "ready" else None
    nodes = []
    for node in cluster.nodes:
        if node.role == "slave" and node.state == "ready" and (
                master_id is None
                or node.tags.get(TAG_JOINED) != cluster.desired.join_tag(
                    master_id, node.instance_id)):
            reason = "waiting to join the master" if master_id else "waiting for the master"
            node = replace(node, state="running", reason=reason)
        nodes.append(node)
    return Cluster(tuple(nodes), cluster.desired)


def _tags(resource: Mapping | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in (resource or {}).get("Tags", [])}


def _node(tag_key: str, desired: Desired, now: datetime, request: Mapping | None,
          instance: Mapping | None, instance_id: str | None) -> Node:
    request_tags = _tags(request)
    instance_tags = _tags(instance)
    tags = {**request_tags, **instance_tags}
    role = tags.get(tag_key, "slave")
    spec = (request or {}).get("LaunchSpecification", {})
    instance_type = (instance or {}).get("InstanceType") or spec.get("InstanceType", "")
    group = tags.get(TAG_GROUP) or ("master" if role == "master" else instance_type)
    status = (request or {}).get("Status", {})
    bid = (request or {}).get("SpotPrice")
    fields = dict(
        role=role, group=group, instance_type=instance_type,
        market="spot" if request or (instance or {}).get("InstanceLifecycle") == "spot"
        else "on-demand",
        request_id=(request or {}).get("SpotInstanceRequestId"),
        request_state=(request or {}).get("State"),
        request_type=(request or {}).get("Type"),
        status_code=status.get("Code"),
        bid=float(bid) if bid else None,
        image_id=spec.get("ImageId") or (instance or {}).get("ImageId"),
        created=(request or {}).get("CreateTime"),
        instance_id=instance_id,
        instance_state=(instance or {}).get("State", {}).get("Name") if instance else None,
        launched=(instance or {}).get("LaunchTime"),
        private_ip=(instance or {}).get("PrivateIpAddress"),
        public_ip=(instance or {}).get("PublicIpAddress"),
        private_dns=(instance or {}).get("PrivateDnsName") or None,
        public_dns=(instance or {}).get("PublicDnsName") or None,
        tags=tags,
        instance_tagged=bool(instance) and tag_key in instance_tags
        and TAG_GROUP in instance_tags,
    )
    state, reason = _state(fields, request, instance, desired, now)
    return Node(**fields, state=state, reason=reason)


def _state(fields: dict, request: Mapping | None, instance: Mapping | None,
           desired: Desired, now: datetime) -> tuple[str, str]:
    """Derive (state, reason): open, pending, running, ready or gone."""
    if fields["instance_id"] and instance is None:
        if fields["request_state"] == "active":
            # Fulfilled but not visible yet (eventual consistency), or already purged.
            return "pending", "instance not visible yet"
        return "gone", f"request {fields['request_state']} ({fields['status_code']})"
    if instance is not None:
        name = fields["instance_state"]
        if name == "pending":
            return "pending", "instance starting"
        if name == "running":
            wanted = desired.bootstrap.get(fields["role"])
            if wanted and fields["tags"].get(TAG_BOOTSTRAP) == wanted and fields["instance_tagged"]:
                return "ready", "bootstrapped"
            return "running", "waiting for bootstrap"
        return "gone", f"instance {name}"
    state = fields["request_state"]
    if state == "open":
        created = fields["created"]
        if created and now - created > desired.open_timeout:
            return "gone", f"open too long ({fields['status_code']})"
        return "open", fields["status_code"] or "pending-evaluation"
    if state == "failed" or fields["status_code"] == "bad-parameters":
        return "gone", f"request failed ({fields['status_code']})"
    return "gone", f"request {state} ({fields['status_code']})"
