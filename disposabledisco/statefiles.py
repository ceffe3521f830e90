"""Every file under STATE_DIR (lock, token book, pinned host keys, node logs) goes through here.

The tool may run as root, and STATE_DIR may sit in a folder others can write to (/tmp, a
shared home). A link or file planted there must never redirect a write, so:

* a cluster's state folder (and any folder this module creates) must be a real folder,
  not a symbolic link, owned by the caller and writable by nobody else (`ensure_dir`);
* files are opened with O_NOFOLLOW and O_CLOEXEC and must be regular files owned by the
  caller with one link (`open_file`, `read_bytes`), so a planted link or FIFO is refused;
* whole-file writes go to a fresh random temporary name (O_EXCL) and are renamed over the
  target (`write_atomic`, `write_new`), so no fixed name can be pre-planted.

Every refusal is a `StateFileError`: a `ConfigError` (exit 2, nothing changed) whose one
sentence names the path, what was found and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shlex
import stat
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = ["StateFileError", "check_dir", "ensure_dir", "open_file", "read_bytes",
           "read_json_object", "remove", "write_atomic", "write_new"]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class StateFileError(ConfigError):
    """A STATE_DIR folder or file that is not safely ours; exit 2 with one sentence."""

    def __init__(self, message: str) -> None:
        super().__init__([message])


def _refuse(path: Path, found: str, fix: str) -> StateFileError:
    return StateFileError(f"STATE_DIR: {path} {found}, so disposabledisco will not use it; {fix}.")


def check_dir(path: Path) -> None:
    """Refuse `path` unless it is a real folder (not a link) owned by the caller that no
    one else can write to. A missing folder passes (`ensure_dir` creates it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    quoted = shlex.quote(str(path))
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "is a symbolic link", f"remove it (`rm {quoted}`) or point "
                      "STATE_DIR at the real folder")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a folder", "move it away or set STATE_DIR elsewhere")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"is owned by uid {st.st_uid}, not by this user (uid "
                      f"{os.geteuid()})", "set STATE_DIR to a folder of your own")
    if st.st_mode & 0o022:
        raise _refuse(path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})",
                      f"run `chmod 700 {quoted}`")


def ensure_dir(path: Path) -> Path:
    """Create `path` and its missing parents (mode 0700) and check it with `check_dir`.

    Folders created here are checked too; existing parents are not (STATE_DIR may live in
    a shared folder such as /tmp: the cluster's own folder is what must be private).
    """
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass  # another run made it first: checked below like any existing folder
        except OSError as error:
            raise _refuse(folder, f"cannot be created ({error.strerror or error})",
                          "set STATE_DIR to a folder you can write to") from None
        check_dir(folder)
    check_dir(path)
    return path


def open_file(path: Path, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o600) -> int:
    """A file descriptor of `path` (created with `mode` if `flags` has O_CREAT), never
    through a link: refused unless it is a regular file owned by the caller with one link.
    Callers close it."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _refuse(path, "is a symbolic link", "remove it; state files are never "
                          "followed through links") from None
        raise
    try:
        _check_file(path, os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "is not a regular file", "remove it")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"is owned by uid {st.st_uid}, not by this user", "remove it")
    if st.st_nlink != 1:
        raise _refuse(path, f"has {st.st_nlink} hard links", "remove it")


def read_bytes(path: Path, limit: int = 16 * 1024 * 1024) -> bytes | None:
    """The content of a state file (at most `limit` bytes), or None if it does not exist."""
    try:
        fd = open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    chunks: list[bytes] = []
    with os.fdopen(fd, "rb") as handle:  # in pieces: read(limit) would allocate all of it
        while limit > 0 and (chunk := handle.read(min(limit, 64 * 1024))):
            chunks.append(chunk)
            limit -= len(chunk)
    return b"".join(chunks)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object a state file holds; {} when it is missing or damaged (a book the
    tool can rebuild), while a planted link or a file that is not ours is refused."""
    raw = read_bytes(path)
    try:
        data = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_temporary(path: Path, data: bytes, mode: int) -> Path:
    """`data` in a new file next to `path` under a random name, flushed to disk."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary


def _sync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` all at once and durably; a link at `path` is replaced
    itself, never written through."""
    temporary = _write_temporary(path, data, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create `path` with `data` only if nothing exists there (not even a link); True if
    this call created it (first writer wins, atomically)."""
    temporary = _write_temporary(path, data, mode)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    _sync_dir(path.parent)
    return True


def remove(path: Path) -> bool:
    """Delete a state file (a link is removed itself); True if there was one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
