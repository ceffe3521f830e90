"""The SSH gateway: the only module that talks SSH (and the only paramiko user).

What it gives the rest of the tool:

* :meth:`SshGateway.connect` — a :class:`Session` to one instance, retried with
  exponential backoff and jitter until a per-target deadline while the instance boots
  (connection refused or timing out, sshd banner not ready, our key not installed yet,
  host key not verifiable yet). Never a fixed sleep.
* host keys checked through :mod:`disposabledisco.hostkeys` from a paramiko
  ``MissingHostKeyPolicy`` (no ``known_hosts`` file is read, nothing is auto-added
  blindly, and no strict checking is ever turned off);
* :class:`Session` — ``run`` (scripts travel on stdin, never on the command line),
  atomic ``write_file`` (also root-owned files via ``sudo -n install``, and an
  unprivileged user's files written as that user, never through a planted link),
  ``read_file``;
* every failure has a fault class (:func:`fault_of`: the node's, the config's, or a
  host-key refusal), which decides whether it counts toward replacing the node;
* every command, its exit status and its output appended to ``LOG_DIR/<instance>.log``
  (output of ``secret=True`` calls and registered secret values never written);
* :meth:`SshGateway.run_parallel` — a pool as wide as the nodes that need work (up to
  ``SSH_CONCURRENCY``, within the open-file limit, which it raises when it can) where
  each target has its own deadline, so a slow or dead node never blocks or fails the
  others;
* in-pass memory of the nodes it gave up on (:meth:`SshGateway.begin_pass`): a node that
  stopped answering costs one deadline per pass, and later steps of the same pass fail it
  at once with :class:`GivenUp` instead of waiting for it again.

Errors are :class:`SshError` subclasses whose message is one line naming the instance id
and address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import random
import re
import resource
import secrets as _secrets
import select
import shlex
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import paramiko

from . import hostkeys, statefiles

log = logging.getLogger(__name__)
# paramiko logs every failed handshake with a traceback; while an instance boots those are
# expected and retried. Without this, Python's last-resort handler would print them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

__all__ = [
    "AuthenticationFailed",
    "CommandFailed",
    "CommandTimeout",
    "ConnectionLost",
    "FileTransferFailed",
    "GivenUp",
    "HostKeyMismatch",
    "HostKeyUnverified",
    "Outcome",
    "Result",
    "Session",
    "SshError",
    "SshGateway",
    "SshSettings",
    "Target",
    "Unreachable",
    "fault_of",
]

T = TypeVar("T")

_STDIN_INLINE = 256 * 1024  # larger stdin is fed from a thread so output can flow meanwhile
_TAIL_LINES = 400
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: exit status of a node script refusing for a reason that is the config's, not the node's
#: (sysexits' EX_CONFIG; bootstrap renders it into every node script for lib.sh)
EXIT_CONFIG = 78
#: exit status of a node script refusing a path someone planted (sysexits' EX_NOPERM;
#: rendered into every node script the same way)
EXIT_TAMPER = 77
#: Who is to blame for a failure, which decides whether it counts against the node:
#: "node" counts toward replacing it; "config" (a fresh node would fail the same) and
#: "hostkey" (possible man in the middle: the operator must look, the evidence must stay)
#: and "tamper" (a link or FIFO planted in the Disco user's files: same, and a fresh node
#: running the same jobs could be planted again) never do.
FAULTS = ("node", "config", "hostkey", "tamper")
#: file descriptors one node in flight may hold: its socket, the pipe paramiko makes to
#: wait on a channel (two ends), and one spare (SFTP, its log file being appended)
FDS_PER_NODE = 4
#: file descriptors kept free for everything else of this process (state files, EC2 calls)
FD_RESERVE = 64
#: how the node scripts' `die` starts its one line (templates/lib.sh)
SCRIPT_ERROR_PREFIX = "disposabledisco: ERROR: "

#: sh functions for files in a directory some unprivileged user can write: root only lstats
#: them (GNU stat without -L); anything but a regular file with one link owned by that user
#: is refused, naming the node, the path and what was found, with EXIT_TAMPER (as lib.sh's
#: refuse_path: planted, so never counted against the node).
_OWNED_FILE_CHECK = r"""
check() {
  f=$(stat -c '%F|%h|%U' -- "$1" 2>/dev/null) || {
    [ "${2:-}" = missing-ok ] && return 0
    echo "refusing $1 on $(hostname -s): it is missing" >&2; exit 1; }
  case $f in
  "regular file|1|$U" | "regular empty file|1|$U") ;;
  *) echo "refusing $1 on $(hostname -s): found ${f%%|*} (links/owner: ${f#*|})," \
       "expected a regular file owned by $U with one link" >&2
     exit """ + str(EXIT_TAMPER) + r""" ;;
  esac
}
"""


# ---------------------------------------------------------------------------- types
@dataclass(frozen=True)
class SshSettings:
    """How to reach nodes. ``deadline_seconds`` bounds the retries of one connect (the
    time an instance may take to boot); ``connect_timeout`` bounds one attempt."""

    user: str = "ubuntu"
    port: int = 22
    key_file: str | None = None
    connect_timeout: float = 10.0
    deadline_seconds: float = 600.0
    #: nodes worked on at once; node work is waiting on the node (apt, boot), not our CPU,
    #: so the pool is as wide as the nodes that need work, up to this
    concurrency: int = 1024
    log_dir: str | os.PathLike[str] | None = None
    #: default timeout of one command (None: no limit; run_parallel's timeout still holds)
    command_timeout: float | None = None
    #: handshakes in flight to one address at a time (sshd's MaxStartups drops the rest)
    per_host_connects: int = 4
    #: how long a node may keep refusing our key (cloud-init installs it shortly after
    #: sshd starts) before we give up early: a wrong key should not wait the full deadline
    auth_retry_seconds: float = 90.0
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    keepalive_seconds: int = 15


@dataclass(frozen=True)
class Target:
    """One instance to reach: its id (for host keys and logs), address, and a label."""

    instance_id: str
    address: str
    name: str = ""


@dataclass(frozen=True)
class Result:
    """What a command did. ``stdout``/``stderr`` are decoded text; ``raw_stdout`` keeps
    the exact bytes (file contents)."""

    status: int
    stdout: str
    stderr: str
    raw_stdout: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """Per-target result of :meth:`SshGateway.run_parallel`."""

    ok: bool
    value: T | None = None
    #: one line naming the instance and what went wrong ("" when ok)
    error: str = ""
    #: the last lines of the node's log, for failure reports
    log_tail: tuple[str, ...] = ()
    seconds: float = 0.0
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    #: who is to blame when not ok: one of FAULTS (see fault_of)
    fault: str = "node"
    #: failed only because the node was given up earlier in this pass (GivenUp): that
    #: earlier failure was reported and counted, this one must not be counted again
    given_up: bool = False


def fault_of(exc: BaseException | None) -> str:
    """The fault class of a failure: an exception may say (``fault`` attribute: host-key
    refusals, bootstrap inputs); a node script says "config" by exiting EXIT_CONFIG;
    anything else is the node's."""
    fault = getattr(exc, "fault", None)
    if fault in FAULTS:
        return fault
    if isinstance(exc, CommandFailed) and exc.status == EXIT_CONFIG:
        return "config"
    if isinstance(exc, CommandFailed) and exc.status == EXIT_TAMPER:
        return "tamper"
    return "node"


# ---------------------------------------------------------------------------- errors
def _one_line(text: str, limit: int = 600) -> str:
    flat = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class SshError(Exception):
    """Base of every SSH failure: one line, starting with ``instance-id (address):``."""

    def __init__(self, target: Target | None, message: str) -> None:
        self.target = target
        self.instance_id = target.instance_id if target else ""
        self.address = target.address if target else ""
        prefix = f"{target.instance_id} ({target.address}): " if target else ""
        super().__init__(_one_line(prefix + message))


class Unreachable(SshError):
    """No SSH session could be opened before the target's deadline."""


class AuthenticationFailed(Unreachable):
    """sshd answered but never accepted our key before the deadline."""


class GivenUp(Unreachable):
    """The node was given up earlier in this pass (it stopped answering): failed at once,
    without a new connection attempt, and already reported and counted then."""


class HostKeyMismatch(SshError):
    """The host key was refused (changed since pinned, or not the one in the console)."""

    fault = "hostkey"


class HostKeyUnverified(Unreachable):
    """The host key could not be verified before the deadline (no console fingerprints)."""


class CommandFailed(SshError):
    """A command exited non-zero; ``status`` and the last stderr lines are kept."""

    def __init__(self, target: Target, command: str, status: int, stderr_tail: str) -> None:
        self.command = command
        self.status = status
        self.stderr_tail = stderr_tail
        detail = f": {stderr_tail}" if stderr_tail else ""
        super().__init__(target, f"`{_short(command)}` exited with status {status}{detail}")


class FileTransferFailed(CommandFailed):
    """An SFTP read or write failed (permission denied, no such directory…)."""

    def __init__(self, target: Target, verb: str, path: str, reason: str) -> None:
        self.command = f"{verb} {path}"
        self.status = -1
        self.stderr_tail = reason
        SshError.__init__(self, target, f"cannot {verb} {path}: {reason}")


class CommandTimeout(SshError):
    """A command did not finish within its timeout (its channel was closed)."""


class ConnectionLost(SshError):
    """The session died under a command (node gone, sshd killed, deadline reached)."""


def _short(command: str, limit: int = 120) -> str:
    flat = " ".join(command.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return "connection refused"
    if isinstance(exc, EOFError):
        return "connection closed during the SSH handshake"
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror.lower()
    return _one_line(text, 200)


# ---------------------------------------------------------------------------- logs
class _NodeLogs:
    """Per-instance log files plus an in-memory tail; secret values are redacted."""

    def __init__(self, log_dir: str | os.PathLike[str] | None,
                 redact: Callable[[str], str]) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._redact = redact
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._tails: dict[str, deque[str]] = {}
        if self.log_dir is not None:
            statefiles.ensure_dir(self.log_dir)

    def path(self, instance_id: str) -> Path | None:
        if self.log_dir is None:
            return None
        if not _SAFE_ID.match(instance_id):
            raise ValueError(f"not a valid instance id for a log file: {instance_id!r}")
        return self.log_dir / f"{instance_id}.log"

    def write(self, instance_id: str, lines: Iterable[str]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        text = [f"{stamp} {self._redact(line)}" for line in lines]
        with self._lock:
            lock = self._locks.setdefault(instance_id, threading.Lock())
            tail = self._tails.setdefault(instance_id, deque(maxlen=_TAIL_LINES))
        with lock:
            tail.extend(text)
            path = self.path(instance_id)
            if path is None:
                return
            try:  # never through a planted link (see statefiles)
                fd = statefiles.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                with os.fdopen(fd, "a", encoding="utf-8", errors="replace") as f:
                    f.write("".join(line + "\n" for line in text))
            except (OSError, statefiles.StateFileError) as exc:
                log.warning("cannot write SSH log %s: %s", path, exc)

    def tail(self, instance_id: str, n: int) -> list[str]:
        with self._lock:
            tail = self._tails.get(instance_id)
        if tail is not None:
            return list(tail)[-n:] if n > 0 else []
        path = self.path(instance_id)
        if path is None or n <= 0:
            return []
        try:
            fd = statefiles.open_file(path, os.O_RDONLY)
        except (OSError, statefiles.StateFileError):
            return []
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=n)]


def _output_lines(prefix: str, data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    return [f"  {prefix} {line}" for line in text.splitlines()]


# ---------------------------------------------------------------------------- host keys
class _VerifyingPolicy(paramiko.MissingHostKeyPolicy):
    """Every server key reaches this policy (the client loads no known_hosts), and it is
    accepted only if :class:`hostkeys.HostKeyVerifier` says so."""

    def __init__(self, gateway: SshGateway, target: Target) -> None:
        self.gateway = gateway
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        offered = hostkeys.HostKey.from_blob(key.asbytes())
        how = self.gateway.verifier.verify(self.target.instance_id, self.target.address,
                                           offered)
        self.gateway._log(self.target, [
            f"host key {offered.keytype} {offered.fingerprint} accepted ({how})"])
        if how == "insecure":
            log.warning("%s (%s): host key %s accepted without verification "
                        "(HOST_KEY_POLICY insecure)", self.target.instance_id,
                        self.target.address, offered.fingerprint)


# ---------------------------------------------------------------------------- pool
def pool_size(concurrency: int, nodes: int) -> int:
    """How many of ``nodes`` are worked on at once: all of them up to ``concurrency``
    (node work waits on the nodes, so one wave is as fast as one node), within what the
    open-file limit allows, which is raised first as far as its hard limit lets it."""
    wanted = max(1, min(concurrency, nodes))
    in_use = _open_files()
    need = in_use + FD_RESERVE + wanted * FDS_PER_NODE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    if soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    fits = max(1, (soft - in_use - FD_RESERVE) // FDS_PER_NODE)
    if fits < wanted:
        log.warning("the open-file limit (%d) lets only %d of %d nodes be worked on at once; "
                    "raise it (ulimit -n %d) for one wave", soft, fits, wanted, need)
    return min(wanted, fits)


def _open_files() -> int:
    """File descriptors this process holds now (0 where the system cannot tell)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder))
    return 0


# ---------------------------------------------------------------------------- gateway
class SshGateway:
    """Opens sessions to instances and runs work on many of them in parallel."""

    def __init__(self, settings: SshSettings, verifier: hostkeys.HostKeyVerifier) -> None:
        self.settings = settings
        self.verifier = verifier
        self._secrets: set[str] = set()
        self._logs = _NodeLogs(settings.log_dir, self._redact)
        self._lock = threading.Lock()
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._closing = threading.Event()
        self._pkey: paramiko.PKey | None = None
        self._sessions_opened = 0
        self._commands_run = 0
        self._connect_attempts = 0
        #: instance id -> why it was given up, for the rest of this pass (begin_pass)
        self._given_up: dict[str, str] = {}

    # -- counters (thread-safe; for tests and benchmarks)
    @property
    def sessions_opened(self) -> int:
        return self._sessions_opened

    @property
    def commands_run(self) -> int:
        return self._commands_run

    @property
    def connect_attempts(self) -> int:
        return self._connect_attempts

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    # -- nodes given up in this pass
    def begin_pass(self) -> None:
        """A new pass: every node gets its chance again (a node given up in the last pass
        may be back, and the pass after a failure is where its failures are counted)."""
        with self._lock:
            self._given_up.clear()

    def give_up(self, target: Target, reason: str) -> None:
        """Remember for the rest of the pass that ``target`` stopped answering: later
        steps fail it at once (GivenUp) instead of spending another deadline on it."""
        prefix = f"{target.instance_id} ({target.address}): "
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
        with self._lock:
            first = target.instance_id not in self._given_up
            self._given_up.setdefault(target.instance_id, reason)
        if first:
            self._log(target, [f"GIVEN UP for the rest of this pass: {reason}"])

    def given_up(self) -> dict[str, str]:
        """The nodes given up in this pass and why (instance id -> reason)."""
        with self._lock:
            return dict(self._given_up)

    # -- secrets and logs
    def redact(self, *values: str) -> None:
        """Never write these values to a log or an error message (cookie, keys…)."""
        with self._lock:
            self._secrets.update(v for v in values if v and len(v) >= 4)

    def _redact(self, text: str) -> str:
        for value in self._secrets:
            if value in text:
                text = text.replace(value, "***")
        return text

    def _log(self, target: Target, lines: Iterable[str]) -> None:
        self._logs.write(target.instance_id, lines)

    def log_path(self, instance_id: str) -> Path | None:
        """Where the node's log is written (None without ``log_dir``)."""
        return self._logs.path(instance_id)

    def tail(self, instance_id: str, n: int = 20) -> list[str]:
        """The last ``n`` log lines of a node (for failure reports)."""
        return self._logs.tail(instance_id, n)

    # -- lifecycle
    def close(self) -> None:
        """Abort pending connect retries (sessions already open stay usable)."""
        self._closing.set()

    def __enter__(self) -> SshGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connect
    def _private_key(self) -> paramiko.PKey | None:
        if self.settings.key_file is None:
            return None
        with self._lock:
            if self._pkey is None:
                path = os.path.expanduser(self.settings.key_file)
                try:
                    self._pkey = paramiko.PKey.from_path(path)
                except paramiko.PasswordRequiredException as exc:
                    raise SshError(None, f"SSH key file {path} is encrypted: load it into "
                                         "ssh-agent and leave SSH_KEY_FILE unset") from exc
                except (OSError, paramiko.SSHException, ValueError) as exc:
                    raise SshError(None, f"cannot read SSH key file {path}: "
                                         f"{_describe(exc)}") from exc
            return self._pkey

    def _slot(self, address: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._host_slots.get(address)
            if slot is None:
                slot = threading.BoundedSemaphore(max(1, self.settings.per_host_connects))
                self._host_slots[address] = slot
            return slot

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: spreads retries of many nodes apart."""
        ceiling = min(self.settings.backoff_max,
                      self.settings.backoff_initial * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)

    def connect(self, target: Target, *, deadline_seconds: float | None = None) -> Session:
        """Open a session to ``target``, retrying until ``deadline_seconds`` (default:
        the settings') while the instance boots. Raises :class:`Unreachable` (or
        :class:`AuthenticationFailed`, :class:`HostKeyUnverified`) at the deadline and
        :class:`HostKeyMismatch` at once."""
        budget = self.settings.deadline_seconds if deadline_seconds is None else deadline_seconds
        with self._lock:
            reason = self._given_up.get(target.instance_id)
        if reason is not None:
            raise GivenUp(target, f"given up earlier in this pass, not tried again: {reason}")
        try:
            pkey = self._private_key()
        except SshError as exc:
            raise SshError(target, str(exc)) from exc
        start = time.monotonic()
        end = start + budget
        attempt = 0
        kind, last = Unreachable, "no attempt was made"
        auth_failing_since: float | None = None
        while not self._closing.is_set():
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            attempt += 1
            self._count("_connect_attempts")
            timeout = max(0.05, min(self.settings.connect_timeout, remaining))
            slot = self._slot(target.address)
            if not slot.acquire(timeout=timeout):
                kind, last = Unreachable, "too many connections to this address in flight"
                continue
            try:
                client = self._open(target, pkey, timeout)
            except hostkeys.HostKeyPending as exc:
                kind, last = HostKeyUnverified, str(exc).split(": ", 1)[-1]
            except hostkeys.HostKeyError as exc:
                self._log(target, [f"REFUSED: {exc}"])
                raise HostKeyMismatch(target, _strip_prefix(str(exc), target)) from exc
            except paramiko.AuthenticationException as exc:
                kind = AuthenticationFailed
                last = f"authentication as {self.settings.user} failed ({_describe(exc)})"
                now = time.monotonic()
                auth_failing_since = auth_failing_since or now
                if now - auth_failing_since >= self.settings.auth_retry_seconds:
                    self._log(target, [f"connect attempt {attempt} failed: {last}"])
                    raise AuthenticationFailed(
                        target, f"{last}; still refused after "
                        f"{self.settings.auth_retry_seconds:g} s: is the key "
                        f"({self.settings.key_file or 'ssh-agent/default keys'}) "
                        "the instance's key pair?") from exc
            except (OSError, paramiko.SSHException, EOFError) as exc:
                kind, last = Unreachable, _describe(exc)
                auth_failing_since = None
            else:
                self._count("_sessions_opened")
                took = time.monotonic() - start
                self._log(target, [f"connected as {self.settings.user} to "
                                   f"{target.address}:{self.settings.port} after {attempt} "
                                   f"attempt(s), {took:.2f} s"])
                return Session(self, target, client)
            finally:
                slot.release()
            delay = min(self._backoff(attempt), max(0.0, end - time.monotonic()))
            self._log(target, [f"connect attempt {attempt} failed: {last}; "
                               f"next in {delay:.2f} s" if delay > 0 else
                               f"connect attempt {attempt} failed: {last}"])
            if delay > 0 and self._closing.wait(delay):
                break
        if self._closing.is_set():
            raise Unreachable(target, "gave up connecting: the SSH gateway was closed")
        message = f"no SSH session within {budget:g} s ({attempt} attempts): {last}"
        self.give_up(target, message)
        raise kind(target, message)

    def _open(self, target: Target, pkey: paramiko.PKey | None,
              timeout: float) -> paramiko.SSHClient:
        sock = socket.create_connection((target.address, self.settings.port), timeout=timeout)
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_VerifyingPolicy(self, target))
        try:
            client.connect(
                target.address,
                port=self.settings.port,
                username=self.settings.user,
                pkey=pkey,
                allow_agent=pkey is None,
                look_for_keys=pkey is None,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                sock=sock,
            )
        except BaseException:
            client.close()
            sock.close()
            raise
        transport = client.get_transport()
        if transport is not None and self.settings.keepalive_seconds:
            transport.set_keepalive(self.settings.keepalive_seconds)
        return client

    # -- parallel
    def run_parallel(
        self,
        targets: Iterable[Target],
        fn: Callable[[Session], T],
        *,
        timeout: float | None = None,
    ) -> dict[str, Outcome[T]]:
        """Connect to every target and call ``fn(session)``, at most ``concurrency`` at
        once. Each target has its own deadline: connecting is bounded by
        ``deadline_seconds``, and with ``timeout`` the whole of a target's work (connect
        + ``fn``) is cut off after that many seconds by closing its session. Failures
        become ``Outcome(ok=False, error=…)``; they never stop the other targets."""
        targets = list(targets)
        ids = [t.instance_id for t in targets]
        if len(set(ids)) != len(ids):
            raise ValueError("run_parallel: duplicate instance ids in targets")
        if not targets:
            return {}
        connect_budget = self.settings.deadline_seconds
        if timeout is not None:
            connect_budget = min(connect_budget, timeout)
        live: dict[str, tuple[float, Session | None]] = {}
        expired: set[str] = set()
        live_lock = threading.Lock()

        def work(target: Target) -> Outcome[T]:
            started = time.monotonic()
            with live_lock:
                live[target.instance_id] = (started, None)
            session: Session | None = None
            try:
                session = self.connect(target, deadline_seconds=connect_budget)
                with live_lock:
                    live[target.instance_id] = (started, session)
                    cut = target.instance_id in expired
                if cut:
                    raise ConnectionLost(target, "deadline reached")
                with session:
                    value = fn(session)
                return Outcome(ok=True, value=value, seconds=time.monotonic() - started)
            except Exception as exc:
                if isinstance(exc, GivenUp):
                    self._log(target, [f"SKIPPED: {exc}"])
                    return Outcome(ok=False, error=self._redact(str(exc)), exception=exc,
                                   given_up=True)
                if target.instance_id in expired:
                    error = f"{target.instance_id} ({target.address}): gave up after " \
                            f"{timeout:g} s (per-node deadline)"
                    self.give_up(target, error)
                elif isinstance(exc, SshError):
                    error = str(exc)
                else:
                    error = _one_line(f"{target.instance_id} ({target.address}): "
                                      f"{type(exc).__name__}: {exc}")
                error = self._redact(error)
                self._log(target, [f"FAILED: {error}"])
                return Outcome(ok=False, error=error, log_tail=tuple(self.tail(
                    target.instance_id)), seconds=time.monotonic() - started, exception=exc,
                    fault="node" if target.instance_id in expired else fault_of(exc))
            finally:
                with live_lock:
                    live.pop(target.instance_id, None)

        results: dict[str, Outcome[T]] = {}
        workers = pool_size(self.settings.concurrency, len(targets))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ssh") as pool:
            futures: dict[Future[Outcome[T]], Target] = {
                pool.submit(work, t): t for t in targets}
            pending = set(futures)
            while pending:
                wait_for = None
                if timeout is not None:
                    now = time.monotonic()
                    with live_lock:
                        for iid, (started, session) in live.items():
                            if now - started >= timeout and iid not in expired:
                                expired.add(iid)
                                if session is not None:
                                    session.close()
                        starts = [s for i, (s, _) in live.items() if i not in expired]
                    wait_for = max(0.01, min((s + timeout - now for s in starts),
                                             default=timeout))
                done, pending = wait_futures(pending, timeout=wait_for,
                                             return_when=FIRST_COMPLETED)
                for future in done:
                    results[futures[future].instance_id] = future.result()
        return {iid: results[iid] for iid in ids}


def _strip_prefix(message: str, target: Target) -> str:
    """Drop hostkeys' own "of ID (ADDRESS)" since SshError names the target already."""
    return message.replace(f"host key of {target.instance_id} ({target.address}) ",
                           "host key ", 1)


# ---------------------------------------------------------------------------- session
class Session:
    """One SSH connection to one instance. Use as a context manager; not for sharing
    between threads that run commands at the same time on the same channel (separate
    ``run`` calls from several threads are fine: each gets its own channel)."""

    def __init__(self, gateway: SshGateway, target: Target, client: paramiko.SSHClient) -> None:
        self.gateway = gateway
        self.target = target
        self._client = client
        self._sftp: paramiko.SFTPClient | None = None
        self._home: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (also interrupts a command running in another thread)."""
        self._closed = True
        with contextlib.suppress(Exception):
            if self._sftp is not None:
                self._sftp.close()
        with contextlib.suppress(Exception):
            self._client.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _log(self, lines: Iterable[str]) -> None:
        self.gateway._log(self.target, lines)

    def _lost(self, what: str, exc: BaseException | None = None) -> ConnectionLost:
        """The session died under us: the node is given up for the rest of the pass,
        unless we closed the session ourselves."""
        why = "session closed" if self._closed else (
            _describe(exc) if exc is not None else "connection lost")
        lost = ConnectionLost(self.target, f"{what}: {why}")
        if not self._closed:
            self.gateway.give_up(self.target, str(lost))
        return lost

    def _timed_out(self, timeout: float | None) -> CommandTimeout:
        """A command that outlived its timeout: the node no longer answers in time, so it
        is given up for the rest of the pass."""
        error = CommandTimeout(self.target, f"command timed out after {timeout:g} s")
        self.gateway.give_up(self.target, str(error))
        return error

    # -- commands
    def run(
        self,
        command: str,
        *,
        stdin: bytes | str | None = None,
        sudo: bool = False,
        timeout: float | None = None,
        secret: bool = False,
        check: bool = True,
    ) -> Result:
        """Run a shell command line as the login user (``sudo``: as root via
        ``sudo -n``). Feed scripts and secrets through ``stdin``, never in ``command``
        (it shows in the process list). ``secret`` keeps the output out of logs and
        errors. ``check`` raises :class:`CommandFailed` on a non-zero exit."""
        full = f"sudo -n -- sh -c {shlex.quote(command)}" if sudo else command
        shown = f"sudo {command}" if sudo else command
        return self._exec(full, shown, stdin, timeout, secret, check)

    def script(
        self,
        script: str | bytes,
        *args: str,
        sudo: bool = False,
        timeout: float | None = None,
        secret: bool = False,
        check: bool = True,
    ) -> Result:
        """Run a bash script sent on stdin (``bash -s -- ARGS``), as root with ``sudo``.
        Arguments are quoted; the script itself never appears on a command line."""
        command = "bash -s --" + "".join(" " + shlex.quote(a) for a in args)
        full = f"sudo -n {command}" if sudo else command
        shown = f"{'sudo ' if sudo else ''}{command} <script: {len(script)} bytes>"
        return self._exec(full, shown, script, timeout, secret, check)

    def _exec(self, full: str, shown: str, stdin: bytes | str | None,
              timeout: float | None, secret: bool, check: bool,
              log_stdout: bool = True) -> Result:
        if timeout is None:
            timeout = self.gateway.settings.command_timeout
        data = stdin.encode() if isinstance(stdin, str) else stdin
        self._log([f"$ {shown}" + (f"  [stdin {len(data)} bytes]" if data else "")])
        started = time.monotonic()
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise self._lost(f"cannot run `{_short(shown)}`")
        try:
            chan = transport.open_session(timeout=self.gateway.settings.connect_timeout)
            chan.exec_command(full)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._lost(f"cannot run `{_short(shown)}`", exc) from exc
        self.gateway._count("_commands_run")
        try:
            out, err, status = self._collect(chan, data, timeout, started)
        except CommandTimeout:
            self._log([f"  => timed out after {timeout:g} s"])
            raise
        finally:
            chan.close()
        took = time.monotonic() - started
        lines = []
        if secret:
            if out or err:
                lines.append("  (output withheld: secret)")
        else:
            if log_stdout:
                lines += _output_lines("|", out)
            elif out:
                lines.append(f"  ({len(out)} bytes of output not logged)")
            lines += _output_lines("!", err)
        if status is None:
            self._log([*lines, "  => connection lost"])
            raise self._lost(f"`{_short(shown)}` did not finish")
        self._log([*lines, f"  => exit {status} ({took:.2f} s)"])
        result = Result(status, out.decode("utf-8", errors="replace"),
                        err.decode("utf-8", errors="replace"), out)
        if check and status != 0:
            tail = _stderr_tail(result, secret=secret)
            raise CommandFailed(self.target, self.gateway._redact(shown), status,
                                self.gateway._redact(tail))
        return result

    def _collect(self, chan: paramiko.Channel, data: bytes | None, timeout: float | None,
                 started: float) -> tuple[bytes, bytes, int | None]:
        feeder: threading.Thread | None = None

        def feed() -> None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                if data:
                    chan.sendall(data)
                chan.shutdown_write()

        if data and len(data) > _STDIN_INLINE:
            feeder = threading.Thread(target=feed, daemon=True, name="ssh-stdin")
            feeder.start()
        else:
            feed()
        out, err = bytearray(), bytearray()
        end = None if timeout is None else started + timeout
        # poll, not select: select() fails on descriptors above 1023, which a pool of
        # hundreds of nodes reaches
        poller = select.poll()
        poller.register(chan.fileno(), select.POLLIN)
        while True:
            if chan.recv_ready():
                out += chan.recv(65536)
                continue
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                continue
            if chan.eof_received or chan.closed:
                break
            wait = 1.0 if end is None else min(1.0, end - time.monotonic())
            if wait <= 0:
                raise self._timed_out(timeout)
            poller.poll(wait * 1000)
        # exit-status may follow the end of output by a moment
        while not chan.exit_status_ready() and not chan.closed:
            wait = 5.0 if end is None else end - time.monotonic()
            if wait <= 0:
                raise self._timed_out(timeout)
            chan.status_event.wait(min(wait, 1.0))
        if feeder is not None:
            feeder.join(timeout=1)
        status = chan.exit_status if chan.exit_status_ready() else -1
        return bytes(out), bytes(err), (status if status >= 0 else None)

    # -- files
    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = self._client.open_sftp()
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    raise self._lost("cannot open SFTP", exc) from exc
            return self._sftp

    def home(self) -> str:
        """The login user's home directory on the node."""
        if self._home is None:
            self._home = self._sftp_client().normalize(".")
        return self._home

    def write_file(
        self,
        path: str,
        data: bytes | str,
        mode: int = 0o644,
        owner: str | None = None,
        sudo: bool = False,
        *,
        group: str | None = None,
        as_owner: bool = False,
    ) -> None:
        """Replace ``path`` atomically with ``data`` (readers see the old or the new
        file, never a partial one), with ``mode``. Without ``sudo``/``owner``: SFTP to a
        temporary file next to it, then rename. With them (root-owned destinations,
        other users' files): SFTP to a private 0600 file in the login user's home, then
        ``sudo -n install -m MODE -o OWNER -g GROUP`` next to the destination and ``mv``
        over it. ``owner`` defaults to root; ``group`` to the owner's primary group.

        ``as_owner`` is for a directory the (unprivileged) ``owner`` can write, where
        root must never follow that user's links: the data goes on stdin to a writer
        running as ``owner`` (fresh mktemp name, rename), and what is at ``path`` before
        and after must be a regular file with one link owned by ``owner``."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        if not path.startswith("/"):
            raise ValueError(f"write_file needs an absolute path, not {path!r}")
        token = _secrets.token_hex(6)
        shown = f"write_file {path} ({len(payload)} bytes, mode {mode:04o}"
        if as_owner:
            if not owner or ":" in owner or group or owner == "root":
                raise ValueError("write_file as_owner needs an unprivileged owner, no group")
            self._write_as_owner(path, payload, mode, owner, shown)
            return
        if not sudo and owner is None:
            self._log([shown + ")"])
            directory, base = posixpath.split(path)
            tmp = posixpath.join(directory, f".{base}.ddtmp-{token}")
            self._sftp_put(tmp, payload, mode, path)
            try:
                self._sftp_client().posix_rename(tmp, path)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                with contextlib.suppress(Exception):
                    self._sftp_client().remove(tmp)
                raise self._file_error("write", path, exc) from exc
            return
        owner = owner or "root"
        user, _, grp = owner.partition(":")
        grp = group or grp
        tmp = f"{self.home().rstrip('/')}/.ddtmp-{token}"
        self._sftp_put(tmp, payload, 0o600, path)
        dest_tmp = f"{path}.ddtmp-{token}"
        group_arg = shlex.quote(grp) if grp else f'"$(id -gn {shlex.quote(user)})"'
        q = shlex.quote
        inner = (f"install -m {mode:04o} -o {q(user)} -g {group_arg} {q(tmp)} {q(dest_tmp)}"
                 f" && mv -f {q(dest_tmp)} {q(path)} || {{ rc=$?; rm -f {q(dest_tmp)};"
                 f" exit $rc; }}")
        command = f"sudo -n -- sh -c {q(inner)}; rc=$?; rm -f {q(tmp)}; exit $rc"
        self._exec(command, f"{shown}, owner {user}:{grp or '-'}) via sudo", None, None,
                   False, True)

    def _write_as_owner(self, path: str, payload: bytes, mode: int, owner: str,
                        shown: str) -> None:
        writer = ('umask 077; t=$(mktemp -- "$1.XXXXXX") || exit 1; '
                  "trap 'rm -f -- \"$t\"' EXIT; "
                  'cat >"$t" && chmod "$2" -- "$t" && mv -fT -- "$t" "$1" && trap - EXIT')
        script = (_OWNED_FILE_CHECK + 'U=$2; check "$1" missing-ok\n'
                  'runuser -u "$U" -- sh -c "$4" writer "$1" "$3" || exit 1\ncheck "$1"\n')
        q = shlex.quote
        command = (f"sudo -n -- sh -c {q(script)} sh {q(path)} {q(owner)} {mode:04o} "
                   f"{q(writer)}")
        self._exec(command, f"{shown}, as {owner})", payload, None, False, True)

    def _sftp_put(self, tmp: str, payload: bytes, mode: int, path: str) -> None:
        sftp = self._sftp_client()
        try:
            with sftp.open(tmp, "wb") as f:
                f.chmod(mode)  # before any byte is written
                f.set_pipelined(True)
                f.write(payload)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            with contextlib.suppress(Exception):
                sftp.remove(tmp)
            raise self._file_error("write", path, exc) from exc

    def read_file(self, path: str, sudo: bool = False, secret: bool = False,
                  as_user: str | None = None) -> bytes:
        """The bytes of a remote file (``sudo``: read as root). ``secret`` keeps the
        content out of logs (it never goes into them anyway; this also hides sizes).
        ``as_user``: a file in a directory that unprivileged user can write, read as that
        user without following a link or waiting on a FIFO, after the same checks as
        ``write_file(as_owner=True)``."""
        if as_user:
            script = (_OWNED_FILE_CHECK + 'U=$2; check "$1"\n'
                      'exec runuser -u "$U" -- dd if="$1" iflag=nofollow,nonblock bs=1M '
                      'status=none\n')
            q = shlex.quote
            return self._exec(f"sudo -n -- sh -c {q(script)} sh {q(path)} {q(as_user)}",
                              f"read_file {path} as {as_user}", None, None, secret, True,
                              log_stdout=False).raw_stdout
        if sudo:
            return self._exec(f"sudo -n -- cat -- {shlex.quote(path)}",
                              f"read_file {path} via sudo", None, None, secret, True,
                              log_stdout=False).raw_stdout
        try:
            with self._sftp_client().open(path, "rb") as f:
                f.prefetch()
                content = f.read()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._log([f"read_file {path}: failed: {_describe(exc)}"])
            raise self._file_error("read", path, exc) from exc
        self._log([f"read_file {path}" + ("" if secret else f" ({len(content)} bytes)")])
        return bytes(content)

    def _file_error(self, verb: str, path: str, exc: BaseException) -> SshError:
        if self._closed or isinstance(exc, EOFError | paramiko.SSHException):
            return self._lost(f"cannot {verb} {path}", exc)
        return FileTransferFailed(self.target, verb, path, _describe(exc))


def _stderr_tail(result: Result, lines: int = 3, secret: bool = False) -> str:
    """What a failed command said: our node scripts' own ERROR line when there is one
    (it names the node, the path and the reason; it never holds a secret value, so it is
    shown for ``secret`` calls too), else the last stderr lines (none when secret)."""
    said = [ln.strip() for ln in result.stderr.splitlines()
            if ln.startswith(SCRIPT_ERROR_PREFIX)]
    if said:
        return _one_line(said[-1][len(SCRIPT_ERROR_PREFIX):], 400)
    if secret:
        return "(output withheld: secret)"
    text = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
    if not text:
        text = [ln.strip() for ln in result.stdout.splitlines() if ln.strip()][-1:]
    return _one_line(" | ".join(text[-lines:]), 400)


def settings_from_config(values: Mapping[str, Any], log_dir: str | os.PathLike[str] | None
                         ) -> SshSettings:
    """SshSettings from config values (``SSH_USER``, ``SSH_PORT``, ``SSH_KEY_FILE``,
    ``SSH_CONCURRENCY``, ``SSH_DEADLINE_SECONDS``); keys that are missing keep the defaults."""
    defaults = SshSettings()
    return SshSettings(
        user=values.get("SSH_USER") or defaults.user,
        port=int(values.get("SSH_PORT") or defaults.port),
        key_file=values.get("SSH_KEY_FILE") or None,
        concurrency=int(values.get("SSH_CONCURRENCY") or defaults.concurrency),
        deadline_seconds=float(values.get("SSH_DEADLINE_SECONDS") or defaults.deadline_seconds),
        log_dir=log_dir,
    )
