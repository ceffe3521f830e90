"""Carry state over from older folder layouts, so an upgrade never weakens host-key checks.

Before state folders were per region (`STATE_DIR/<TAG_KEY>@<region>`), a cluster's pinned
host keys lived in `STATE_DIR/<TAG_KEY>`. Losing them would silently put every node back
on trust-on-first-use; instance ids are unique across regions, so every old pin is valid
wherever the cluster now runs.
"""

from __future__ import annotations

import os

from . import statefiles
from .config import Config
from .hostkeys import HostKeyStore


def carry_over_pins(config: Config) -> int:
    """Copy the old folder's pins into the cluster's folder the first time it is used;
    returns how many were carried (0 when there is nothing to do)."""
    old, new = config.legacy_state_dir, config.state_dir
    old_keys = old / "hostkeys"
    if os.path.lexists(new) or not os.path.lexists(old_keys):
        return 0
    statefiles.check_dir(old)  # ours, no link, writable by nobody else: else exit 2
    statefiles.check_dir(old_keys)
    source, target = HostKeyStore(old), HostKeyStore(new)
    carried = 0
    for name in sorted(os.listdir(old_keys)):
        if name.startswith("."):  # a temporary of an interrupted write
            continue
        try:
            key = source.get(name)
        except ValueError:  # not an instance id, or a damaged pin: nothing to carry
            continue
        if key is not None:
            statefiles.ensure_dir(new)
            target.pin(name, key)
            carried += 1
    return carried
