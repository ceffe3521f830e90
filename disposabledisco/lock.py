"""One run at a time per cluster: an advisory `flock` in the cluster's state directory.

The kernel drops the lock when the process dies, so a killed cron run never leaves a
stale lock behind. The folder and the lock file go through `statefiles`: a lock that is a
planted link (to a file root would then truncate) is refused, not followed.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import statefiles


class LockHeld(Exception):
    """Another run holds this cluster's lock."""


@contextmanager
def cluster_lock(state_dir: Path) -> Iterator[Path]:
    """Hold the cluster's lock for the duration of the block, or raise `LockHeld` at once."""
    path = statefiles.ensure_dir(state_dir) / "lock"
    fd = statefiles.open_file(path)  # never through a planted link
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(f"another disposabledisco run (pid {holder}) holds the lock {path}; "
                           "this run changed nothing, try again when it finishes") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)
