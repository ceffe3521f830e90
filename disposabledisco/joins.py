"""What each slave's master was given when it joined, kept in STATE_DIR beside the pins.

A slave's `disposabledisco:joined` tag names only its master and the join inputs
(`cluster.join_tag`), so every slave joined in a pass shares one value and one CreateTags
call. The part that differs per slave, which of its host keys the master was told to
trust (the master's known_hosts is written from our pin), lives here: after a join worked
and before its tag is written, each slave gets `cluster.join_record(master, suffix, pin)`.
Pins are local too, so the record can be checked wherever the pin can.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import statefiles


class JoinBook:
    """`instance id → join record`, in `<cluster state folder>/joins.json` (mode 0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "joins.json"

    def read(self) -> dict[str, str]:
        """Every record; a missing or damaged book is empty (its slaves join again), while
        a planted link or a file that is not ours is refused by `statefiles`."""
        book = statefiles.read_json_object(self.path)
        return {k: v for k, v in book.items() if isinstance(v, str)}

    def record(self, records: Mapping[str, str], live: Iterable[str]) -> None:
        """Add these records, durably (the tag call that follows relies on them), and drop
        those of instances not in `live` so the book does not grow with churn."""
        statefiles.ensure_dir(self.path.parent)
        keep = set(live) | set(records)
        book = {k: v for k, v in self.read().items() if k in keep}
        book.update(records)
        statefiles.write_atomic(self.path, json.dumps(book, indent=0, sort_keys=True)
                                .encode("utf-8"))
