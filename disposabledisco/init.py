"""The `init` command's logic: print a complete, valid config to start from."""

from __future__ import annotations

import json
from typing import Any

from disposabledisco.config import SCHEMA_REF, default_config


def render_default_config(cfg: dict[str, Any] | None = None) -> str:
    """The default config (``cfg``, or a fresh one with a new TAG_KEY) as the text `init`
    prints: 2-space JSON ending in a newline.

    Key order follows the schema, so the file reads like docs/config-reference.md.
    """
    return json.dumps(default_config() if cfg is None else cfg, indent=2,
                      ensure_ascii=False) + "\n"


def init_notes(cfg: dict[str, Any]) -> list[str]:
    """What the user must still do to a fresh config, for stderr (stdout is the file)."""
    notes = []
    if not cfg.get("MGMT_KEY"):
        notes.append("warning: MGMT_KEY is empty because no ~/.ssh/id_ed25519.pub, "
                     "id_ecdsa.pub or id_rsa.pub was found, so you cannot log in as the Disco "
                     "user; create one with ssh-keygen -t ed25519 and run init again, or paste "
                     "a public key into MGMT_KEY.")
    notes.append("next: set AMI and KEY_NAME (placeholders now); for your editor to check the "
                 f"file, save the schema next to it: disposabledisco init --schema > "
                 f"{SCHEMA_REF.removeprefix('./')}")
    return notes
