"""A small, explicit model of the EC2 spot market layered over moto's EC2 backend.

moto fulfils every spot request at once, ignores ``ClientToken``, deletes cancelled requests
and never closes a request whose instance died. The reconciler has to be tested against the
real life cycle, so this module replaces a few of moto's EC2 *response handlers* (the methods
of ``moto.ec2.responses.EC2Response``) while a :class:`SpotMarket` is installed, and keeps
its extra state next to moto's own objects:

* ``RequestSpotInstances`` creates requests ``open``/``pending-evaluation`` with no
  instance; :meth:`SpotMarket.tick` fulfils them once ``fulfil_delay`` simulated seconds have
  passed, the simulated price is at most the bid and capacity remains.
* capacity is capped per instance type and, optionally, per pool (type in one subnet or
  zone, :meth:`SpotMarket.set_capacity` with ``place``): a request there stays open as
  ``capacity-not-available``, a spot ``RunInstances`` fails with
  ``InsufficientInstanceCapacity`` and a ``CreateFleet`` reports that pool in ``Errors``.
* interruptions (explicit, random, by price or by lost capacity) close one-time requests
  and reopen persistent ones; terminating an instance does the same (``...-by-user``).
* cancelling keeps the request visible as ``cancelled`` and never terminates its instance.
* ``ClientToken`` makes ``RequestSpotInstances`` and ``RunInstances`` idempotent.
* ``TagSpecifications`` on ``RequestSpotInstances`` accept only ``spot-instances-request``.
* optional throttling (HTTP 503 ``RequestLimitExceeded``, needs a :class:`LocalEc2`
  endpoint) and an eventual-consistency window after creates.

Everything random comes from RNGs seeded by ``seed`` and time comes from :class:`SimClock`,
so a test that makes the same calls sees the same market.

Not modelled: the 2-minute notice in instance metadata / EventBridge (only the request's
``marked-for-termination`` status), stop/hibernate interruption behaviour, ``ValidFrom`` /
``ValidUntil``, launch and Availability Zone groups, per-AZ prices, request expiry from
describe results after hours, and pagination of ``DescribeSpotInstanceRequests``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol

from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instances import Instance, StateReason
from moto.ec2.models.spot_requests import SpotInstanceRequest
from moto.ec2.responses import EC2Response
from moto.ec2.utils import parse_user_data, random_spot_request_id

if TYPE_CHECKING:
    from moto.ec2.models import EC2Backend

log = logging.getLogger(__name__)

LaunchCallback = Callable[[str, str], None]
TerminateCallback = Callable[[str], None]
HttpReply = tuple[int, list[tuple[str, str]], bytes]

#: Response handlers of ``EC2Response`` the market replaces while installed.
PATCHED_ACTIONS = (
    "request_spot_instances",
    "describe_spot_instance_requests",
    "cancel_spot_instance_requests",
    "describe_spot_price_history",
    "run_instances",
    "create_fleet",
    "terminate_instances",
    "describe_instances",
    "create_tags",
)

HTTP_HOOK_SLOT = "spot-market"

MESSAGES = {
    "pending-evaluation": "Your Spot request has been submitted for review, and is pending "
    "evaluation.",
    "fulfilled": "Your spot request is fulfilled.",
    "capacity-not-available": "There is no capacity available that matches your request.",
    "marked-for-termination": "Your Spot Instance is marked for termination.",
    "canceled-before-fulfillment": "Your Spot request is canceled before it was fulfilled.",
    "request-canceled-and-instance-running": "Your Spot request is canceled, but your "
    "instance is still running.",
    "instance-terminated-by-price": "Your Spot Instance was terminated because the Spot "
    "price rose above your maximum price.",
    "instance-terminated-no-capacity": "Your Spot Instance was terminated because there is "
    "no more Spot capacity available.",
    "instance-terminated-by-user": "Your Spot Instance was terminated by you.",
}


class HttpEndpoint(Protocol):
    """What :meth:`SpotMarket.install` needs from an endpoint to hook the HTTP layer."""

    def set_http_hook(self, hook: Callable[[str | None], HttpReply | None] | None,
                      slot: str = "default") -> None:
        """Install (or with ``None`` remove) a hook called with each request's Action."""


class SimClock:
    """Simulated time: starts at a wall-clock instant and moves only when advanced."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime.now(timezone.utc).replace(microsecond=0)
        self._elapsed = 0.0
        self._lock = threading.Lock()

    @property
    def seconds(self) -> float:
        """Simulated seconds since the clock started."""
        with self._lock:
            return self._elapsed

    def now(self) -> datetime:
        """The simulated time as an aware UTC datetime (what the API reports)."""
        return self._start + timedelta(seconds=self.seconds)

    def advance(self, seconds: float) -> None:
        """Move simulated time forward; it never goes back."""
        if seconds < 0:
            raise ValueError("the clock cannot go back")
        with self._lock:
            self._elapsed += seconds


@dataclass(frozen=True)
class MarketEvent:
    """One state change made by the market, kept in :attr:`SpotMarket.events`."""

    time: float
    kind: str
    request_id: str | None = None
    instance_id: str | None = None
    detail: str = ""


class ModelledSpotRequest(SpotInstanceRequest):
    """A moto spot request whose life cycle the market drives instead of moto.

    It is stored in moto's own ``spot_instance_requests`` so moto's describe, filters and
    tags keep working; moto's immediate launch in ``__init__`` is suppressed.
    """

    def __init__(
        self,
        backend: EC2Backend,
        *,
        now: datetime,
        opened_at: float,
        price: str | None,
        image_id: str,
        request_type: str,
        key_name: str | None,
        security_groups: list[Any],
        user_data: Any,
        instance_type: str,
        placement: str | None,
        monitoring_enabled: bool,
        subnet_id: str | None,
        tags: dict[str, str],
        interruption_behaviour: str | None,
        client_token: str | None,
    ) -> None:
        super().__init__(
            ec2_backend=backend,
            spot_request_id=random_spot_request_id(),
            price=price,  # type: ignore[arg-type]
            image_id=image_id,
            spot_instance_type=request_type,
            valid_from=None,
            valid_until=None,
            launch_group=None,
            availability_zone_group=None,
            key_name=key_name,  # type: ignore[arg-type]
            security_groups=[],
            user_data=user_data,
            instance_type=instance_type,
            placement=placement,
            kernel_id=None,
            ramdisk_id=None,
            monitoring_enabled=monitoring_enabled,
            subnet_id=subnet_id,  # type: ignore[arg-type]
            tags={"spot-instances-request": tags},
            spot_fleet_id=None,
            instance_interruption_behaviour=interruption_behaviour,
        )
        if security_groups:
            self.launch_specification.groups = list(security_groups)
        self.instance: Instance | None = None  # type: ignore[assignment]
        self.client_token = client_token
        self.created = now
        self.opened_at = opened_at
        self.state = "open"
        self._status_code = "pending-evaluation"
        self.status_message = MESSAGES["pending-evaluation"]
        self.status_time = now

    def launch_instance(self) -> Instance:  # type: ignore[override]
        """moto calls this from ``__init__``; the market launches on fulfilment instead."""
        return None  # type: ignore[return-value]

    @property
    def bid(self) -> float:
        """The maximum price; none given means the on-demand price, i.e. never too low."""
        return float(self.price) if self.price else math.inf

    @property
    def instance_id(self) -> str | None:  # type: ignore[override]
        return self.instance.id if self.instance is not None else None

    @property
    def status(self) -> dict[str, Any]:
        return {"Code": self._status_code, "Message": self.status_message,
                "UpdateTime": self.status_time}

    @property
    def status_code(self) -> str:
        return self._status_code

    @property
    def create_time(self) -> datetime:  # type: ignore[override]
        return self.created

    @property
    def launched_availability_zone(self) -> str | None:
        if self.instance is None:
            return None
        return self.instance.placement.zone  # type: ignore[no-any-return]

    def get_filter_value(self, filter_name: str, method_name: str | None = None) -> Any:
        extra = {
            "status-code": self._status_code,
            "status-message": self.status_message,
            "instance-id": self.instance_id,
            "type": self.type,
            "spot-price": self.price,
            "launch.instance-type": self.launch_specification.instance_type,
            "launch.image-id": self.launch_specification.image_id,
            "launch.key-name": self.launch_specification.key_name,
            "launched-availability-zone": self.launched_availability_zone,
        }
        if filter_name in extra:
            return extra[filter_name]
        return super().get_filter_value(filter_name, method_name)


@dataclass
class _BackendState:
    """Market state tied to one moto backend object (a moto reset makes a new one)."""

    backend: Any
    order: list[str] = field(default_factory=list)  # request ids in creation order
    spot_instances: list[str] = field(default_factory=list)  # spot instance ids, launch order
    request_of: dict[str, str] = field(default_factory=dict)  # instance id -> request id
    spot_tokens: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    run_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)
    fleet_tokens: dict[str, tuple[str, dict]] = field(default_factory=dict)  # -> the answer
    born: dict[str, float] = field(default_factory=dict)  # id -> simulated creation time
    marked: dict[str, tuple[float, str]] = field(default_factory=dict)  # iid -> (due, reason)


def _error(code: str, message: str) -> EC2ClientError:
    return EC2ClientError(code, message)


def _replayed(token: str | None, seen: Mapping[str, tuple[str, Any]],
              params: Mapping[str, Any]) -> Any:
    """What an earlier call with this ClientToken created, as EC2 answers a retried create.

    None when the token is new; IdempotentParameterMismatch when it comes back with
    different parameters.
    """
    if not token or token not in seen:
        return None
    fingerprint, created = seen[token]
    if fingerprint != _fingerprint(params):
        raise _error("IdempotentParameterMismatch",
                     f"Client token '{token}' was already used with different parameters.")
    return created


def _fingerprint(params: Mapping[str, Any]) -> str:
    """Parameters of a create call minus the ones that may differ between retries."""
    kept = {k: v for k, v in params.items() if k not in ("ClientToken", "DryRun")}
    return json.dumps(kept, sort_keys=True, default=str)


def _tag_map(tag_specs: Iterable[Mapping[str, Any]], resource_type: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for spec in tag_specs:
        if spec.get("ResourceType") == resource_type:
            for tag in spec.get("Tags") or []:
                tags[tag["Key"]] = tag.get("Value", "")
    return tags


class SpotMarket:
    """The project's model of the spot market; see the module docstring for what it does.

    Configuration is plain attributes, so a test may change them at any time:
    ``fulfil_delay`` (simulated seconds before a new or reopened request is evaluated),
    ``interruption_rate`` (chance per running spot instance per simulated minute),
    ``interruption_notice`` (seconds between ``marked-for-termination`` and termination;
    0 terminates at once), ``price_volatility`` (std-dev of the log price per simulated
    minute), ``throttle_rate`` / ``throttle_actions`` and ``not_found_window``.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        fulfil_delay: float = 5.0,
        prices: Mapping[str, float] | None = None,
        default_price: float = 0.01,
        capacity: Mapping[str, int] | None = None,
        interruption_rate: float = 0.0,
        interruption_notice: float = 0.0,
        price_volatility: float = 0.0,
        throttle_rate: float = 0.0,
        throttle_actions: Iterable[str] | None = None,
        not_found_window: float = 0.0,
        clock: SimClock | None = None,
        account_id: str = DEFAULT_ACCOUNT_ID,
        region: str = "us-east-1",
        on_demand_prices: Mapping[str, float] | None = None,
        default_on_demand_price: float = 0.096,
    ) -> None:
        self.seed = seed
        self.fulfil_delay = fulfil_delay
        self.default_price = default_price
        self.interruption_rate = interruption_rate
        self.interruption_notice = interruption_notice
        self.price_volatility = price_volatility
        self.throttle_rate = throttle_rate
        self.throttle_actions = set(throttle_actions) if throttle_actions is not None else None
        self.not_found_window = not_found_window
        self.clock = clock or SimClock()
        self.account_id = account_id
        self.region = region
        #: on-demand USD/hour per type (fixed), what the Price List API answers
        self.on_demand_prices: dict[str, float] = dict(on_demand_prices or {})
        self.default_on_demand_price = default_on_demand_price
        self.calls: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self.events: list[MarketEvent] = []
        self.callback_errors: list[BaseException] = []
        self._prices: dict[str, float] = dict(prices or {})
        self._capacity: dict[str, int] = dict(capacity or {})
        self._pool_capacity: dict[tuple[str, str], int] = {}  # (type, subnet or zone) -> cap
        self._rng = random.Random(seed)
        self._throttle_rng = random.Random(f"{seed}-throttle")
        self._lock = threading.RLock()
        self._state: _BackendState | None = None
        self._launch_callbacks: list[LaunchCallback] = []
        self._terminate_callbacks: list[TerminateCallback] = []
        self._pending: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._originals: dict[str, Any] = {}
        self._endpoint: HttpEndpoint | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ----------------------------------------------------------------- installation
    _installed: SpotMarket | None = None

    def install(self, endpoint: HttpEndpoint | None = None) -> SpotMarket:
        """Replace moto's spot/instance handlers (process-wide) until :meth:`uninstall`.

        With an ``endpoint`` (a :class:`~disposabledisco.sandbox.endpoint.LocalEc2`) the
        market also sees every HTTP call: counting, throttling.
        """
        if SpotMarket._installed is not None:
            raise RuntimeError("another SpotMarket is installed; uninstall it first")
        for name in PATCHED_ACTIONS:
            self._originals[name] = EC2Response.__dict__.get(name)
            original = getattr(EC2Response, name)
            setattr(EC2Response, name, self._make_handler(name, original))
        SpotMarket._installed = self
        if endpoint is not None:
            endpoint.set_http_hook(self._http_hook, slot=HTTP_HOOK_SLOT)
            self._endpoint = endpoint
        return self

    def uninstall(self) -> None:
        """Stop the background thread and give moto its own handlers back."""
        self.stop()
        if SpotMarket._installed is not self:
            return
        for name, own in self._originals.items():
            if own is None:
                delattr(EC2Response, name)
            else:
                setattr(EC2Response, name, own)
        self._originals.clear()
        SpotMarket._installed = None
        if self._endpoint is not None:
            self._endpoint.set_http_hook(None, slot=HTTP_HOOK_SLOT)
            self._endpoint = None

    def __enter__(self) -> SpotMarket:
        return self.install() if SpotMarket._installed is not self else self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @staticmethod
    def installed() -> SpotMarket | None:
        """The market installed in this process, if any (the Price List answers use it)."""
        return SpotMarket._installed

    def reset(self) -> None:
        """Forget state tied to moto's objects (call after a moto reset; also automatic)."""
        with self._lock:
            self._state = None

    def _make_handler(self, name: str, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        market = self

        def handler(resp: Any) -> Any:
            if resp.current_account != market.account_id or resp.region != market.region:
                return original(resp)
            try:
                with market._lock:
                    state = market._state_for(resp.ec2_backend)
                    return getattr(market, f"_h_{name}")(resp, original, state)
            finally:
                market._flush_callbacks()

        handler.__name__ = name
        return handler

    def _state_for(self, backend: Any) -> _BackendState:
        if self._state is None or self._state.backend is not backend:
            self._state = _BackendState(backend=backend)
        return self._state

    def _current(self) -> _BackendState:
        from moto.backends import get_backend

        return self._state_for(get_backend("ec2")[self.account_id][self.region])

    # ----------------------------------------------------------------- configuration
    def price(self, instance_type: str) -> float:
        """The current simulated spot price of ``instance_type``."""
        with self._lock:
            return self._prices.get(instance_type, self.default_price)

    def on_demand_price(self, instance_type: str) -> float:
        """The on-demand price of ``instance_type`` (it does not move)."""
        return self.on_demand_prices.get(instance_type, self.default_on_demand_price)

    def set_price(self, instance_type: str, price: float) -> None:
        """Set the spot price; it takes effect (fulfilment, interruption) on the next tick."""
        with self._lock:
            self._prices[instance_type] = float(price)

    def set_capacity(self, instance_type: str, count: int | None,
                     place: str | None = None) -> None:
        """Cap running spot instances of a type (``None`` = unlimited); excess is
        interrupted with ``instance-terminated-no-capacity`` on the next tick.

        With ``place`` (a subnet id or a zone) the cap is for that pool only: 0 makes
        every launch there (a spot request's evaluation, RunInstances with spot options,
        a CreateFleet override) find no capacity, while the type's own cap still holds.
        """
        caps: dict[Any, int] = self._capacity if place is None else self._pool_capacity
        key: Any = instance_type if place is None else (instance_type, place)
        with self._lock:
            if count is None:
                caps.pop(key, None)
            else:
                caps[key] = int(count)

    def on_launch(self, callback: LaunchCallback) -> None:
        """Call ``callback(instance_id, private_ip)`` for every instance launched through
        the market (spot fulfilment and any ``RunInstances``), after the market's lock is
        released."""
        self._launch_callbacks.append(callback)

    def on_terminate(self, callback: TerminateCallback) -> None:
        """Call ``callback(instance_id)`` when an instance is terminated (API or market)."""
        self._terminate_callbacks.append(callback)

    # ----------------------------------------------------------------- simulation
    def tick(self, seconds: float = 0.0) -> list[MarketEvent]:
        """Advance the clock by ``seconds`` and let the market act; returns its events.

        Order: prices move, due terminations happen, random interruptions, capacity and
        price interruptions, then open requests are evaluated in creation order.
        """
        try:
            with self._lock:
                before = len(self.events)
                self.clock.advance(seconds)
                state = self._current()
                self._walk_prices(seconds)
                self._finish_marked(state)
                self._random_interruptions(state, seconds)
                self._enforce_capacity(state)
                self._enforce_prices(state)
                self._evaluate_open(state)
                return self.events[before:]
        finally:
            self._flush_callbacks()

    def interrupt(self, instance_id: str, reason: str = "instance-terminated-by-price") -> None:
        """Interrupt a running instance as EC2 would (after ``interruption_notice``)."""
        try:
            with self._lock:
                state = self._current()
                instance = state.backend.get_instance_by_id(instance_id)
                if instance is None or not instance.is_running():
                    raise ValueError(f"{instance_id} is not a running instance")
                if instance_id not in state.request_of:
                    raise ValueError(f"{instance_id} is not a spot instance of this market")
                self._interrupt(state, instance, reason)
        finally:
            self._flush_callbacks()

    def background(self, interval: float = 0.5) -> None:
        """Tick every ``interval`` real seconds in a thread, the clock following real time."""
        if self._thread is not None:
            raise RuntimeError("the market already runs in the background")
        self._stop.clear()

        def run() -> None:
            last = time.monotonic()
            while not self._stop.wait(interval):
                now = time.monotonic()
                try:
                    self.tick(now - last)
                except Exception:  # keep the sandbox alive; the error is logged
                    log.exception("spot market tick failed")
                last = now

        self._thread = threading.Thread(target=run, name="spot-market", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread started by :meth:`background`, if any."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ----------------------------------------------------------------- internals
    def _event(self, kind: str, request_id: str | None = None,
               instance_id: str | None = None, detail: str = "") -> None:
        self.events.append(MarketEvent(self.clock.seconds, kind, request_id, instance_id,
                                       detail))

    def _flush_callbacks(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for callback, args in pending:
            try:
                callback(*args)
            except Exception as exc:  # a broken harness must not break the API
                log.exception("spot market callback %r failed", callback)
                self.callback_errors.append(exc)

    def _launched(self, state: _BackendState, instance: Instance) -> None:
        state.born[instance.id] = self.clock.seconds
        for callback in self._launch_callbacks:
            self._pending.append((callback, (instance.id, instance.private_ip_address)))

    def _terminated(self, instance_id: str) -> None:
        for callback in self._terminate_callbacks:
            self._pending.append((callback, (instance_id,)))

    def _set_status(self, request: ModelledSpotRequest, state: str, code: str,
                    message: str | None = None) -> None:
        message = message if message is not None else MESSAGES.get(code, "")
        if (request.state, request.status_code, request.status_message) != (
            state, code, message
        ):
            request.state = state
            request._status_code = code
            request.status_message = message
            request.status_time = self.clock.now()

    def _requests(self, state: _BackendState) -> list[ModelledSpotRequest]:
        known = state.backend.spot_instance_requests
        return [known[r] for r in state.order if r in known]

    def _running_spot(self, state: _BackendState) -> list[Instance]:
        found = []
        for iid in state.spot_instances:
            instance = state.backend.get_instance_by_id(iid)
            if instance is not None and instance.is_running():
                found.append(instance)
        return found

    def _walk_prices(self, seconds: float) -> None:
        if self.price_volatility <= 0 or seconds <= 0:
            return
        scale = self.price_volatility * math.sqrt(seconds / 60.0)
        for itype in sorted(self._prices):
            moved = self._prices[itype] * math.exp(scale * self._rng.gauss(0.0, 1.0))
            self._prices[itype] = max(round(moved, 6), 0.000001)

    def _finish_marked(self, state: _BackendState) -> None:
        now = self.clock.seconds
        for iid, (due, reason) in list(state.marked.items()):
            if due <= now:
                instance = state.backend.get_instance_by_id(iid)
                if instance is not None and instance.is_running():
                    self._terminate_now(state, instance, reason)
                state.marked.pop(iid, None)

    def _random_interruptions(self, state: _BackendState, seconds: float) -> None:
        if self.interruption_rate <= 0 or seconds <= 0:
            return
        chance = 1.0 - math.exp(-self.interruption_rate * seconds / 60.0)
        for instance in self._running_spot(state):
            if self._rng.random() < chance and instance.id not in state.marked:
                self._interrupt(state, instance, "instance-terminated-no-capacity")

    def _enforce_capacity(self, state: _BackendState) -> None:
        limits = [(itype, None, cap) for itype, cap in self._capacity.items()]
        limits += [(itype, place, cap) for (itype, place), cap in self._pool_capacity.items()]
        for itype, place, cap in sorted(limits, key=str):
            alive = [i for i in self._running_spot(state)
                     if i.instance_type == itype and i.id not in state.marked
                     and (place is None or _in_place(i, place))]
            for instance in reversed(alive[cap:]):  # the newest go first
                self._interrupt(state, instance, "instance-terminated-no-capacity")

    def _enforce_prices(self, state: _BackendState) -> None:
        for request in self._requests(state):
            instance = request.instance
            if (request.state not in ("active", "cancelled") or instance is None
                    or not instance.is_running() or instance.id in state.marked):
                continue
            if request.bid < self.price(instance.instance_type):
                self._interrupt(state, instance, "instance-terminated-by-price")

    def _evaluate_open(self, state: _BackendState) -> None:
        now = self.clock.seconds
        for request in self._requests(state):
            if request.state != "open" or now - request.opened_at < self.fulfil_delay:
                continue
            itype = request.launch_specification.instance_type
            price = self.price(itype)
            if request.bid < price:
                if request.status_code != "price-too-low":
                    self._event("price-too-low", request.id, detail=f"{price}")
                self._set_status(
                    request, "open", "price-too-low",
                    f"Your Spot request price of {request.bid} is lower than the minimum "
                    f"required Spot request fulfillment price of {price}.")
                continue
            spec = request.launch_specification
            if not self._has_capacity(state, itype, 1, spec.subnet_id, spec.availability_zone):
                if request.status_code != "capacity-not-available":
                    self._event("capacity-not-available", request.id)
                self._set_status(request, "open", "capacity-not-available")
                continue
            self._fulfil(state, request)

    def _has_capacity(self, state: _BackendState, itype: str, count: int,
                      subnet: str | None = None, zone: str | None = None) -> bool:
        return self._room(state, itype, subnet, zone) >= count

    def _room(self, state: _BackendState, itype: str, subnet: str | None = None,
              zone: str | None = None) -> float:
        """How many more spot instances of a type fit in a subnet and zone (the zone is
        the subnet's when not given): the least room of the type's cap and the caps of
        those pools (inf without a capacity limit)."""
        running = [i for i in self._running_spot(state) if i.instance_type == itype]
        rooms = [math.inf]
        if itype in self._capacity:
            rooms.append(self._capacity[itype] - len(running))
        if subnet and not zone:
            with contextlib.suppress(Exception):  # an unknown subnet is moto's error later
                zone = state.backend.get_subnet(subnet).availability_zone
        for place in {subnet, zone} - {None, ""}:
            if (itype, place) in self._pool_capacity:
                rooms.append(self._pool_capacity[(itype, place)]
                             - sum(1 for i in running if _in_place(i, place)))
        return min(rooms)

    def _fulfil(self, state: _BackendState, request: ModelledSpotRequest) -> None:
        spec = request.launch_specification
        reservation = state.backend.run_instances(
            spec.image_id, 1, request.user_data, [],
            instance_type=spec.instance_type,
            is_instance_type_default=False,
            region_name=self.region,
            subnet_id=spec.subnet_id,
            key_name=spec.key_name,
            placement=spec.availability_zone,
            security_group_ids=list(spec.groups),
            tags={},  # EC2 does not copy the request's tags to the instance
            lifecycle="spot",
        )
        instance = reservation.instances[0]
        self._bind(state, request, instance)
        self._set_status(request, "active", "fulfilled")
        self._event("fulfil", request.id, instance.id)
        self._launched(state, instance)

    def _bind(self, state: _BackendState, request: ModelledSpotRequest,
              instance: Instance) -> None:
        request.instance = instance
        instance.spot_instance_request_id = request.id  # type: ignore[attr-defined]
        instance.instance_lifecycle = "spot"  # type: ignore[attr-defined]
        state.spot_instances.append(instance.id)
        state.request_of[instance.id] = request.id

    def _request_of(self, state: _BackendState, instance_id: str) -> ModelledSpotRequest | None:
        request_id = state.request_of.get(instance_id)
        request = state.backend.spot_instance_requests.get(request_id) if request_id else None
        return request if isinstance(request, ModelledSpotRequest) else None

    def _interrupt(self, state: _BackendState, instance: Instance, reason: str) -> None:
        request = self._request_of(state, instance.id)
        if self.interruption_notice > 0:
            if instance.id in state.marked:
                return
            state.marked[instance.id] = (self.clock.seconds + self.interruption_notice, reason)
            if request is not None and request.state == "active":
                self._set_status(request, "active", "marked-for-termination")
            self._event("marked", request.id if request else None, instance.id, reason)
            return
        self._terminate_now(state, instance, reason)

    def _terminate_now(self, state: _BackendState, instance: Instance, reason: str) -> None:
        instance.terminate()
        instance._reason = "Server.SpotInstanceTermination"
        instance.state_reason = StateReason(
            "Server.SpotInstanceTermination: Spot instance termination",
            "Server.SpotInstanceTermination",
        )
        self._event("interrupt", state.request_of.get(instance.id), instance.id, reason)
        self._instance_gone(state, instance.id, reason)

    def _instance_gone(self, state: _BackendState, instance_id: str, reason: str) -> None:
        """Apply EC2's rules to the request of an instance that just terminated."""
        state.marked.pop(instance_id, None)
        self._terminated(instance_id)
        request = self._request_of(state, instance_id)
        if request is None or request.state != "active":
            return  # cancelled requests stay cancelled
        if request.type == "persistent":
            request.instance = None
            request.opened_at = self.clock.seconds
            self._set_status(request, "open", "pending-evaluation")
            self._event("reopen", request.id, instance_id, reason)
        else:
            self._set_status(request, "closed", reason)
            self._event("close", request.id, instance_id, reason)

    def _hidden(self, state: _BackendState, resource_id: str) -> bool:
        born = state.born.get(resource_id)
        return born is not None and self.clock.seconds - born < self.not_found_window

    @staticmethod
    def _not_found(resource_ids: list[str]) -> EC2ClientError:
        rid = resource_ids[0]
        if rid.startswith("sir-"):
            return _error("InvalidSpotInstanceRequestID.NotFound",
                          f"The spot instance request ID '{rid}' does not exist")
        return _error("InvalidInstanceID.NotFound", f"The instance ID '{rid}' does not exist")

    def _security_groups(self, backend: Any, names: list[str], ids: list[str]) -> list[Any]:
        groups = []
        for gid in ids:
            group = backend.get_security_group_from_id(gid)
            if group is None:
                raise _error("InvalidGroup.NotFound",
                             f"The security group '{gid}' does not exist")
            groups.append(group)
        for name in names:
            group = backend.get_security_group_by_name_or_id(name)
            if group is None:
                raise _error("InvalidGroup.NotFound",
                             f"The security group '{name}' does not exist")
            groups.append(group)
        return groups

    # ----------------------------------------------------------------- HTTP layer
    def _http_hook(self, action: str | None) -> HttpReply | None:
        """Count every call; answer a seeded share of them with 503 RequestLimitExceeded."""
        if not action:
            return None
        with self._lock:
            self.calls[action] += 1
            if self.throttle_rate <= 0:
                return None
            if self.throttle_actions is not None and action not in self.throttle_actions:
                return None
            if self._throttle_rng.random() >= self.throttle_rate:
                return None
            self.throttled[action] += 1
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            "<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
            f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
        ).encode()
        return 503, [("Content-Type", "text/xml")], body

    # ----------------------------------------------------------------- API handlers
    def _h_request_spot_instances(self, resp: Any, original: Any,
                                  state: _BackendState) -> ActionResult:
        params = resp.params or {}
        tag_specs = params.get("TagSpecifications") or []
        for spec in tag_specs:
            rtype = spec.get("ResourceType")
            if rtype != "spot-instances-request":
                raise _error("InvalidParameterValue",
                             f"'{rtype}' is not a valid taggable resource type for this "
                             "operation.")
        token = params.get("ClientToken")
        ids = _replayed(token, state.spot_tokens, params)
        if ids is not None:
            resp.error_on_dryrun()
            known = state.backend.spot_instance_requests
            return ActionResult({"SpotInstanceRequests": [known[i] for i in ids
                                                          if i in known]})
        spec = params.get("LaunchSpecification") or {}
        groups = self._security_groups(
            state.backend,
            list(spec.get("SecurityGroups") or []),
            list(spec.get("SecurityGroupIds") or []),
        )
        resp.error_on_dryrun()
        requests = []
        for _ in range(int(params.get("InstanceCount") or 1)):
            request = ModelledSpotRequest(
                state.backend,
                now=self.clock.now(),
                opened_at=self.clock.seconds,
                price=params.get("SpotPrice"),
                image_id=spec.get("ImageId"),
                request_type=params.get("Type") or "one-time",
                key_name=spec.get("KeyName"),
                security_groups=groups,
                user_data=parse_user_data(spec.get("UserData")),
                instance_type=spec.get("InstanceType") or "m1.small",
                placement=(spec.get("Placement") or {}).get("AvailabilityZone"),
                monitoring_enabled=bool((spec.get("Monitoring") or {}).get("Enabled")),
                subnet_id=spec.get("SubnetId"),
                tags=_tag_map(tag_specs, "spot-instances-request"),
                interruption_behaviour=params.get("InstanceInterruptionBehavior"),
                client_token=token,
            )
            state.backend.spot_instance_requests[request.id] = request
            state.order.append(request.id)
            state.born[request.id] = self.clock.seconds
            self._event("request", request.id, detail=request.type)
            requests.append(request)
        if token:
            state.spot_tokens[token] = (_fingerprint(params), [r.id for r in requests])
        return ActionResult({"SpotInstanceRequests": requests})

    def _h_describe_spot_instance_requests(self, resp: Any, original: Any,
                                           state: _BackendState) -> Any:
        ids = list(resp._get_param("SpotInstanceRequestIds", []) or [])
        if ids:
            known = state.backend.spot_instance_requests
            missing = [i for i in ids if i not in known or self._hidden(state, i)]
            if missing:
                raise self._not_found(missing)
            return original(resp)
        result = original(resp)
        listed = result.result["SpotInstanceRequests"]
        visible = [r for r in listed if not self._hidden(state, r.id)]
        return ActionResult({"SpotInstanceRequests": visible})

    def _h_cancel_spot_instance_requests(self, resp: Any, original: Any,
                                         state: _BackendState) -> ActionResult:
        ids = list(resp._get_param("SpotInstanceRequestIds", []) or [])
        known = state.backend.spot_instance_requests
        missing = [i for i in ids if i not in known]
        if missing:
            raise self._not_found(missing)
        resp.error_on_dryrun()
        cancelled = []
        for rid in ids:
            request = known[rid]
            if isinstance(request, ModelledSpotRequest):
                if request.state == "open":
                    self._set_status(request, "cancelled", "canceled-before-fulfillment")
                    self._event("cancel", rid, detail="canceled-before-fulfillment")
                elif request.state == "active":
                    self._set_status(request, "cancelled",
                                     "request-canceled-and-instance-running")
                    self._event("cancel", rid, request.instance_id,
                                "request-canceled-and-instance-running")
            else:  # a request moto made before the market was installed
                request.state = "cancelled"
            cancelled.append({"SpotInstanceRequestId": rid, "State": request.state})
        return ActionResult({"CancelledSpotInstanceRequests": cancelled})

    def _h_describe_spot_price_history(self, resp: Any, original: Any,
                                       state: _BackendState) -> ActionResult:
        types = list(resp._get_param("InstanceTypes", []) or [])
        filters = resp._filters_from_querystring()
        offerings = state.backend.describe_spot_price_history(types, filters)
        now = self.clock.now()
        history = [
            {
                "InstanceType": o["InstanceType"],
                "ProductDescription": "Linux/UNIX (Amazon VPC)",
                "SpotPrice": f"{self.price(o['InstanceType']):.6f}",
                "AvailabilityZone": o["Location"],
                "Timestamp": now,
            }
            for o in offerings
        ]
        return ActionResult({"SpotPriceHistory": history})

    def _h_run_instances(self, resp: Any, original: Any, state: _BackendState) -> Any:
        params = resp.params or {}
        token = params.get("ClientToken")
        reservation_id = _replayed(token, state.run_tokens, params)
        if reservation_id is not None:
            resp.error_on_dryrun()
            return ActionResult(state.backend.reservations[reservation_id])
        market_options = params.get("InstanceMarketOptions") or {}
        spot = market_options.get("MarketType") == "spot"
        itype = params.get("InstanceType") or "m1.small"
        count = int(params.get("MinCount") or 1)
        options = market_options.get("SpotOptions") or {}
        bid = float(options["MaxPrice"]) if options.get("MaxPrice") else math.inf
        if spot:
            price = self.price(itype)
            if bid < price:
                raise _error("SpotMaxPriceTooLow",
                             f"Your Spot request price of {bid} is lower than the minimum "
                             f"required Spot request fulfillment price of {price}.")
            if not self._has_capacity(state, itype, count, params.get("SubnetId"),
                                      (params.get("Placement") or {}).get("AvailabilityZone")):
                raise _error("InsufficientInstanceCapacity",
                             f"There is no Spot capacity available that matches your "
                             f"request for {itype}.")
        result = original(resp)
        reservation = result.result
        for instance in reservation.instances:
            if spot:
                self._spot_at_once(state, instance, options.get("MaxPrice"), token,
                                   _tag_map(params.get("TagSpecifications") or [],
                                            "spot-instances-request"),
                                   options.get("SpotInstanceType") or "one-time",
                                   options.get("InstanceInterruptionBehavior"), "run-instances")
            else:
                self._event("launch", None, instance.id, "on-demand")
            self._launched(state, instance)
        if token:
            state.run_tokens[token] = (_fingerprint(params), reservation.id)
        return result

    def _spot_at_once(self, state: _BackendState, instance: Instance, bid: Any,
                      token: str | None, tags: dict[str, str], request_type: str,
                      interruption: str | None, how: str) -> None:
        """The fulfilled request behind a spot instance launched in one call (RunInstances
        with spot options, an instant fleet): its bid is what later price changes and
        interruptions are judged by, exactly as for a RequestSpotInstances request."""
        request = ModelledSpotRequest(
            state.backend, now=self.clock.now(), opened_at=self.clock.seconds, price=bid,
            image_id=instance.image_id, request_type=request_type,
            key_name=instance.key_name, security_groups=list(instance.security_groups),
            user_data=instance.user_data, instance_type=instance.instance_type,
            placement=None, monitoring_enabled=False, subnet_id=instance.subnet_id,
            tags=tags, interruption_behaviour=interruption, client_token=token)
        state.backend.spot_instance_requests[request.id] = request
        state.order.append(request.id)
        state.born[request.id] = self.clock.seconds
        self._bind(state, request, instance)
        self._set_status(request, "active", "fulfilled")
        self._event("fulfil", request.id, instance.id, how)

    def _h_create_fleet(self, resp: Any, original: Any, state: _BackendState) -> Any:
        """An instant spot fleet: price-capacity-optimized over its pools, idempotent.

        The pool is the cheapest one whose price is under its MaxPrice and that has room
        (several pools are not mixed in one call; the rest of the count is the next
        pass's); every other pool is reported in Errors as EC2 does. Other fleet types
        and on-demand capacity are moto's own.
        """
        params = resp.params or {}
        target = params.get("TargetCapacitySpecification") or {}
        if params.get("Type") != "instant" or target.get("DefaultTargetCapacityType") != "spot":
            return original(resp)
        token = params.get("ClientToken")
        answer = _replayed(token, state.fleet_tokens, params)
        resp.error_on_dryrun()
        if answer is not None:
            return ActionResult(answer)
        wanted = int(target.get("TotalTargetCapacity") or 0)
        errors, pools = [], []
        for config in params.get("LaunchTemplateConfigs") or []:
            for override in config.get("Overrides") or []:
                itype = override.get("InstanceType") or "m1.small"
                bid = float(override["MaxPrice"]) if override.get("MaxPrice") else math.inf
                room = self._room(state, itype, override.get("SubnetId"),
                                  override.get("AvailabilityZone"))
                code = ("SpotMaxPriceTooLow" if bid < self.price(itype)
                        else "InsufficientInstanceCapacity" if room <= 0 else None)
                pool = {"LaunchTemplateAndOverrides": {
                    "LaunchTemplateSpecification": config.get("LaunchTemplateSpecification"),
                    "Overrides": override}, "Lifecycle": "spot"}
                if code:
                    errors.append({**pool, "ErrorCode": code, "ErrorMessage": (
                        f"no spot {itype} at or under the bid" if code == "SpotMaxPriceTooLow"
                        else f"There is no Spot capacity available that matches your "
                             f"request for {itype} here.")})
                else:
                    pools.append((self.price(itype), len(pools), room, config, override, pool))
        answer = {"FleetId": f"fleet-{uuid.uuid4()}", "Instances": [], "Errors": errors}
        if pools:
            _price, _order, room, config, override, pool = min(pools)
            fleet = state.backend.create_fleet(
                on_demand_options={}, spot_options=params.get("SpotOptions") or {},
                target_capacity_specification={**target,
                                               "TotalTargetCapacity": int(min(wanted, room))},
                launch_template_configs=[{**config, "Overrides": [override]}],
                excess_capacity_termination_policy=None, replace_unhealthy_instances=None,
                terminate_instances_with_expiration=True, fleet_type="instant",
                valid_from=None, valid_until=None,
                tag_specifications=params.get("TagSpecifications") or [])
            ids = [i for item in fleet.instances or () for i in item["InstanceIds"]]
            for iid in ids:
                instance = state.backend.get_instance_by_id(iid)
                self._spot_at_once(state, instance, override.get("MaxPrice"), token, {},
                                   "one-time", None, "fleet")
                self._launched(state, instance)
            answer = {"FleetId": fleet.id, "Errors": errors,
                      "Instances": [{**pool, "InstanceIds": ids,
                                     "InstanceType": override.get("InstanceType")}]}
        if token:
            state.fleet_tokens[token] = (_fingerprint(params), answer)
        return ActionResult(answer)

    def _h_terminate_instances(self, resp: Any, original: Any, state: _BackendState) -> Any:
        ids = list(resp._get_param("InstanceIds", []) or [])
        was_running = set()
        for iid in ids:
            instance = state.backend.get_instance_by_id(iid)
            if instance is not None and instance.state != "terminated":
                was_running.add(iid)
        result = original(resp)
        for iid in ids:
            if iid in was_running:
                self._event("terminate", state.request_of.get(iid), iid, "by-user")
                self._instance_gone(state, iid, "instance-terminated-by-user")
        return result

    def _h_describe_instances(self, resp: Any, original: Any, state: _BackendState) -> Any:
        ids = list(resp._get_param("InstanceIds", []) or [])
        if ids:
            hidden = [i for i in ids if self._hidden(state, i)]
            if hidden:
                raise self._not_found(hidden)
            return original(resp)
        result = original(resp)
        if self.not_found_window <= 0:
            return result
        payload = dict(result.result)
        reservations = []
        for reservation in payload["Reservations"]:
            shown = [i for i in reservation.instances if not self._hidden(state, i.id)]
            if len(shown) != len(reservation.instances):
                if not shown:
                    continue
                reservation = _copy_with(reservation, instances=shown)
            reservations.append(reservation)
        payload["Reservations"] = reservations
        return ActionResult(payload)

    def _h_create_tags(self, resp: Any, original: Any, state: _BackendState) -> Any:
        ids = list((resp.params or {}).get("Resources") or [])
        hidden = [i for i in ids if self._hidden(state, i)]
        if hidden:
            raise self._not_found(hidden)
        return original(resp)


def _in_place(instance: Instance, place: str) -> bool:
    """Whether an instance runs in a place: its subnet id or its zone."""
    return place in (instance.subnet_id, instance.placement.zone)


def _copy_with(obj: Any, **changes: Any) -> Any:
    clone = copy.copy(obj)
    for key, value in changes.items():
        setattr(clone, key, value)
    return clone
