"""SSH host keys: pinned per EC2 instance id, optionally verified out of band.

Pure file and text logic (no paramiko, no boto3) so that it can be tested on its own and
used by the SSH gateway, the bootstrap (the master's ``known_hosts`` for its slaves is
written from the pins) and the CLI (forgetting a key).

Keys are pinned per *instance id*, not per address: EC2 reuses private IPs, so a new
instance at an old address is a new host with a new key (fine), while the same instance
offering a different key is refused (a rebuilt instance or a man in the middle).

Policies (config ``HOST_KEY_POLICY``):

* ``pin`` — trust on first use: the first key seen for an instance is recorded under
  ``STATE_DIR/hostkeys/<instance-id>``; later a different key is refused.
* ``console`` — accept a key only when it appears in the instance's EC2 console output
  (cloud-init prints the fingerprints and the public keys there at first boot); while
  the console output does not have them yet the error is retryable. A verified key is
  pinned as with ``pin``.
* ``insecure`` — accept any key (the caller warns). The latest key seen is still
  recorded, so a master's ``known_hosts`` can be written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import statefiles

__all__ = [
    "POLICIES",
    "ConsoleKeys",
    "HostKey",
    "HostKeyChanged",
    "HostKeyError",
    "HostKeyNotInConsole",
    "HostKeyPending",
    "HostKeyStore",
    "HostKeyVerifier",
    "known_hosts_line",
    "parse_console_output",
]

POLICIES = ("pin", "console", "insecure")

FINGERPRINTS_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
FINGERPRINTS_END = "-----END SSH HOST KEY FINGERPRINTS-----"
KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
KEYS_END = "-----END SSH HOST KEY KEYS-----"

_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_TYPE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)$")
_SHA256_FP = re.compile(r"SHA256:([A-Za-z0-9+/]{43})\b")
_MD5_FP = re.compile(r"(?<![0-9a-fA-F:])((?:[0-9a-fA-F]{2}:){15}[0-9a-fA-F]{2})(?![0-9a-fA-F:])")
_PUBLIC_KEY = re.compile(
    r"\b(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp(?:256|384|521)|"
    r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)\s+(AAAA[A-Za-z0-9+/]+=*)"
)


class HostKeyError(Exception):
    """A host key was not accepted. ``instance_id`` and ``address`` say for which host."""

    retryable = False

    def __init__(self, instance_id: str, address: str, message: str) -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.address = address


class HostKeyChanged(HostKeyError):
    """The instance offers a key other than the one pinned for it."""


class HostKeyNotInConsole(HostKeyError):
    """The console output lists host keys, and the offered key is not among them."""


class HostKeyPending(HostKeyError):
    """The key cannot be verified *yet* (console output not available): retry later."""

    retryable = True


@dataclass(frozen=True)
class HostKey:
    """A public host key: its type (``ssh-ed25519``…) and its wire-format blob."""

    keytype: str
    blob: bytes

    @classmethod
    def from_blob(cls, blob: bytes) -> HostKey:
        """From the SSH wire encoding (what a server sends); the type is read from it."""
        if len(blob) < 4:
            raise ValueError("host key blob is too short")
        (n,) = struct.unpack(">I", blob[:4])
        keytype = blob[4 : 4 + n].decode("ascii", errors="replace")
        if n == 0 or len(blob) < 4 + n or not _KEY_TYPE.match(keytype):
            raise ValueError("host key blob does not start with a key type")
        return cls(keytype, bytes(blob))

    @classmethod
    def from_line(cls, line: str) -> HostKey:
        """From ``keytype base64 [comment]`` (a ``.pub`` file or a pin file)."""
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"not a public key line: {line[:60]!r}")
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"bad base64 in public key line: {line[:60]!r}") from exc
        key = cls.from_blob(blob)
        if key.keytype != parts[0]:
            raise ValueError(f"key type {parts[0]!r} does not match the key ({key.keytype})")
        return key

    @property
    def base64(self) -> str:
        return base64.b64encode(self.blob).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """OpenSSH's ``SHA256:…`` fingerprint (what ``ssh-keygen -l`` and cloud-init print)."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    @property
    def md5_fingerprint(self) -> str:
        """The legacy ``aa:bb:…`` fingerprint that old images print on the console."""
        digest = hashlib.md5(self.blob, usedforsecurity=False).hexdigest()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    def line(self) -> str:
        """``keytype base64``, the pin file and ``known_hosts`` form."""
        return f"{self.keytype} {self.base64}"


def _check_instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not _INSTANCE_ID.match(instance_id):
        raise ValueError(f"not a valid instance id: {instance_id!r}")
    return instance_id


class HostKeyStore:
    """Pinned host keys, one file per instance id under ``STATE_DIR/hostkeys/``.

    Writes are atomic and first-writer-wins (a concurrent pin of a *different* key by
    another thread or process is detected, not overwritten). Files go through
    `statefiles`: never through a link, under a folder that only the caller can write.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(state_dir) / "hostkeys"

    def path(self, instance_id: str) -> Path:
        """Where the pin of ``instance_id`` lives (shown in error messages)."""
        return self.directory / _check_instance_id(instance_id)

    def get(self, instance_id: str) -> HostKey | None:
        """The pinned key, or None. A damaged pin file is an error, not "no pin"; so is a
        pin that is a link or not a file of ours (`statefiles` refuses it)."""
        path = self.path(instance_id)
        raw = statefiles.read_bytes(path, limit=64 * 1024)
        if raw is None:
            return None
        text = raw.decode("utf-8", errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise ValueError(f"pinned host key file {path} is empty")
        return HostKey.from_line(lines[0])

    def pin(self, instance_id: str, key: HostKey, *, replace: bool = False) -> HostKey:
        """Record ``key`` for ``instance_id`` unless one is already pinned; returns the
        key that is pinned afterwards (the existing one if another writer won)."""
        path = self.path(instance_id)
        statefiles.ensure_dir(self.directory)
        data = (key.line() + "\n").encode("ascii")
        if replace:
            statefiles.write_atomic(path, data)
            return key
        while not statefiles.write_new(path, data):  # atomic "create if absent"
            existing = self.get(instance_id)
            if existing is not None:
                return existing
            # forgotten between the two calls: try to create it again
        return key

    def forget(self, instance_id: str) -> bool:
        """Drop the pin (after an instance was really rebuilt); True if there was one."""
        return statefiles.remove(self.path(instance_id))

    def pinned(self, instance_ids: Iterable[str]) -> dict[str, HostKey]:
        """The pinned keys of these instances (those without a pin are left out)."""
        found = {}
        for instance_id in instance_ids:
            key = self.get(instance_id)
            if key is not None:
                found[instance_id] = key
        return found

    def known_hosts(self, hosts: Mapping[str, Sequence[str]], port: int = 22) -> str:
        """``known_hosts`` text for ``{instance_id: [names and addresses]}`` from the
        pins, e.g. the master's view of its slaves. Instances without a pin are left
        out (they cannot be trusted yet); lines are sorted for stable output."""
        lines = []
        for instance_id, key in self.pinned(hosts).items():
            names = [n for n in hosts[instance_id] if n]
            if names:
                lines.append(known_hosts_line(names, key, port))
        return "".join(sorted(line + "\n" for line in lines))


def known_hosts_line(names: Sequence[str], key: HostKey, port: int = 22) -> str:
    """One ``known_hosts`` line: ``name1,name2 keytype base64`` (``[name]:port`` when the
    port is not 22)."""
    for name in names:
        if not name or any(c in name for c in " ,\t\n#[]") or name.startswith(("|", "@")):
            raise ValueError(f"not a host name for known_hosts: {name!r}")
    shown = names if port == 22 else [f"[{n}]:{port}" for n in names]
    return f"{','.join(shown)} {key.line()}"


@dataclass(frozen=True)
class ConsoleKeys:
    """What an instance's console output says about its host keys."""

    fingerprints: frozenset[str]  # "SHA256:…" and legacy "aa:bb:…"
    keys: frozenset[tuple[str, str]]  # (keytype, base64)

    @property
    def empty(self) -> bool:
        return not self.fingerprints and not self.keys

    def accepts(self, key: HostKey) -> bool:
        return (
            key.fingerprint in self.fingerprints
            or key.md5_fingerprint in self.fingerprints
            or (key.keytype, key.base64) in self.keys
        )


def _blocks(text: str, begin: str, end: str) -> list[str]:
    found = []
    start = text.find(begin)
    while start != -1:
        stop = text.find(end, start + len(begin))
        if stop == -1:  # still being written: take nothing from a half block
            break
        found.append(text[start + len(begin) : stop])
        start = text.find(begin, stop + len(end))
    return found


def parse_console_output(text: str | bytes | None) -> ConsoleKeys:
    """Host key fingerprints and public keys from EC2 console output.

    Reads every complete ``SSH HOST KEY FINGERPRINTS`` and ``SSH HOST KEY KEYS`` block
    (cloud-init prints them at each boot, lines sometimes prefixed by ``ec2:`` or a
    timestamp, with ``\\r\\n`` endings); anything outside the blocks is ignored.
    """
    if text is None:
        return ConsoleKeys(frozenset(), frozenset())
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    fingerprints: set[str] = set()
    for block in _blocks(text, FINGERPRINTS_BEGIN, FINGERPRINTS_END):
        fingerprints.update("SHA256:" + m for m in _SHA256_FP.findall(block))
        fingerprints.update(m.lower() for m in _MD5_FP.findall(block))
    keys: set[tuple[str, str]] = set()
    for block in _blocks(text, KEYS_BEGIN, KEYS_END):
        for keytype, b64 in _PUBLIC_KEY.findall(block):
            try:
                HostKey.from_line(f"{keytype} {b64}")
            except ValueError:
                continue
            keys.add((keytype, b64))
    return ConsoleKeys(frozenset(fingerprints), frozenset(keys))


ConsoleOutputFn = Callable[[str], "str | bytes | None"]


class HostKeyVerifier:
    """Decides whether a host key offered by an instance is accepted (see module doc).

    ``console_output(instance_id)`` is required for the ``console`` policy; it returns
    the instance's console text (or None while EC2 has none) — the EC2 gateway provides
    it, so this module never talks to AWS itself.
    """

    def __init__(
        self,
        policy: str,
        store: HostKeyStore,
        console_output: ConsoleOutputFn | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"HOST_KEY_POLICY must be one of {', '.join(POLICIES)}, "
                             f"not {policy!r}")
        if policy == "console" and console_output is None:
            raise ValueError("HOST_KEY_POLICY 'console' needs a console output reader")
        self.policy = policy
        self.store = store
        self.console_output = console_output

    def verify(self, instance_id: str, address: str, key: HostKey) -> str:
        """Accept ``key`` or raise a :class:`HostKeyError`. Returns how it was accepted:
        ``"pinned"`` (matches the pin), ``"new"`` (first use, now pinned), ``"console"``
        (matched the console output, now pinned) or ``"insecure"``."""
        _check_instance_id(instance_id)
        if self.policy == "insecure":
            if self.store.get(instance_id) != key:
                self.store.pin(instance_id, key, replace=True)
            return "insecure"
        pinned = self.store.get(instance_id)
        if pinned is not None:
            if pinned == key:
                return "pinned"
            raise self._changed(instance_id, address, pinned, key)
        if self.policy == "console":
            self._check_console(instance_id, address, key)
        winner = self.store.pin(instance_id, key)
        if winner != key:  # a concurrent connection pinned another key first
            raise self._changed(instance_id, address, winner, key)
        return "console" if self.policy == "console" else "new"

    def _check_console(self, instance_id: str, address: str, key: HostKey) -> None:
        assert self.console_output is not None
        try:
            text = self.console_output(instance_id)
        except Exception as exc:  # a failed lookup is "not verifiable yet", say why
            raise HostKeyPending(
                instance_id, address,
                f"host key of {instance_id} ({address}) not verified yet: cannot read its "
                f"console output ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            ) from exc
        found = parse_console_output(text)
        if found.empty:
            raise HostKeyPending(
                instance_id, address,
                f"host key of {instance_id} ({address}) not verified yet: its console output "
                "shows no SSH host key fingerprints (yet)",
            )
        if not found.accepts(key):
            raise HostKeyNotInConsole(
                instance_id, address,
                f"host key of {instance_id} ({address}) refused: it offers {key.keytype} "
                f"{key.fingerprint}, which is not among the host keys in its console output "
                "(possible man in the middle)",
            )

    def _changed(self, instance_id: str, address: str, pinned: HostKey,
                 offered: HostKey) -> HostKeyChanged:
        return HostKeyChanged(
            instance_id, address,
            f"host key of {instance_id} ({address}) changed: pinned {pinned.keytype} "
            f"{pinned.fingerprint}, now offered {offered.keytype} {offered.fingerprint}; "
            f"refusing to connect. If {instance_id} was really rebuilt, forget its key "
            f"(disposabledisco forget-host-key CONFIG {instance_id}, which deletes "
            f"{self.store.path(instance_id)}) and run again",
        )
