"""The EC2 gateway: the only module that talks to EC2 (and, with pricing.py for the
Price List API, the only boto3 user).

Reads are few and cheap by construction: one paginated, tag-filtered describe for spot
requests and one for instances per pass, plus a describe by id only for instances that
were fulfilled but not tagged yet. Creates carry their tags and a ClientToken in the
creating call. Eventual-consistency `NotFound` answers right after a create are retried,
never taken to mean "missing".

Writes are fenced: tag, untag, cancel and terminate refuse any id that the last `observe`
did not judge ours (`cluster.ownership`, the same test the planner's nodes come from) and
that this gateway did not create since. A planner bug can then fail a pass, but never
touch a resource that is not the cluster's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .cluster import TAG_GROUP, _mapping, ownership
from .config import Config
from .pools import CAPACITY_CODES, Pool

FILTER_CHUNK = 200
PAGE_SIZE = 1000
NOT_FOUND_CODES = ("InvalidInstanceID.NotFound", "InvalidSpotInstanceRequestID.NotFound")
WATCHED_INSTANCE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]

HINTS = {
    "InvalidAMIID.NotFound": "AMI {ami} does not exist in {region}: set AMI to an image of that "
                             "region",
    "InvalidAMIID.Malformed": "AMI {ami} is not a valid image id: set AMI to an id like "
                              "ami-0123456789abcdef0",
    "InvalidAMIID.Unavailable": "AMI {ami} is not available: pick another AMI",
    "InvalidKeyPair.NotFound": "key pair {key} does not exist in {region}: import your public "
                               "key there or fix KEY_NAME",
    "InvalidGroup.NotFound": "a security group in SECURITY_GROUPS does not exist in {region}",
    "InvalidSubnetID.NotFound": "SUBNET_ID does not exist in {region}",
    "AuthFailure": "AWS rejected the credentials: check AWS_PROFILE or the environment",
    "UnauthorizedOperation": "the credentials may not call this EC2 action: grant it in IAM",
    "MaxSpotInstanceCountExceeded": "the account's spot instance limit is reached: lower "
                                    "NUM_SLAVES or ask AWS for a higher limit",
    "InsufficientInstanceCapacity": "EC2 has no capacity for this type now: try another type "
                                    "or zone, or run again later",
    "SpotMaxPriceTooLow": "MAX_BID is below the current spot price: raise MAX_BID",
    "RequestLimitExceeded": "EC2 throttled the calls even after retries: run again later",
    "InvalidParameterValue": "EC2 rejected a parameter: check the config values named in the "
                             "message",
    "IdempotentParameterMismatch": "a retried create differed from the original: run again",
}


class AwsError(Exception):
    """An EC2 call failed: one line with the AWS error code and what to do."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        self.code = code
        self.message = message
        text = f"EC2 {code}: {message}"
        super().__init__(f"{text} ({hint})" if hint else text)


class NotOurs(AwsError):
    """The gateway refused a write to ids that are not this cluster's; nothing was sent."""

    def __init__(self, verb: str, ids: list[str], tag_key: str) -> None:
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(
            "NotOurs", f"refused to {verb} {shown}: not seen as {tag_key}=master/slave in "
            "this pass", "nothing was sent to EC2; `status` lists what is not ours")


class NoCapacity(AwsError):
    """EC2 had no capacity in the pools asked for; `pools` maps each to EC2's code, and
    `advice` is what else helps (HINTS: a limit of the account is not a pool's)."""

    def __init__(self, code: str, message: str, pools: Mapping[Pool, str],
                 advice: str = "") -> None:
        super().__init__(code, message, "; ".join(filter(None, [
            advice, "those pools are parked and the next pass launches elsewhere (see "
            "CAPACITY_PARK_MINUTES)"])))
        self.pools = dict(pools)
        self.advice = advice


@dataclass(frozen=True)
class Launched:
    """What one create call made (request or instance ids) and the pools of a fleet that
    EC2 reported full while it launched in others (→ their error code)."""

    ids: list[str]
    full: dict[Pool, str]


@dataclass(frozen=True)
class Observation:
    requests: list[dict]
    instances: list[dict]


def make_session(config: Config) -> boto3.session.Session:
    """A session from the config, else the standard credential chain (env, profile, role)."""
    kwargs: dict[str, Any] = {}
    if config["AWS_ACCESS"]:
        kwargs.update(aws_access_key_id=config["AWS_ACCESS"],
                      aws_secret_access_key=config["AWS_SECRET"])
    if config["AWS_PROFILE"]:
        kwargs["profile_name"] = config["AWS_PROFILE"]
    return boto3.session.Session(**kwargs)


def make_client(config: Config, session: boto3.session.Session | None = None) -> Any:
    """An EC2 client with throttling retries, for `config.region` and `config.endpoint_url`.

    The very values the cluster's lock and STATE_DIR are keyed on, so the place a pass
    locks and the place it changes can never disagree.
    """
    session = session or make_session(config)
    retries = BotoConfig(retries={"max_attempts": 10, "mode": "standard"},
                         user_agent_extra="disposabledisco")
    kwargs: dict[str, Any] = {"region_name": config.region, "config": retries}
    if config.endpoint_url:
        kwargs["endpoint_url"] = config.endpoint_url
    return session.client("ec2", **kwargs)


def _may_have_live_instance(request: Mapping) -> bool:
    """Fulfilled and not ended: its instance may be live but not tagged by us yet.

    A closed request keeps the id of its dead instance for hours; asking for that would
    cost every later pass a call.
    """
    status = request.get("Status")
    code = status.get("Code") if isinstance(status, Mapping) else None
    return isinstance(request.get("InstanceId"), str) and (
        request.get("State") == "active" or code == "request-canceled-and-instance-running")


def _created_ids(answer: Any, list_key: str, id_key: str) -> list[str]:
    """The ids a create call answered with; an answer without them is an AwsError line."""
    items = answer.get(list_key) if isinstance(answer, Mapping) else None
    ids = [i.get(id_key) for i in items or () if isinstance(i, Mapping)] \
        if isinstance(items, list) else []
    if not ids or not all(isinstance(i, str) and i for i in ids):
        raise AwsError("MalformedResponse", f"the answer to the create lists no {id_key}",
                       "run again: the ClientToken makes the retry return the same request")
    return ids


def _price(bid: float) -> str:
    """A bid as EC2 takes it: a decimal string without trailing zeros."""
    return f"{bid:.4f}".rstrip("0").rstrip(".")


def _chunks(items: list[str], size: int = FILTER_CHUNK) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Ec2Gateway:
    """Every EC2 call of the tool, with errors turned into `AwsError` lines."""

    def __init__(self, config: Config, client: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._client = client
        self._sleep = sleep
        self._vcpus: dict[str, int] = {}
        self._our_requests: set[str] = set()  # see observe(): the only ids writes accept
        self._our_instances: set[str] = set()
        self._templates: set[str] = set()  # launch templates known to exist (this process)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.config)
        return self._client

    @property
    def fleet(self) -> bool:
        """LAUNCH_API "fleet": spot launches are CreateFleet calls of type instant."""
        return self.config.get("LAUNCH_API") == "fleet"

    @property
    def region(self) -> str:
        return self.client.meta.region_name

    # -- reads -------------------------------------------------------------------------

    def observe(self) -> Observation:
        """All spot requests and live instances carrying the cluster's tag key.

        Also the not-yet-tagged instances of requests that are ours (never those of a
        foreign request), and it resets what later writes may touch to what is ours now.
        """
        tag_key = self.config.tag_key
        tag_filter = {"Name": "tag-key", "Values": [tag_key]}
        # A fleet tags its instances in the creating call and leaves no request of ours.
        requests = [] if self.fleet else self._paged(
            "describe_spot_instance_requests", "SpotInstanceRequests", Filters=[tag_filter])
        instances = self._instances(Filters=[
            tag_filter, {"Name": "instance-state-name", "Values": WATCHED_INSTANCE_STATES}])
        ours = ownership(requests, [], tag_key).requests
        known = {i.get("InstanceId") for i in instances if isinstance(i, Mapping)}
        untagged = sorted({r["InstanceId"] for r in requests if isinstance(r, Mapping)
                           and r.get("SpotInstanceRequestId") in ours
                           and _may_have_live_instance(r) and r["InstanceId"] not in known})
        for chunk in _chunks(untagged):
            instances += self._instances(Filters=[
                {"Name": "instance-id", "Values": chunk},
                {"Name": "instance-state-name", "Values": WATCHED_INSTANCE_STATES}])
        judged = ownership(requests, instances, tag_key)
        self._our_requests = set(judged.requests)
        self._our_instances = set(judged.instances)
        return Observation(requests, instances)

    def _instances(self, **kwargs: Any) -> list[dict]:
        reservations = self._paged("describe_instances", "Reservations", **kwargs)
        return [i for r in reservations if isinstance(r, Mapping)
                for i in r.get("Instances") or ()]

    def _require_ours(self, verb: str, ids: Iterable[str], ours: set[str]) -> list[str]:
        """The ids, if every one is ours (see observe); else NotOurs and no call at all."""
        ids = list(ids)
        strangers = sorted(set(ids) - ours)
        if strangers:
            raise NotOurs(verb, strangers, self.config.tag_key)
        return ids

    def _paged(self, operation: str, key: str, **kwargs: Any) -> list[dict]:
        items: list[dict] = []
        with self._errors():
            pages = self.client.get_paginator(operation).paginate(
                **kwargs, PaginationConfig={"PageSize": PAGE_SIZE})
            for page in pages:
                found = page.get(key) if isinstance(page, Mapping) else None
                items.extend(found if isinstance(found, list) else ())
        return items

    def vcpus(self, instance_types: set[str]) -> dict[str, int]:
        """Default vCPU count per instance type, asked once per type (no hard-coded table)."""
        wanted = sorted(set(instance_types) - set(self._vcpus))
        for chunk in _chunks(wanted, 100):
            with self._errors():
                answer = self.client.describe_instance_types(InstanceTypes=chunk)
            for item in answer.get("InstanceTypes") or ():
                info = item.get("VCpuInfo") if isinstance(item, Mapping) else None
                count = info.get("DefaultVCpus") if isinstance(info, Mapping) else None
                if type(count) is int and count > 0:  # else unknown, as if not listed
                    self._vcpus[item.get("InstanceType")] = count
        return {t: self._vcpus[t] for t in instance_types if t in self._vcpus}

    def console_output(self, instance_id: str) -> str:
        """The instance's console text (host key fingerprints for HOST_KEY_POLICY console)."""
        with self._errors():
            answer = self.client.get_console_output(InstanceId=instance_id, Latest=True)
        text = answer.get("Output") if isinstance(answer, Mapping) else None
        if not isinstance(text, str):
            return ""
        try:
            return base64.b64decode(text).decode("utf-8", "replace")
        except ValueError:
            return text

    def spot_prices(self, instance_types: Iterable[str]) -> dict[str, float]:
        """The current spot price (USD/hour) per instance type, from the latest
        DescribeSpotPriceHistory entry of each zone (AVAILABILITY_ZONE when set); the
        highest zone's price when they differ, so the figure is never an underestimate."""
        types = sorted(set(instance_types))
        if not types:
            return {}
        kwargs: dict[str, Any] = {"InstanceTypes": types,
                                  "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
                                  "StartTime": datetime.now(timezone.utc)}
        if self.config["AVAILABILITY_ZONE"]:
            kwargs["AvailabilityZone"] = self.config["AVAILABILITY_ZONE"]
        latest: dict[tuple[str, str], tuple[Any, float]] = {}
        for item in self._paged("describe_spot_price_history", "SpotPriceHistory", **kwargs):
            try:
                key = (item["InstanceType"], item.get("AvailabilityZone") or "")
                price, stamp = float(item["SpotPrice"]), item.get("Timestamp")
            except (KeyError, TypeError, ValueError):
                continue  # a malformed entry says nothing
            if key not in latest or (stamp and latest[key][0] and stamp > latest[key][0]):
                latest[key] = (stamp, price)
        prices: dict[str, float] = {}
        for (instance_type, _zone), (_stamp, price) in latest.items():
            prices[instance_type] = max(price, prices.get(instance_type, 0.0))
        return prices

    # -- writes ------------------------------------------------------------------------

    def launch(self, role: str, group: str, instance_type: str, count: int, market: str,
               bid: float | None, token: str, pools: tuple[Pool, ...] = ()) -> Launched:
        """Create `count` instances of one group in one call, in `pools` (default: the
        group's types in every configured place for a fleet, else `instance_type` in the
        first place). A capacity error is a `NoCapacity` naming the full pools."""
        tags = [{"Key": self.config.tag_key, "Value": role}, {"Key": TAG_GROUP, "Value": group}]
        fleet = market == "spot" and self.fleet
        if not pools:
            types = next(g.choices for g in self.config.groups
                         if g.role == role and g.name == group) if fleet else (instance_type,)
            places = self.config.places if fleet else self.config.places[:1]
            pools = tuple((t, p) for t in types for p in places)
        if fleet:
            launched = self._create_fleet(pools, count, bid, token, tags, role)
            self._our_instances.update(launched.ids)
            return launched
        try:
            if market == "spot":
                ids = self._request_spot(pools[0], count, bid, token, tags)
                self._our_requests.update(ids)
            else:
                ids = self._run_on_demand(pools[0], count, token, tags)
                self._our_instances.update(ids)
        except AwsError as error:
            if error.code in CAPACITY_CODES:
                raise NoCapacity(error.code, error.message, {pools[0]: error.code},
                                 _hint(self.config, error.code)) from None
            raise
        return Launched(ids, {})

    def _placement(self, place: str) -> dict[str, Any]:
        """A pool's place as launch parameters: its subnet, and the zone (AVAILABILITY_ZONE,
        else the place itself when it is a zone)."""
        out: dict[str, Any] = {}
        if place.startswith("subnet-"):
            out["SubnetId"] = place
        zone = self.config["AVAILABILITY_ZONE"] or (place if place and "SubnetId" not in out
                                                    else None)
        if zone:
            out["AvailabilityZone"] = zone
        return out

    def _launch_spec(self, pool: Pool) -> dict[str, Any]:
        config = self.config
        instance_type, place = pool
        spec: dict[str, Any] = {"ImageId": config["AMI"], "InstanceType": instance_type,
                                "KeyName": config["KEY_NAME"]}
        groups = list(config["SECURITY_GROUPS"] or [])
        ids = [g for g in groups if g.startswith("sg-")]
        names = [g for g in groups if not g.startswith("sg-")]
        if ids:
            spec["SecurityGroupIds"] = ids
        if names:
            spec["SecurityGroups"] = names
        where = self._placement(place)
        if "SubnetId" in where:
            spec["SubnetId"] = where["SubnetId"]
        if "AvailabilityZone" in where:
            spec["Placement"] = {"AvailabilityZone": where["AvailabilityZone"]}
        profile = config["IAM_INSTANCE_PROFILE"]
        if profile:
            spec["IamInstanceProfile"] = ({"Arn": profile} if profile.startswith("arn:")
                                          else {"Name": profile})
        return spec

    def _launch_template(self, role: str, tags: list[dict]) -> str:
        """The name of a launch template holding the launch spec (no type, no subnet).

        Named after its content, so a changed spec gets a new template and an existing one
        is simply reused; created once, tagged in the creating call like everything else.
        Asked for once per gateway: the slave groups of one pass share one template.
        """
        spec = self._launch_spec(("", ""))
        for key in ("InstanceType", "SubnetId", "Placement"):
            spec.pop(key, None)
        digest = hashlib.sha256(json.dumps([self.config.tag_key, role, spec],
                                           sort_keys=True).encode()).hexdigest()[:20]
        name = f"disposabledisco-{digest}"
        if name in self._templates:
            return name
        try:
            with self._errors():
                self.client.create_launch_template(
                    LaunchTemplateName=name, LaunchTemplateData=spec, ClientToken=name,
                    TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags[:1]}])
        except AwsError as error:
            if error.code != "InvalidLaunchTemplateName.AlreadyExistsException":
                raise
        self._templates.add(name)
        return name

    def _create_fleet(self, pools: tuple[Pool, ...], count: int, bid: float | None, token: str,
                      tags: list[dict], role: str) -> Launched:
        """One CreateFleet (instant, price-capacity-optimized), one override per pool.

        EC2 answers at once with the instances it launched and an error per pool it could
        not use; the full pools come back with the ids, and when nothing launched the
        first error is the AwsError of the call (NoCapacity when pools were full).
        """
        price = {"MaxPrice": _price(bid)} if bid is not None else {}
        with self._errors():
            answer = self.client.create_fleet(
                Type="instant", ClientToken=token,
                SpotOptions={"AllocationStrategy": "price-capacity-optimized"},
                TargetCapacitySpecification={"TotalTargetCapacity": count,
                                             "DefaultTargetCapacityType": "spot"},
                LaunchTemplateConfigs=[{
                    "LaunchTemplateSpecification": {
                        "LaunchTemplateName": self._launch_template(role, tags),
                        "Version": "$Latest"},
                    "Overrides": [{"InstanceType": t, **self._placement(p), **price}
                                  for t, p in pools]}],
                TagSpecifications=[{"ResourceType": kind, "Tags": tags}
                                   for kind in ("fleet", "instance")])
        launched = answer.get("Instances") if isinstance(answer, Mapping) else None
        ids = [i for item in launched or () if isinstance(item, Mapping)
               for i in item.get("InstanceIds") or () if isinstance(i, str) and i]
        errors = answer.get("Errors") if isinstance(answer, Mapping) else None
        errors = [e for e in errors or () if isinstance(e, Mapping)] \
            if isinstance(errors, list) else []
        full = {_error_pool(e): str(e["ErrorCode"]) for e in errors
                if e.get("ErrorCode") in CAPACITY_CODES}
        if ids:
            return Launched(ids, full)
        first = errors[0] if errors else {}
        code = str(first.get("ErrorCode") or "MalformedResponse")
        message = str(first.get("ErrorMessage") or "the fleet launched nothing")
        if full:
            code = code if code in CAPACITY_CODES else next(iter(full.values()))
            raise NoCapacity(code, message, full, _hint(self.config, code))
        raise AwsError(code, message, _hint(self.config, code) or "run again later")

    def _request_spot(self, pool: Pool, count: int, bid: float | None, token: str,
                      tags: list[dict]) -> list[str]:
        kwargs: dict[str, Any] = {
            "InstanceCount": count, "Type": self.config["SPOT_REQUEST_TYPE"],
            "ClientToken": token, "LaunchSpecification": self._launch_spec(pool),
            "TagSpecifications": [{"ResourceType": "spot-instances-request", "Tags": tags}]}
        if bid is not None:
            kwargs["SpotPrice"] = _price(bid)
        with self._errors():
            answer = self.client.request_spot_instances(**kwargs)
        return _created_ids(answer, "SpotInstanceRequests", "SpotInstanceRequestId")

    def _run_on_demand(self, pool: Pool, count: int, token: str,
                       tags: list[dict]) -> list[str]:
        spec = self._launch_spec(pool)
        placement = spec.pop("Placement", None)
        kwargs: dict[str, Any] = {
            **spec, "MinCount": count, "MaxCount": count, "ClientToken": token,
            "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                                  for kind in ("instance", "volume")]}
        if placement:
            kwargs["Placement"] = placement
        with self._errors():
            answer = self.client.run_instances(**kwargs)
        return _created_ids(answer, "Instances", "InstanceId")

    def tag(self, instance_ids: list[str], tags: Mapping[str, str]) -> None:
        """Tag many instances in one call per 1000; retried while new ids are not visible."""
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        ids = self._require_ours("tag", instance_ids, self._our_instances)
        for chunk in _chunks(ids, 1000):
            self._retry_not_found(lambda c=chunk: self.client.create_tags(
                Resources=c, Tags=tag_list))

    def untag(self, instance_ids: list[str], keys: list[str]) -> None:
        """Remove tags (whatever their value) from many instances in one call per 1000."""
        ids = self._require_ours("untag", instance_ids, self._our_instances)
        for chunk in _chunks(ids, 1000):
            self._retry_not_found(lambda c=chunk: self.client.delete_tags(
                Resources=c, Tags=[{"Key": k} for k in keys]))

    def cancel(self, request_ids: list[str]) -> None:
        for chunk in _chunks(self._require_ours("cancel", request_ids, self._our_requests)):
            self._retry_not_found(lambda c=chunk: self.client.cancel_spot_instance_requests(
                SpotInstanceRequestIds=c))

    def terminate(self, instance_ids: list[str]) -> None:
        ids = self._require_ours("terminate", instance_ids, self._our_instances)
        for chunk in _chunks(ids, 1000):
            self._retry_not_found(lambda c=chunk: self.client.terminate_instances(
                InstanceIds=c))

    def _retry_not_found(self, call: Callable[[], Any], deadline_seconds: float = 60) -> Any:
        """Right after a create, EC2 may not know the new id yet: back off and ask again."""
        deadline = time.monotonic() + deadline_seconds
        delay = 0.5
        while True:
            try:
                with self._errors():
                    return call()
            except AwsError as error:
                if error.code not in NOT_FOUND_CODES or time.monotonic() + delay > deadline:
                    raise
            self._sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8)

    def _errors(self) -> _ErrorTranslator:
        return _ErrorTranslator(self.config)


def _error_pool(error: Mapping) -> Pool:
    """The pool a CreateFleet error entry is about: its override's type and place."""
    both = _mapping(error.get("LaunchTemplateAndOverrides"))
    override = _mapping(both.get("Overrides"))
    place = override.get("SubnetId") or override.get("AvailabilityZone") or ""
    return (str(override.get("InstanceType") or ""), str(place))


def _hint(config: Config, code: str) -> str:
    """What to do about an EC2 error code, with the config's values filled in ("" if none)."""
    return HINTS.get(code, "").format(ami=config["AMI"], key=config["KEY_NAME"],
                                      region=config.region)


class _ErrorTranslator:
    """Turns botocore exceptions into one-line `AwsError`s with the code and a hint."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> bool:
        if error is None:
            return False
        if isinstance(error, ClientError):
            info = error.response.get("Error", {})
            code = info.get("Code", "Unknown")
            message = info.get("Message", str(error)).strip().rstrip(".")
            raise AwsError(code, message, _hint(self.config, code)) from None
        if isinstance(error, NoCredentialsError):
            raise AwsError("NoCredentials", "no AWS credentials found",
                           "set AWS_PROFILE, the AWS_* environment variables, or run on an "
                           "instance with a role") from None
        if isinstance(error, BotoCoreError):
            raise AwsError(type(error).__name__, str(error)) from None
        return False
