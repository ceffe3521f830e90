"""Capacity pools EC2 had no room in, parked for CAPACITY_PARK_MINUTES.

A pool is (instance type, place): the place is a subnet id when SUBNET_ID is set, else
the AVAILABILITY_ZONE, else "" (EC2 chooses the zone). When EC2 answers a launch with a
capacity error, or leaves a spot request open in a capacity status, that pool is written
to `STATE_DIR/<cluster>/parked.json` with the time it may be tried again; the planner
(`plan.plan`, given the parked pools) launches elsewhere until then. This module holds the
names and the book; what to launch where is the planner's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import statefiles

#: EC2's words for "no room for this type here now", as API error codes, CreateFleet
#: error codes and spot request status codes
CAPACITY_CODES = frozenset({"InsufficientInstanceCapacity", "capacity-not-available",
                            "capacity-oversubscribed", "MaxSpotInstanceCountExceeded"})

#: (instance type, subnet id or zone or "")
Pool = tuple[str, str]


def pool_text(pool: Pool) -> str:
    """'m5.large in subnet-0a1b2c3d' / 'm5.large (any zone)'."""
    instance_type, place = pool
    return f"{instance_type} in {place}" if place else f"{instance_type} (any zone)"


def clock_text(moment: datetime) -> str:
    """A park's end as the report prints it: UTC to the minute."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Park:
    """One pool EC2 had no capacity in, avoided until `until`; `code` is what EC2 said."""

    pool: Pool
    until: datetime
    code: str

    def text(self) -> str:
        return f"{pool_text(self.pool)} until {clock_text(self.until)} ({self.code})"

    def to_json(self) -> dict[str, str]:
        return {"instance_type": self.pool[0], "place": self.pool[1],
                "until": self.until.isoformat(timespec="seconds"), "code": self.code}


def in_force(parks: Iterable[Park], now: datetime) -> dict[Pool, Park]:
    """The parks not yet over at `now`, by pool (the latest end wins for a pool)."""
    found: dict[Pool, Park] = {}
    for park in parks:
        if park.until > now and (park.pool not in found or park.until > found[park.pool].until):
            found[park.pool] = park
    return found


class ParkBook:
    """The parked pools of one cluster, in `STATE_DIR/<cluster>/parked.json` (mode 0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "parked.json"

    def parked(self, now: datetime) -> dict[Pool, Park]:
        """The pools parked at `now` (no file: none)."""
        return in_force(self._load(), now)

    def park(self, pools: Mapping[Pool, str], now: datetime, minutes: int) -> list[Park]:
        """Park each pool (→ the error code EC2 gave) for `minutes` from `now`; returns the
        new parks. Expired records are dropped on the way; 0 minutes parks nothing."""
        if minutes <= 0 or not pools:
            return []
        until = now + timedelta(minutes=minutes)
        new = [Park(pool, until, code) for pool, code in pools.items()]
        statefiles.ensure_dir(self.path.parent)
        kept = in_force([*self._load(), *new], now)
        text = json.dumps([p.to_json() for p in kept.values()], indent=1, sort_keys=True)
        statefiles.write_atomic(self.path, text.encode("utf-8"))
        return new

    def _load(self) -> list[Park]:
        """Every readable record; a damaged file or record reads as none (a planted link
        or a file that is not ours is refused by `statefiles`)."""
        statefiles.check_dir(self.path.parent)  # a read never creates the folder
        raw = statefiles.read_bytes(self.path)
        try:
            data = json.loads(raw) if raw is not None else []
        except ValueError:
            return []
        return [p for p in map(_record, data if isinstance(data, list) else []) if p]


def _record(value: object) -> Park | None:
    """A record as `ParkBook.park` writes it, else None (hand-edited: dropped, no crash)."""
    if not isinstance(value, dict):
        return None
    fields = [value.get(k) for k in ("instance_type", "place", "until", "code")]
    if not all(isinstance(f, str) for f in fields) or not fields[0]:
        return None
    try:
        until = datetime.fromisoformat(fields[2])
    except ValueError:
        return None
    if until.tzinfo is None:
        return None
    return Park((fields[0], fields[1]), until, fields[3])
