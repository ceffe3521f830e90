"""ClientTokens for creates, remembered in STATE_DIR across crashed passes.

EC2 makes a create idempotent per ClientToken. The token must be the same when a killed
pass is run again and re-makes the same launch decision (its request may not be listed
yet), and must never repeat an old token for a new decision (EC2 would answer with a
long-cancelled request). So the planner names each decision (`plan.launch_key`), and
this book gives each name one random token, written to disk before the create call and
forgotten after an hour, when any retry would long have seen its request.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta
from pathlib import Path

from . import statefiles

REMEMBER = timedelta(hours=1)


class TokenBook:
    """`launch key → ClientToken`, in `STATE_DIR/<tag>/tokens.json` (mode 0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "tokens.json"

    def token_for(self, key: str, now: datetime) -> str:
        """The token already given to this decision within the hour, else a new one."""
        records = {k: v for k, v in self._load().items()
                   if now - datetime.fromisoformat(v["at"]) < REMEMBER}
        if key in records:
            return str(records[key]["token"])
        token = f"dd-{key[:20]}-{secrets.token_hex(8)}"
        records[key] = {"token": token, "at": now.isoformat()}
        self._save(records)
        return token

    def _load(self) -> dict[str, dict[str, str]]:
        """The book, or an empty one if it is missing or damaged (a planted link or a file
        that is not ours is refused by `statefiles`, not treated as damage)."""
        statefiles.ensure_dir(self.path.parent)
        book = statefiles.read_json_object(self.path)
        return {k: v for k, v in book.items() if _is_record(v)}

    def _save(self, records: dict[str, dict[str, str]]) -> None:
        """Atomically and durably: the create call that follows relies on it."""
        text = json.dumps(records, indent=1, sort_keys=True)
        statefiles.write_atomic(self.path, text.encode("utf-8"))


def _is_record(value: object) -> bool:
    """A record as `token_for` writes it (a hand-edited one is dropped, not a crash)."""
    if not (isinstance(value, dict) and isinstance(value.get("token"), str)
            and isinstance(value.get("at"), str)):
        return False
    try:
        when = datetime.fromisoformat(value["at"])
    except ValueError:
        return False
    return when.tzinfo is not None
