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
import os
import secrets
from datetime import datetime, timedelta
from pathlib import Path

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
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, records: dict[str, dict[str, str]]) -> None:
        """Atomically and durably: the create call that follows relies on it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(records, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
