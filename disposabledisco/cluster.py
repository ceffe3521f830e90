"""The observed cluster: spot requests and instances joined into nodes.

EC2 gives two views of one machine (the spot request and the instance it launched) that
disagree in known ways: real EC2 links them from the instance side
(`SpotInstanceRequestId`), some endpoints only from the request side (`InstanceId`), a
cancelled request may still have a running instance, and an instance may outlive its
request record. This module joins both views into one `Node` per machine (or per open
bid) so the planner never has to care.

It is also the cluster's boundary. A resource is ours only when its TAG_KEY value is a role
we create (`master` or `slave`); anything else found under TAG_KEY is listed as foreign and
never becomes a node, so nothing downstream can count, tag, cancel or terminate it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

TAG_GROUP = "disposabledisco:group"
TAG_BOOTSTRAP = "disposabledisco:bootstrap"
TAG_JOINED = "disposabledisco:joined"
TAG_HOSTS = "disposabledisco:hosts"
TAG_FAILURES = "disposabledisco:failures"
TAG_UNREACHABLE = "disposabledisco:unreachable-since"
#: on the master: since when (UTC) a restart of its Disco for new settings waits for jobs
TAG_DISCO_RESTART = "disposabledisco:disco-restart-pending-since"

ROLES = ("master", "slave")
LIVE_INSTANCE_STATES = ("pending", "running")
OPEN_REQUEST_STATES = ("open",)
ENDED_REQUEST_STATES = ("closed", "cancelled", "failed")
#: the reason of a node whose instance EC2 listed with a state we cannot read
STATE_UNKNOWN = "instance state unknown"


@dataclass(frozen=True)
class Desired:
    """What 'done' means for a node this pass: the bootstrap hash per role and the master."""

    bootstrap: Mapping[str, str] = field(default_factory=dict)
    open_timeout: timedelta = timedelta(minutes=10)
    join_suffix: str = ""  # changes when what a join installs changes (a local tarball)
    pins: Mapping[str, str] = field(default_factory=dict)  # instance id → host key digest
    #: instance id → its join record (joins.JoinBook): what its master was last given
    joins: Mapping[str, str] = field(default_factory=dict)

    def joined(self, node: Node, master_id: str) -> bool:
        """Whether this slave is joined to this master with today's inputs and pin."""
        return is_joined(node.tags.get(TAG_JOINED), self.joins.get(node.instance_id or ""),
                         master_id, self.join_suffix, self.pins.get(node.instance_id or ""))


def join_tag(master_id: str, suffix: str) -> str:
    """The shared `joined` tag value: one CreateTags call tags every slave of a join."""
    return f"{master_id}{suffix}"


def join_record(master_id: str, suffix: str, pin: str | None) -> str:
    """What one slave's join gave its master: the shared value plus the slave's pinned key
    (the master's known_hosts is written from it). Kept in STATE_DIR (joins.JoinBook);
    earlier versions wrote it as each slave's tag value, which is why such tags count."""
    return f"{join_tag(master_id, suffix)}#{pin or 'unpinned'}"


def is_joined(tag: str | None, record: str | None, master_id: str, suffix: str,
              pin: str | None) -> bool:
    """A slave is joined when its tag names this master and these inputs and the master was
    given the key pinned for it now: a re-pinned slave (key forgotten and seen anew) joins
    again. The key part is the local record, written only after a join worked and before
    its tag, so a crash between the two never counts a join that did not happen. A tag in
    the older per-slave form (the record itself) still counts: an upgrade re-joins nobody."""
    want = join_record(master_id, suffix, pin)
    return tag == want or (tag == join_tag(master_id, suffix) and record == want)


def joined_master(node: Node) -> str | None:
    """The master a slave last joined, read from its `joined` tag (see `join_tag`; an
    instance id has no '@' or '#'), whatever the join's other inputs were."""
    master_id = node.tags.get(TAG_JOINED, "").split("#", 1)[0].split("@", 1)[0]
    return master_id or None


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
    subnet_id: str | None = None  # where it was asked for or runs (capacity pools, pools.py)
    zone: str | None = None
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
class Foreign:
    """A resource seen under TAG_KEY that is not ours: shown to the user, never touched.

    `kind` is "instance" or "spot request"; `value` is its TAG_KEY value as found (None
    when it has no such tag; not a string: its repr); `reason` says why it is not ours,
    e.g. "dd='webserver' is not master or slave", "no dd tag and no spot request of ours".
    A record too malformed to read is listed here too: reason "malformed record: ...",
    `resource_id` "?" when it has no usable id, `value` None.
    """

    resource_id: str
    kind: str
    value: str | None
    reason: str


@dataclass(frozen=True)
class Cluster:
    """Our nodes, found by the cluster's tag key, and what was seen but is not ours."""

    nodes: tuple[Node, ...]
    desired: Desired = field(default_factory=Desired)
    foreign: tuple[Foreign, ...] = ()

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


@dataclass(frozen=True)
class Ownership:
    """The ids that are ours, by the very test `build_cluster` applies (see `ownership`)."""

    requests: frozenset[str]
    instances: frozenset[str]


def ownership(requests: Iterable[Any], instances: Iterable[Any], tag_key: str) -> Ownership:
    """Which spot requests and instances are ours: the cluster's boundary, in one place.

    - A spot request is ours when its own TAG_KEY value is `master` or `slave`.
    - An instance is judged by its own TAG_KEY tag when it has one: ours only with a role
      value; any other value (`webserver`, `""`, a non-string) makes it foreign even when
      a request of ours launched it (the instance's own tag wins).
    - An instance without a TAG_KEY tag is ours only when it is linked to a request of ours
      (its `SpotInstanceRequestId`, or the request's `InstanceId`): a fulfilled spot
      instance that we have not tagged yet. Without such a link it is foreign.
    - Records that are not mappings or lack a string id are neither (see `build_cluster`).
    """
    judged = _judge(requests, instances, tag_key)
    return Ownership(frozenset(judged.requests), frozenset(judged.instances))


def build_cluster(requests: Iterable[Any], instances: Iterable[Any], tag_key: str,
                  desired: Desired, now: datetime) -> Cluster:
    """Join raw EC2 descriptions (boto3 shapes) into our nodes; list the rest as foreign.

    Only what `ownership` accepts becomes a `Node`; everything else found goes to
    `Cluster.foreign`. A request of ours whose instance is foreign becomes a node without
    that instance: state "gone", reason "its instance <id> is not ours", so the planner
    may cancel the request (which never terminates an instance) and never touches the
    instance. Total by design: a record that is not a mapping or has no string id is listed
    in `foreign` as "malformed record: ..."; a field with a missing, None or odd-typed
    value (state, type, dates, price, tags) is read as unknown; tag entries that are not
    {"Key": str, "Value": ...} are dropped, and non-string values never become node tags;
    of records repeating an id the first counts; naive datetimes (`now` too) are UTC.
    Nothing here raises on data from EC2.
    """
    now = _moment(now) or datetime.now(timezone.utc)
    judged = _judge(requests, instances, tag_key)
    instance_of: dict[str, str] = {}  # request id → an instance naming it
    for instance_id, instance in judged.all_instances.items():
        if instance["request_id"]:
            instance_of.setdefault(instance["request_id"], instance_id)
    theirs = set(judged.all_instances) - set(judged.instances)
    nodes: list[Node] = []
    claimed: set[str] = set()
    for request_id, request in judged.requests.items():
        instance_id = request["instance_id"] or instance_of.get(request_id)
        instance = judged.instances.get(instance_id) if instance_id else None
        if instance_id in theirs:
            nodes.append(_node(tag_key, desired, now, request, None, None,
                               detached=instance_id))
            continue
        if instance_id:
            claimed.add(instance_id)
        nodes.append(_node(tag_key, desired, now, request, instance, instance_id))
    for instance_id, instance in judged.instances.items():
        if instance_id not in claimed:
            nodes.append(_node(tag_key, desired, now, None, instance, instance_id))
    return _require_join(Cluster(tuple(nodes), desired, tuple(judged.foreign)))


@dataclass
class _Judged:
    """Both EC2 views cleaned up (see `_clean_request`/`_clean_instance`) and split."""

    requests: dict[str, dict]  # ours
    instances: dict[str, dict]  # ours
    all_instances: dict[str, dict]
    foreign: list[Foreign]


def _judge(raw_requests: Iterable[Any], raw_instances: Iterable[Any],
           tag_key: str) -> _Judged:
    foreign: list[Foreign] = []
    requests = _clean_all(raw_requests, _clean_request, "spot request", foreign)
    instances = _clean_all(raw_instances, _clean_instance, "instance", foreign)
    ours_requests: dict[str, dict] = {}
    for request_id, request in requests.items():
        request["role"] = _role(request["tags"], tag_key)
        if request["role"]:
            ours_requests[request_id] = request
        else:
            foreign.append(_not_ours(request_id, "spot request", request["tags"], tag_key))
    linked: dict[str, str] = {}  # instance id → the request of ours that launched it
    for request_id, request in ours_requests.items():
        if request["instance_id"]:
            linked.setdefault(request["instance_id"], request_id)
    for instance_id, instance in instances.items():
        if instance["request_id"] in ours_requests:  # the instance's own link wins
            linked[instance_id] = instance["request_id"]
    ours_instances: dict[str, dict] = {}
    for instance_id, instance in instances.items():
        if tag_key in instance["tags"]:
            instance["role"] = _role(instance["tags"], tag_key)
        elif instance_id in linked:
            instance["role"] = ours_requests[linked[instance_id]]["role"]
        else:
            instance["role"] = None
        if instance["role"]:
            ours_instances[instance_id] = instance
        else:
            foreign.append(_not_ours(instance_id, "instance", instance["tags"], tag_key))
    return _Judged(ours_requests, ours_instances, instances, foreign)


def _role(tags: Mapping[str, Any], tag_key: str) -> str | None:
    value = tags.get(tag_key)
    return value if isinstance(value, str) and value in ROLES else None


def _not_ours(resource_id: str, kind: str, tags: Mapping[str, Any], tag_key: str) -> Foreign:
    if tag_key not in tags:
        tail = " and no spot request of ours" if kind == "instance" else ""
        return Foreign(resource_id, kind, None, f"no {tag_key} tag{tail}")
    value = tags[tag_key]
    shown = value if isinstance(value, str) else repr(value)
    return Foreign(resource_id, kind, shown, f"{tag_key}={shown!r} is not master or slave")


def _clean_all(records: Iterable[Any], clean: Any, kind: str,
               foreign: list[Foreign]) -> dict[str, dict]:
    """Clean each record; one that cannot be read at all is listed as foreign, not raised.

    Of records repeating an id the first one counts.
    """
    id_key = "InstanceId" if kind == "instance" else "SpotInstanceRequestId"
    cleaned: dict[str, dict] = {}
    for record in records or ():
        if not isinstance(record, Mapping):
            foreign.append(Foreign("?", kind, None,
                                   f"malformed record: not a mapping ({type(record).__name__})"))
            continue
        record_id = _text(record.get(id_key))
        if record_id is None:
            foreign.append(Foreign("?", kind, None, f"malformed record: no {id_key}"))
            continue
        cleaned.setdefault(record_id, {"id": record_id, "tags": _tag_map(record.get("Tags")),
                                       **clean(record)})
    return cleaned


def _clean_request(raw: Mapping) -> dict:
    """A DescribeSpotInstanceRequests entry's fields we use, typed (unknown: None)."""
    spec = _mapping(raw.get("LaunchSpecification"))
    status = _mapping(raw.get("Status"))
    return {"instance_id": _text(raw.get("InstanceId")), "state": _text(raw.get("State")),
            "type": _text(raw.get("Type")), "status_code": _text(status.get("Code")),
            "bid": _price(raw.get("SpotPrice")),
            "instance_type": _text(spec.get("InstanceType")),
            "image_id": _text(spec.get("ImageId")), "created": _moment(raw.get("CreateTime")),
            "subnet_id": _text(spec.get("SubnetId")),
            "zone": _text(_mapping(spec.get("Placement")).get("AvailabilityZone"))}


def _clean_instance(raw: Mapping) -> dict:
    """A DescribeInstances entry's fields we use, typed (unknown: None)."""
    return {"request_id": _text(raw.get("SpotInstanceRequestId")),
            "state": _text(_mapping(raw.get("State")).get("Name")),
            "instance_type": _text(raw.get("InstanceType")),
            "lifecycle": _text(raw.get("InstanceLifecycle")),
            "image_id": _text(raw.get("ImageId")), "launched": _moment(raw.get("LaunchTime")),
            "subnet_id": _text(raw.get("SubnetId")),
            "zone": _text(_mapping(raw.get("Placement")).get("AvailabilityZone")),
            **{key: _text(raw.get(field)) for key, field in (
                ("private_ip", "PrivateIpAddress"), ("public_ip", "PublicIpAddress"),
                ("private_dns", "PrivateDnsName"), ("public_dns", "PublicDnsName"))}}


def _text(value: Any) -> str | None:
    """A non-empty string, else None (EC2 gives "" for a DNS name it does not have)."""
    return value if isinstance(value, str) and value else None


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _tag_map(value: Any) -> dict[str, Any]:
    """Tags as a dict; entries that are not {"Key": str, ...} are dropped."""
    if not isinstance(value, (list, tuple)):
        return {}
    return {t["Key"]: t.get("Value") for t in value
            if isinstance(t, Mapping) and isinstance(t.get("Key"), str)}


def _price(value: Any) -> float | None:
    """A positive, finite price in USD/h, else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        price = float(value)
    except ValueError:
        return None
    return price if math.isfinite(price) and price > 0 else None


def _moment(value: Any) -> datetime | None:
    """An aware datetime (naive ones are UTC; ISO strings are parsed), else None."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _require_join(cluster: Cluster) -> Cluster:
    """A bootstrapped slave is ready only once it is joined to the master that is kept."""
    master = cluster.master
    master_id = master.instance_id if master and master.state == "ready" else None
    nodes = []
    for node in cluster.nodes:
        if node.role == "slave" and node.state == "ready" and (
                master_id is None
                or not cluster.desired.joined(node, master_id)):
            reason = "waiting to join the master" if master_id else "waiting for the master"
            node = replace(node, state="running", reason=reason)
        nodes.append(node)
    return replace(cluster, nodes=tuple(nodes))


def _node(tag_key: str, desired: Desired, now: datetime, request: dict | None,
          instance: dict | None, instance_id: str | None, detached: str | None = None) -> Node:
    """One node from cleaned records; `detached`: the id of its request's foreign instance."""
    req, inst = request or {}, instance or {}
    instance_tags = {k: v for k, v in inst.get("tags", {}).items() if isinstance(v, str)}
    tags = {**{k: v for k, v in req.get("tags", {}).items() if isinstance(v, str)},
            **instance_tags}
    role = inst.get("role") or req["role"]
    instance_type = inst.get("instance_type") or req.get("instance_type") or ""
    fields = dict(
        role=role, group=tags.get(TAG_GROUP) or ("master" if role == "master"
                                                  else instance_type),
        instance_type=instance_type,
        market="spot" if request or inst.get("lifecycle") == "spot" else "on-demand",
        request_id=req.get("id"), request_state=req.get("state"),
        request_type=req.get("type"), status_code=req.get("status_code"),
        bid=req.get("bid"), image_id=req.get("image_id") or inst.get("image_id"),
        created=req.get("created"), instance_id=instance_id,
        instance_state=inst.get("state"), launched=inst.get("launched"),
        private_ip=inst.get("private_ip"), public_ip=inst.get("public_ip"),
        private_dns=inst.get("private_dns"), public_dns=inst.get("public_dns"),
        tags=tags, subnet_id=inst.get("subnet_id") or req.get("subnet_id"),
        zone=inst.get("zone") or req.get("zone"),
        instance_tagged=bool(instance) and tag_key in instance_tags
        and TAG_GROUP in instance_tags,
    )
    if detached:
        state, reason = "gone", f"its instance {detached} is not ours"
    else:
        state, reason = _state(fields, instance, desired, now)
    return Node(**fields, state=state, reason=reason)


def _state(fields: dict, instance: dict | None, desired: Desired,
           now: datetime) -> tuple[str, str]:
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
        return "gone", f"instance {name}" if name else STATE_UNKNOWN
    state = fields["request_state"]
    if state == "open":
        created = fields["created"]
        if created and now - created > desired.open_timeout:
            return "gone", f"open too long ({fields['status_code']})"
        return "open", fields["status_code"] or "pending-evaluation"
    if state == "failed" or fields["status_code"] == "bad-parameters":
        return "gone", f"request failed ({fields['status_code']})"
    return "gone", f"request {state} ({fields['status_code']})"
