"""Idle shutdown (IDLE_MINUTES, IDLE_ACTION): is the cluster unused, and is it asleep?

Idle is asked of Disco on the master (templates/idle_probe.py, one short SSH command per
pass, only when IDLE_MINUTES is set). The last activity is the latest of: a job's start,
the last time the probe saw a job running, and Disco's own start (so a fresh cluster
where no job ever ran gets IDLE_MINUTES of grace). A running job is activity now. Any
answer that cannot be read means "not idle" with a warning: never stop a cluster on a guess.

After the idle action the cluster is asleep: STATE_DIR/idle.json records the action and
the config's slave count at that moment. A pass keeps the cluster asleep (no slaves, and
no master either after "down") while the config's count is the recorded one; when the
user changes the count, or sets IDLE_MINUTES to null, the record is removed and the pass
brings the cluster back as usual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from . import statefiles
from .config import Config
from .plan import Action

STATE_FILE = "idle.json"


@dataclass(frozen=True)
class Probe:
    """The master's answer, parsed; times are the master's clock."""

    now: datetime
    jobs: tuple[tuple[datetime, str, str], ...]  # (start, status, name)
    started: datetime | None = None
    seen_active: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    idle: bool
    #: what the pass says: when the cluster was last used, or why that is unknown
    note: str
    warning: str | None = None


def _epoch(text: str) -> datetime:
    value = int(text)
    if not 0 < value < 2**33:
        raise ValueError(f"time {text!r} out of range")
    return datetime.fromtimestamp(value, timezone.utc)


def parse_probe(output: str) -> Probe:
    """Read idle_probe.py's lines; ValueError says what is missing or damaged."""
    facts: dict[str, str] = {}
    for line in output.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("now", "started", "joblist", "seen-active", "error"):
            facts[word] = rest.strip()
    if "error" in facts:
        raise ValueError(f"Disco did not answer: {facts['error']}")
    if "now" not in facts or "joblist" not in facts:
        raise ValueError("the master's answer has no clock or no job list")
    listing = json.loads(facts["joblist"])
    if not isinstance(listing, list):
        raise ValueError("the job list is not a list")
    jobs = []
    for entry in listing:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
                and not isinstance(entry[0], bool)
                and all(isinstance(x, str) for x in entry[1:])):
            raise ValueError(f"unreadable job list entry {entry!r}"[:200])
        jobs.append((_epoch(str(entry[0])), entry[1], entry[2]))
    return Probe(now=_epoch(facts["now"]), jobs=tuple(jobs),
                 started=_epoch(facts["started"]) if "started" in facts else None,
                 seen_active=_epoch(facts["seen-active"]) if "seen-active" in facts else None)


def judge(output: str, minutes: int) -> Verdict:
    """Idle when nothing happened on Disco for `minutes` (at or beyond the boundary)."""
    try:
        probe = parse_probe(output)
    except (ValueError, TypeError) as error:  # json raises ValueError subclasses
        return Verdict(False, "idle check: unknown", f"idle check skipped: {error}"[:300])
    running = [name for _, status, name in probe.jobs if status == "active"]
    if running:
        return Verdict(False, f"not idle: job {running[0]} is running")
    moments = [start for start, _, _ in probe.jobs]
    moments += [m for m in (probe.started, probe.seen_active) if m is not None]
    if not moments:
        return Verdict(False, "idle check: unknown",
                       "idle check skipped: no job ever ran and Disco's start time is unknown")
    last = max(moments)
    quiet = probe.now - last
    note = f"no Disco job for {_minutes(quiet)} (last activity {last:%Y-%m-%d %H:%M} UTC)"
    return Verdict(quiet >= timedelta(minutes=minutes), note)


def _minutes(span: timedelta) -> str:
    return f"{max(0, int(span.total_seconds() // 60))} min"


@dataclass(frozen=True)
class Sleep:
    """The record of an idle action: the cluster stays so while the count is `slaves`."""

    action: str  # IDLE_ACTION at the time
    slaves: int  # the config's slave count at the time
    since: str  # ISO time of the action


def read_sleep(config: Config) -> Sleep | None:
    """The record, or None (a damaged record counts as none: the cluster wakes up)."""
    data = statefiles.read_bytes(config.state_dir / STATE_FILE)
    if data is None:
        return None
    try:
        raw: Any = json.loads(data)
        sleep = Sleep(str(raw["action"]), int(raw["slaves"]), str(raw["since"]))
    except (ValueError, KeyError, TypeError):
        return None
    return sleep if sleep.action in ("down", "slaves-to-zero") else None


def write_sleep(config: Config, sleep: Sleep) -> None:
    statefiles.ensure_dir(config.state_dir)
    statefiles.write_atomic(config.state_dir / STATE_FILE, json.dumps(
        {"action": sleep.action, "slaves": sleep.slaves, "since": sleep.since}).encode())


def clear_sleep(config: Config) -> None:
    statefiles.remove(config.state_dir / STATE_FILE)


def zero_slaves(config: Config) -> Config:
    """The config with every slave group at count 0 (what a slaves-to-zero sleep wants)."""
    values = dict(config.values)
    if values.get("SLAVE_GROUPS") is not None:
        values["SLAVE_GROUPS"] = [{**g, "COUNT": 0} for g in values["SLAVE_GROUPS"]]
    else:
        values["NUM_SLAVES"] = 0
    return Config(values, config.path, config.warnings)


@dataclass(frozen=True)
class IdleNote(Action):
    """Not a step: what the idle check decided, shown among the pass's results."""

    text: str = ""

    @property
    def mutates_ec2(self) -> bool:
        return False

    def describe(self) -> str:
        return self.text


def wake_text(sleep: Sleep) -> str:
    """How the user brings an asleep cluster back."""
    return (f"asleep since {sleep.since} ({sleep.action} after IDLE_MINUTES idle); change "
            f"the slave count (now {sleep.slaves}) or set IDLE_MINUTES to null to bring it "
            f"back")
