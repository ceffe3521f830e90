"""Real, isolated OpenSSH nodes on one machine, standing in for EC2 instances.

Every node is a real ``sshd`` listening at exactly ``ADDRESS:22`` (an address in 127/8,
outside 127.0.0.0/24) inside its own mount, UTS, PID and network namespaces, chrooted into
a private copy-on-write overlay of ``/`` that lives on a tmpfs. A bootstrap that edits
``/etc/hosts``, installs a package or starts a daemon on one node therefore touches
neither the machine nor the other nodes, and stopping the node throws all of its writes
away.

Why each piece is there:

* overlay with ``lowerdir=/`` — the node sees the machine's installed software (python3,
  bash, sudo, erlang) for free, and starts in tens of milliseconds;
* PID namespace with ``sshd`` supervised by a tiny ``sh`` init — stopping a node kills
  every process a bootstrap started in it (daemons included), and ``kill_sshd`` /
  ``restart_sshd`` can take ssh away without losing the node's state;
* a network namespace per node — its own loopback, port space and epmd, as on separate
  machines: Disco names its worker Erlang node ``disco_<port>_slave`` on every host, and
  a server on ``0.0.0.0:8989`` of one node must not answer for the others. The node's
  ``eth0`` (one end of a veth pair) carries ``ADDRESS/24``; the other end sits on a bridge
  in the farm's *hub* namespace, which also holds the uplink to the machine: a veth pair
  whose machine end has the subnet's ``.1`` and one ``/32`` route per node in the ``local``
  routing table (ahead of loopback's 127.0.0.0/8). ``route_localnet`` on the links lets
  the kernel carry 127/8 over them. So this machine (the tool, the tests) reaches every
  node at ``ADDRESS``, nodes reach each other on every port, and nothing else can reach
  them. The bridge and every veth live and die with the hub and node namespaces: nothing
  is left on the machine when the owner dies, even by SIGKILL;
* ``setpriv --pdeathsig KILL`` + ``unshare --kill-child`` — if the Python process that
  owns the farm dies, even by SIGKILL, its nodes and hub die with it; ``stop_all`` also
  runs from ``__exit__`` and from an ``atexit`` hook. Processes are only ever signalled by
  their recorded pids, never by name;
* offline tweaks (empty apt lists, ``Acquire::Retries "0"``, ``nameserver 127.0.0.1``, a
  pip config with an unreachable index) — a bootstrap that tries the network fails at
  once instead of hanging, and never reaches a real registry.

The nodes look like EC2 Ubuntu images to a bootstrap: a login user (``ubuntu`` by
default) with passwordless ``sudo -n`` and the given authorized key, ``bash``,
``python3``, an EC2-style hostname (``ip-127-10-0-4``) that resolves to the node's own
address through ``/etc/hosts`` (the host name is the first name of that line, as Erlang
wants), and their own ed25519 host key in ``/etc/ssh``. There is no systemd and no
cloud-init inside a node.

Used by the tests (``tests/node_fixtures.py``) and by the local sandbox, which connects
a farm to the simulated spot market through :meth:`NodeFarm.on_launch` /
:meth:`NodeFarm.on_terminate` or :meth:`NodeFarm.sync`.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import ctypes
import hashlib
import ipaddress
import itertools
import logging
import os
import pwd
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .loopback import sockets_in_use

log = logging.getLogger(__name__)

__all__ = [
    "AddressInUse",
    "Node",
    "NodeError",
    "NodeFarm",
    "ec2_hostname",
    "generate_ed25519_key",
    "loopback_ends",
    "taken_addresses",
]

SSHD_READY = "Server listening on "
_MARK = "disposabledisco-node:"
_RUNNING_STATES = frozenset({"running"})
_GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SAFE_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SAFE_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9/._-]*$")
_CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
#: every node's subnet is the /24 around its address; its ``.1`` is the machine's end
_PREFIX = 24
#: 127.0.0.0/24 holds the machine's own 127.0.0.1: never a node's
_MACHINE_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/24")
#: the bridge inside a farm's hub namespace (one per hub, so the name never collides)
_BRIDGE = "ddbr"
#: the machine's end of a farm's uplink: ``ddh`` + the hub's pid in hex (at most 15 chars)
_UPLINK = re.compile(r"^ddh([0-9a-f]{1,8})$")
_CLONE_NEWNET = 0x40000000

_SSHD_CONFIG = """\
# Written by disposabledisco.sandbox.nodes for a local test node.
ListenAddress {address}:22
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
MaxStartups 200:30:300
MaxSessions 64
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
"""

_HOSTS = """\
127.0.0.1 localhost
{address} {hostname}

# The following lines are desirable for IPv6 capable hosts
::1 ip6-localhost ip6-loopback
fe00::0 ip6-localnet
ff00::0 ip6-mcastprefix
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
ff02::3 ip6-allhosts
"""

_APT_OFFLINE = """\
// disposabledisco test node: no network, fail fast.
Acquire::Retries "0";
Acquire::http::Timeout "2";
Acquire::https::Timeout "2";
Acquire::http::Proxy "DIRECT";
Acquire::https::Proxy "DIRECT";
"""

_PIP_OFFLINE = """\
# disposabledisco test node: no reachable index, fail fast.
[global]
index-url = http://127.0.0.1:9/simple/
retries = 0
timeout = 2
disable-pip-version-check = true
"""

_BASHRC = """\
# ~/.bashrc of a disposabledisco test node: non-interactive shells return at once.
case $- in *i*) ;; *) return ;; esac
PS1='\\u@\\h:\\w\\$ '
"""


class NodeError(RuntimeError):
    """A node could not be started, found or controlled; the message says which and why."""


class AddressInUse(NodeError):
    """Something (another node, another farm, another sshd) already listens at ADDRESS:22."""


def ec2_hostname(address: str) -> str:
    """EC2's default private hostname for an address: ``127.10.0.4`` -> ``ip-127-10-0-4``."""
    return "ip-" + str(ipaddress.IPv4Address(address)).replace(".", "-")


def generate_ed25519_key(comment: str = "") -> tuple[str, str]:
    """A fresh ed25519 key pair as (OpenSSH private key PEM, ``ssh-ed25519 AAAA… comment``).

    Done in-process with ``cryptography`` (a paramiko dependency): ~1000× cheaper than
    running ``ssh-keygen`` once per node.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return private, (public + (" " + comment if comment else ""))


@dataclass
class Node:
    """One running node. Read-only for callers; the farm owns and updates it."""

    instance_id: str
    address: str
    hostname: str
    login_user: str
    workdir: Path
    #: where the node's ``/`` is mounted, as a path in the node's mount namespace
    root: str
    #: pid of the ``unshare`` process (the recorded handle of the whole node)
    pid: int = 0
    #: host pid of the node's init (pid 1 inside the node's PID namespace)
    init_pid: int = 0
    started_at: float = 0.0
    #: seconds from spawning the node until its sshd listened
    startup_seconds: float = 0.0
    host_public_key: str = ""
    log_path: Path | None = None
    #: the node's veth on the hub's bridge (its other end is the node's ``eth0``)
    link: str = ""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _failed: str = field(default="", repr=False)
    _lines: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=400), repr=False
    )
    _reader: threading.Thread | None = field(default=None, repr=False)
    _spawned_at: float = field(default=0.0, repr=False)
    _routed: bool = field(default=False, repr=False)

    def log_tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines the node's init and sshd printed (for failure reports)."""
        return list(self._lines)[-n:]

    @property
    def alive(self) -> bool:
        """True while the node's processes exist (sshd itself may have been killed)."""
        return self._proc is not None and self._proc.poll() is None


class _Spawner:
    """Starts node processes from one long-lived thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, and nodes
    are often started from short-lived threads (HTTP handler threads of the local EC2
    endpoint, thread pools). Forking from this thread, which lives as long as the
    process, makes "the node dies when its owner dies" mean the process, not a thread.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[[], object], list[object], threading.Event]]
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="node-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._queue.get()
            try:
                box.append(fn())
            except BaseException as exc:  # handed back to the caller
                box.append(exc)
            done.set()

    def call(self, fn: Callable[[], object]) -> object:
        box: list[object] = []
        done = threading.Event()
        self._queue.put((fn, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()
_farms: weakref.WeakSet[NodeFarm] = weakref.WeakSet()
_available: tuple[bool, str] | None = None


def _spawn(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
    return _spawner.call(lambda: subprocess.Popen(argv, **kwargs))  # type: ignore[return-value,arg-type]


@atexit.register
def _stop_all_farms() -> None:
    for farm in list(_farms):
        with contextlib.suppress(Exception):
            farm.close()


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[1])


def _child_of(pid: int) -> int | None:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _ppid(int(entry.name)) == pid:
            return int(entry.name)
    return None


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint == prefix[:-1] or mountpoint.startswith(prefix):
                found.append(mountpoint)
    return found


_WORKDIR_PREFIX = "disposabledisco-nodes-"
_OWNER_FILE = "owner"


def _process_identity(pid: int) -> str:
    """``pid starttime``: names a process and survives pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return f"{pid} {int(fields[19])}"
    except (OSError, IndexError, ValueError):
        return f"{pid} ?"


def _reap_stale_workdirs() -> None:
    """Remove farm directories left in the temp dir by owners that were killed (their
    nodes died with them; only the files remain)."""
    for path in Path(tempfile.gettempdir()).glob(_WORKDIR_PREFIX + "*"):
        try:
            owner = (path / _OWNER_FILE).read_text().split()
            pid = int(owner[0])
        except (OSError, IndexError, ValueError):
            continue
        if _process_identity(pid) != " ".join(owner):
            _safe_rmtree(path)


def _safe_rmtree(path: Path) -> None:
    """Remove a node directory unless something is mounted below it (never delete through
    a mount: a node's root has the machine's /dev and /sys bound into it)."""
    if not path.exists():
        return
    mounted = _mounts_under(path)
    if mounted:
        log.warning("not removing %s: still mounted below it: %s", path, ", ".join(mounted))
        return
    shutil.rmtree(path, ignore_errors=True)


def _ip(*args: str, hub: _Hub | None = None, check: bool = True, input: str | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    """Run ``ip ARGS`` in the machine's network namespace, or in ``hub``'s."""
    argv = ["ip", *args]
    if hub is not None:
        argv = ["nsenter", f"--net=/proc/{hub.pid}/ns/net", "--", *argv]
    done = subprocess.run(argv, capture_output=True, env=_CLEAN_ENV, timeout=30, check=False,
                          input=None if input is None else input.encode())
    if check and done.returncode != 0:
        raise NodeError(f"{shlex.join(argv)} failed: "
                        f"{done.stderr.decode(errors='replace').strip()}")
    return done


def _mac(address: str) -> str:
    """A locally administered MAC made of the IPv4 address: ``02:00:7f:0a:00:04``."""
    return ":".join(f"{byte:02x}" for byte in (2, 0, *ipaddress.IPv4Address(address).packed))


def _listeners(port: int) -> set[str]:
    """IPv4 addresses that a socket of this machine's network namespace listens on at
    PORT (from /proc/net/tcp: no connection is made)."""
    found = set()
    with open("/proc/self/net/tcp") as f:
        next(f)
        for fields in (line.split() for line in f):
            hex_address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(str(ipaddress.IPv4Address(bytes.fromhex(hex_address)[::-1])))
    return found


def taken_addresses() -> set[str]:
    """Addresses no new node may take: a node of any farm on this machine has it (its /32
    route in the ``local`` table), or a process of the machine listens on it at port 22.
    Read from the kernel, no connection made: a node still starting counts too."""
    taken = _listeners(22)
    routes = _ip("-o", "route", "show", "table", "local", "type", "unicast").stdout.decode()
    for line in routes.splitlines():
        words = line.split()
        if words and words[0].startswith("127.") and "/" not in words[0]:
            taken.add(words[0])
    return taken


def loopback_ends() -> list[tuple[ipaddress.IPv4Address, int]]:
    """Every (address, port) in use on this machine's loopback, for `free_subnet`: our
    namespace's sockets, and each node of any farm as port 22 of its address (nodes live
    in namespaces of their own, so their sockets are not in ours, but their routes are)."""
    return [*sockets_in_use(),
            *((ipaddress.IPv4Address(address), 22) for address in taken_addresses())]


def _reap_stale_uplinks() -> None:
    """Delete uplinks (``ddh<pid>``) whose hub process is gone. An uplink normally dies
    with its hub's namespace; this catches one whose namespace was kept alive by
    something else (a bind mount, an ``ip netns attach``) after its owner was killed."""
    own = os.readlink("/proc/self/ns/net")
    for name in os.listdir("/sys/class/net"):
        match = _UPLINK.match(name)
        if not match:
            continue
        try:
            alive = os.readlink(f"/proc/{int(match[1], 16)}/ns/net") != own
        except OSError:
            alive = False
        if not alive:
            log.warning("removing %s, the uplink of a node farm whose hub is gone", name)
            _ip("link", "del", name, check=False)


@dataclass
class _Hub:
    """A farm's hub: a namespace holding the nodes' bridge and the uplink to the machine."""

    proc: subprocess.Popen[bytes]
    uplink: str
    #: subnets (``127.10.0.0/24``) whose gateway (``.1``) the uplink carries
    subnets: set[str] = field(default_factory=set)
    links: Iterator[int] = field(default_factory=itertools.count)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @staticmethod
    def start(timeout: float) -> _Hub:
        """Start the hub: its process (``sleep``) in a new network namespace, the bridge,
        and the uplink whose machine end is up with ``route_localnet`` set. Dies with the
        farm's owner (parent-death signal)."""
        machine = f"/proc/{os.getpid()}/ns/net"
        script = "\n".join([
            "set -eu",
            'up=ddh$(printf %x "$$")',
            "ip link set lo up",
            f"ip link add {_BRIDGE} type bridge",
            f"ip link set {_BRIDGE} up",
            f'ip link add ddup type veth peer name "$up" netns {machine}',
            f"ip link set ddup master {_BRIDGE} up",
            f"nsenter --net={machine} -- sh -c 'echo 1 >\"/proc/sys/net/ipv4/conf/$1/"
            "route_localnet\" && ip link set \"$1\" up' sh \"$up\"",
            f'echo "{_MARK} hub $up"',
            "exec sleep infinity </dev/null >/dev/null 2>&1",
        ])
        proc = _spawn(["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--net", "--",
                       "/bin/sh", "-c", script], stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_CLEAN_ENV,
                      close_fds=True, start_new_session=True)
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + timeout
        try:
            while f"{_MARK} hub ".encode() not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                    raise NodeError(f"the nodes' network hub did not start within {timeout:g} s")
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise NodeError("cannot create the nodes' network (bridge and uplink): "
                                    + output.decode(errors="replace").strip())
                output += chunk
        except BaseException:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            raise
        proc.stdout.close()
        uplink = output.decode().split(f"{_MARK} hub ", 1)[1].split()[0]
        return _Hub(proc, uplink)

    def stop(self) -> None:
        """Remove the uplink (at once, not when the kernel gets to the namespace) and end
        the hub: its bridge goes with its namespace."""
        _ip("link", "del", self.uplink, check=False)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=10)


class NodeFarm:
    """A set of local SSH nodes keyed by EC2 instance id. Use it as a context manager.

    ``authorized_key`` and ``login_user`` are the defaults for every node (what EC2's
    key pair and the AMI's default user would be); the market callbacks
    :meth:`on_launch` / :meth:`on_terminate` and :meth:`sync` always use them.
    Thread-safe: nodes may be started and stopped from several threads at once.
    """

    def __init__(
        self,
        authorized_key: str | None = None,
        login_user: str = "ubuntu",
        *,
        workdir: str | os.PathLike[str] | None = None,
        sshd_path: str = "/usr/sbin/sshd",
        tmpfs_size: str = "4g",
        start_timeout: float = 15.0,
        hostname_for: Callable[[str], str] = ec2_hostname,
    ) -> None:
        self.authorized_key = authorized_key
        self.login_user = login_user
        self.sshd_path = sshd_path
        self.tmpfs_size = tmpfs_size
        self.start_timeout = start_timeout
        self.hostname_for = hostname_for
        self._own_workdir = workdir is None
        if workdir is None:
            _reap_stale_workdirs()
        _reap_stale_uplinks()
        self.workdir = Path(
            workdir if workdir is not None else tempfile.mkdtemp(prefix=_WORKDIR_PREFIX)
        ).resolve()
        if not _SAFE_PATH.match(str(self.workdir)):
            raise NodeError(f"node farm directory {self.workdir} must match {_SAFE_PATH.pattern}")
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.workdir / _OWNER_FILE).write_text(_process_identity(os.getpid()) + "\n")
        self._nodes: dict[str, Node] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._hub: _Hub | None = None
        #: startup time (seconds) of every node started by this farm, in start order
        self.startup_times: list[float] = []
        _farms.add(self)

    # ------------------------------------------------------------------ context
    def __enter__(self) -> NodeFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every node and the hub (bridge, uplink, routes), and remove the farm's
        directory if the farm created it."""
        with self._lock:
            self._closed = True
        self.stop_all()
        with self._lock:
            hub, self._hub = self._hub, None
        if hub is not None:
            hub.stop()
        if self._own_workdir:
            _safe_rmtree(self.workdir)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def available(sshd_path: str = "/usr/sbin/sshd") -> tuple[bool, str]:
        """Whether this machine can run nodes, and if not, why (for ``pytest.skip``).

        Needs root, OpenSSH's sshd, util-linux (unshare, nsenter, setpriv), sudo,
        iproute2, and a kernel that lets us mount tmpfs + overlayfs in a fresh mount
        namespace and make a bridge and veth pair in a fresh network namespace — probed
        for real once per process (~10 ms) because containers often forbid it even to
        root.
        """
        global _available
        if _available is not None:
            return _available
        if os.geteuid() != 0:
            return False, "real SSH nodes need root (mount namespaces, overlayfs, chroot)"
        if not os.access(sshd_path, os.X_OK):
            return False, f"no OpenSSH server at {sshd_path} (apt-get install -y openssh-server)"
        for tool in ("unshare", "nsenter", "setpriv", "chroot", "mount", "sudo", "ip"):
            if shutil.which(tool, path=_CLEAN_ENV["PATH"]) is None:
                hint = {"sudo": "sudo", "ip": "iproute2"}.get(tool, "util-linux/coreutils")
                return False, f"'{tool}' is not installed (apt-get install -y {hint})"
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return False, "the kernel has no overlayfs (modprobe overlay)"
        with tempfile.TemporaryDirectory(prefix="disposabledisco-probe-") as tmp:
            script = (
                f"mount -t tmpfs probe {_q(tmp)} && mkdir {_q(tmp)}/u {_q(tmp)}/w {_q(tmp)}/r"
                f" && mount -t overlay probe -o lowerdir=/,upperdir={_q(tmp)}/u,"
                f"workdir={_q(tmp)}/w {_q(tmp)}/r && test -x {_q(tmp)}/r{_q(sshd_path)}"
                # the node network: a bridge, a veth pair on it, 127/8 allowed on links
                " && ip link add probe0 type bridge && ip link add probe1 type veth peer"
                " name probe2 && ip link set probe1 master probe0"
                " && echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet"
            )
            try:
                probe = subprocess.run(
                    ["unshare", "--mount", "--uts", "--pid", "--net", "--fork",
                     "--propagation", "private", "--", "/bin/sh", "-c", script],
                    capture_output=True, timeout=20, env=_CLEAN_ENV,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                _available = (False, f"cannot run unshare: {exc}")
                return _available
            if probe.returncode != 0:
                err = probe.stderr.decode(errors="replace").strip().splitlines()
                why = err[-1] if err else f"exit status {probe.returncode}"
                _available = (False, "cannot create an overlay in a mount namespace or a "
                                     f"bridge and veth pair in a network namespace: {why}")
                return _available
        _available = (True, "")
        return _available

    # ------------------------------------------------------------------ nodes
    @property
    def nodes(self) -> dict[str, Node]:
        """A snapshot of the running nodes by instance id."""
        with self._lock:
            return dict(self._nodes)

    def node(self, instance_id: str) -> Node:
        """The running node of ``instance_id`` (``NodeError`` if there is none)."""
        with self._lock:
            node = self._nodes.get(instance_id)
        if node is None:
            raise NodeError(f"no node for instance {instance_id} in this farm")
        return node

    def start(
        self,
        instance_id: str,
        address: str,
        hostname: str | None = None,
        login_user: str | None = None,
        authorized_key: str | None = None,
    ) -> Node:
        """Start a node for ``instance_id`` listening at ``address:22``; returns once sshd
        listens. ``hostname`` defaults to the EC2 style name of the address; user and
        key default to the farm's. Starting an instance that already runs at the same
        address returns the running node (callbacks may repeat)."""
        node = self._spawn(instance_id, address, hostname, login_user, authorized_key)
        self._await_ready(node)
        return node

    def start_many(
        self,
        specs: Iterable[tuple[str, str] | tuple[str, str, str | None]],
        *,
        keep_going: bool = False,
    ) -> list[Node]:
        """Start many nodes at once from ``(instance_id, address[, hostname])`` tuples:
        all are spawned first, then awaited, so N nodes cost about one startup, not N.

        By default it is all or nothing (the first failure stops the nodes started here
        and is raised). With ``keep_going`` every node that can start is started and one
        ``NodeError`` listing the failures is raised at the end, if any failed.
        """
        spawned: list[Node] = []
        failures: list[str] = []
        try:
            for spec in specs:
                iid, address, *rest = spec
                try:
                    spawned.append(self._spawn(iid, address, rest[0] if rest else None,
                                               None, None))
                except NodeError as exc:
                    if not keep_going:
                        raise
                    failures.append(str(exc))
            ready = []
            for node in spawned:
                try:
                    self._await_ready(node)
                    ready.append(node)
                except NodeError as exc:
                    if not keep_going:
                        raise
                    failures.append(str(exc))
        except BaseException:
            for node in spawned:
                with contextlib.suppress(NodeError):
                    self.stop(node.instance_id)
            raise
        if failures:
            raise NodeError(f"{len(failures)} of {len(failures) + len(ready)} nodes did not "
                            "start: " + "; ".join(failures))
        return ready

    def stop(self, instance_id: str) -> bool:
        """Stop a node: every process in it dies and its writes vanish. Returns whether
        there was such a node. Waits until the processes are gone, so the address can be
        reused at once."""
        with self._lock:
            node = self._nodes.pop(instance_id, None)
        if node is None:
            return False
        self._terminate(node)
        return True

    def stop_all(self) -> None:
        """Stop every node of this farm (also run by ``__exit__`` and at interpreter exit)."""
        with self._lock:
            nodes = list(self._nodes.values())
            self._nodes.clear()
        for node in nodes:  # all at once, then wait for each
            self._kill(node)
        for node in nodes:
            try:
                self._terminate(node, unplug=False)
            except Exception:  # keep going: the others must still be stopped
                log.exception("could not stop node %s", node.instance_id)
        self._unplug(nodes)

    # ------------------------------------------------------------------ EC2 glue
    def on_launch(self, instance_id: str, private_ip: str) -> None:
        """Spot market callback: an instance was launched with this private IP."""
        if private_ip:
            self.start(instance_id, private_ip)

    def on_terminate(self, instance_id: str) -> None:
        """Spot market callback: an instance was terminated."""
        self.stop(instance_id)

    def sync(self, instances: Iterable[tuple[str, str | None, str]]) -> tuple[list[str], list[str]]:
        """Converge the farm to ``(instance_id, private_ip, state)`` tuples as EC2
        describes them: start nodes for running instances that have none, stop nodes of
        instances that are shutting down, stopped or terminated (or whose address
        changed). Instances not listed are left alone. Returns (started, stopped) ids.
        A node that cannot start does not keep the others from starting; the failures
        are raised together afterwards as one ``NodeError``."""
        wanted: list[tuple[str, str]] = []
        stopped: list[str] = []
        current = self.nodes
        for instance_id, address, state in instances:
            node = current.get(instance_id)
            if state in _RUNNING_STATES and address:
                if node is not None and node.address != address:
                    self.stop(instance_id)
                    stopped.append(instance_id)
                    node = None
                if node is None:
                    wanted.append((instance_id, address))
            elif state in _GONE_STATES and node is not None and self.stop(instance_id):
                stopped.append(instance_id)
        started = [n.instance_id for n in self.start_many(wanted, keep_going=True)]
        return started, stopped

    # ------------------------------------------------------------------ test hooks
    def host_public_key(self, instance_id: str) -> str:
        """The node's host key as ``ssh-ed25519 AAAA…`` (what a client should see)."""
        return self.node(instance_id).host_public_key

    def console_output(self, instance_id: str) -> str:
        """What EC2's GetConsoleOutput would show for the node once cloud-init ran: the
        host key fingerprint and public key blocks (for ``HOST_KEY_POLICY: console``
        in the sandbox). Empty if there is no such node, like a console not written yet."""
        with self._lock:
            node = self._nodes.get(instance_id)
        if node is None or not node.host_public_key:
            return ""
        keytype, b64 = node.host_public_key.split()[:2]
        digest = hashlib.sha256(base64.b64decode(b64)).digest()
        fingerprint = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
        name = keytype.removeprefix("ssh-").upper()
        return "\r\n".join([
            f"[    1.000000] Linux version (disposabledisco node {node.hostname})",
            f"Cloud-init v. 23.1 running 'modules:final' on {node.hostname}",
            "-----BEGIN SSH HOST KEY FINGERPRINTS-----",
            f"256 {fingerprint} root@{node.hostname} ({name})",
            "-----END SSH HOST KEY FINGERPRINTS-----",
            "-----BEGIN SSH HOST KEY KEYS-----",
            f"{keytype} {b64} root@{node.hostname}",
            "-----END SSH HOST KEY KEYS-----",
            "",
        ])

    def kill_sshd(self, instance_id: str) -> list[int]:
        """Kill the node's sshd (listener and sessions) but keep the node and its files:
        new connections are refused, as with a crashed or not yet started sshd. Returns
        the host pids that were killed. A node still starting is waited for first, so
        its sshd cannot come up after the kill."""
        node = self.node(instance_id)
        node._ready.wait(self.start_timeout)
        victims = [pid for pid, comm in self._processes(node) if comm.startswith("sshd")]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_gone(node, victims)
        return victims

    def restart_sshd(self, instance_id: str) -> Node:
        """(Re)start the node's sshd (killing a running one first) with its current host
        key; returns when it listens again."""
        node = self.node(instance_id)
        self.kill_sshd(instance_id)
        node._ready.clear()
        node._failed = ""
        node._spawned_at = time.monotonic()
        os.kill(node.init_pid, signal.SIGUSR1)
        self._await_ready(node, record=False)
        return node

    def replace_host_key(self, instance_id: str) -> str:
        """Give the node a new host key (as if the instance were rebuilt, or as a
        man-in-the-middle would) and restart its sshd; returns the new public key."""
        node = self.node(instance_id)
        private, public = generate_ed25519_key(f"root@{node.hostname}")
        key = "/etc/ssh/ssh_host_ed25519_key"
        self.exec(
            instance_id,
            ["sh", "-c", f"umask 077 && cat > {key}.new && mv -f {key}.new {key}"
                         f" && printf '%s\\n' {_q(public)} > {key}.pub"],
            input=private.encode(),
        )
        node.host_public_key = _strip_comment(public)
        self.restart_sshd(instance_id)
        return node.host_public_key

    @contextlib.contextmanager
    def network_of(self, instance_id: str) -> Iterator[None]:
        """Inside the block, sockets this thread creates live in the node's network
        namespace (and stay there afterwards): a test double that the node itself must
        reach at its own address (``127.10.0.4:PORT``, ``localhost``) is made in here.
        Only the calling thread switches; nodes must not be started from inside."""
        node = self.node(instance_id)
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(f"/proc/{node.init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(target, _CLONE_NEWNET) != 0:
                    raise NodeError(f"{instance_id}: cannot enter the node's network: "
                                    f"{os.strerror(ctypes.get_errno())}")
            finally:
                os.close(target)
            try:
                yield
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    raise NodeError("cannot return to this machine's network: "
                                    f"{os.strerror(ctypes.get_errno())}")
        finally:
            os.close(own)

    def exec(
        self,
        instance_id: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 60.0,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` as root (or ``user``) inside the node — its mounts, hostname,
        processes, network and root directory — for assertions and fault injection. Never goes
        through ssh. ``check`` raises ``NodeError`` on a non-zero exit."""
        node = self.node(instance_id)
        command = ["nsenter", "-t", str(node.init_pid), "-m", "-u", "-p", "-n", "--",
                   "chroot"]
        if user is not None:
            command.append(f"--userspec={user}")
        command += [node.root, *argv]
        try:
            done = subprocess.run(command, input=input, capture_output=True,
                                  timeout=timeout, env=_CLEAN_ENV)
        except subprocess.TimeoutExpired as exc:
            raise NodeError(f"{instance_id}: {shlex.join(argv)} timed out after "
                            f"{timeout:g} s") from exc
        if check and done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().replace("\n", " | ")
            raise NodeError(f"{instance_id}: {shlex.join(argv)} exited with status "
                            f"{done.returncode}: {err[-500:]}")
        return done

    # ------------------------------------------------------------------ internals
    def _spawn(
        self,
        instance_id: str,
        address: str,
        hostname: str | None,
        login_user: str | None,
        authorized_key: str | None,
    ) -> Node:
        if self._closed:
            raise NodeError("this node farm is closed")
        if not _SAFE_NAME.match(instance_id):
            raise NodeError(f"instance id {instance_id!r} is not a safe name")
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError as exc:
            raise NodeError(f"{instance_id}: {address!r} is not an IPv4 address") from exc
        if not ip.is_loopback:
            raise NodeError(f"{instance_id}: nodes listen on loopback only, not {address}")
        if ip in _MACHINE_LOOPBACK:
            raise NodeError(f"{instance_id}: {address} is in {_MACHINE_LOOPBACK}, the "
                            "machine's own loopback; give nodes another 127.X.Y.0/24")
        subnet = ipaddress.IPv4Network(f"{ip}/{_PREFIX}", strict=False)
        if ip in (subnet.network_address, subnet[1], subnet.broadcast_address):
            raise NodeError(f"{instance_id}: {address} is the network, gateway (.1) or "
                            f"broadcast address of {subnet}; nodes use .2 to .254")
        address = str(ip)
        hostname = hostname or self.hostname_for(address)
        if not _SAFE_HOST.match(hostname):
            raise NodeError(f"{instance_id}: hostname {hostname!r} is not a valid short name")
        user = login_user or self.login_user
        if not _SAFE_USER.match(user):
            raise NodeError(f"{instance_id}: login user {user!r} is not a valid user name")
        key = authorized_key if authorized_key is not None else self.authorized_key
        if not key:
            raise NodeError(f"{instance_id}: no authorized key (pass one to NodeFarm)")
        with self._lock:
            existing = self._nodes.get(instance_id)
            if existing is not None:
                if existing.address == address:
                    return existing
                raise NodeError(f"{instance_id} already runs at {existing.address}, "
                                f"not {address}")
            for other in self._nodes.values():
                if other.address == address:
                    raise AddressInUse(f"{instance_id}: {address}:22 is already used by "
                                       f"node {other.instance_id}")
            workdir = self.workdir / instance_id
            if workdir.exists():
                _safe_rmtree(workdir)
            workdir.mkdir(mode=0o700)
            (workdir / "ns").mkdir(mode=0o755)
            private, public = generate_ed25519_key(f"root@{hostname}")
            node = Node(
                instance_id=instance_id, address=address, hostname=hostname,
                login_user=user, workdir=workdir, root=str(workdir / "ns" / "root"),
                host_public_key=_strip_comment(public), log_path=workdir / "node.log",
            )
            node._spawned_at = time.monotonic()
            node.started_at = time.time()
            try:
                if self._hub is None:
                    self._hub = _Hub.start(self.start_timeout)
                self._route(node, self._hub)
                # the init script holds the host's private key: a 0600 file, never argv
                script = workdir / "init.sh"
                fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(self._script(node, self._hub, private, public, key))
                argv = ["setpriv", "--pdeathsig", "KILL", "--",
                        "unshare", "--mount", "--uts", "--pid", "--net", "--fork",
                        "--kill-child", "--propagation", "private", "--", "/bin/sh",
                        str(script)]
                node._proc = _spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=_CLEAN_ENV,
                                    close_fds=True, start_new_session=True)
            except (OSError, NodeError) as exc:
                self._unplug([node])
                _safe_rmtree(workdir)
                if isinstance(exc, NodeError):
                    raise
                raise NodeError(f"{instance_id}: cannot start node: {exc}") from exc
            node.pid = node._proc.pid
            self._nodes[instance_id] = node
        node._reader = threading.Thread(target=self._read_output, args=(node,),
                                        name=f"node-{instance_id}", daemon=True)
        node._reader.start()
        return node

    def _route(self, node: Node, hub: _Hub) -> None:
        """Make the machine reach ``node.address`` through the hub: the subnet's gateway
        on the uplink, and a /32 route in the ``local`` table (consulted before, and more
        specific than, loopback's 127.0.0.0/8). Names the node's veth on the bridge."""
        address = node.address
        if address in _listeners(22):
            raise AddressInUse(f"{node.instance_id}: {address}:22: Address already in use "
                               "(a process of this machine, outside the farm, listens there)")
        subnet = ipaddress.IPv4Network(f"{address}/{_PREFIX}", strict=False)
        gateway = str(subnet[1])
        if str(subnet) not in hub.subnets:
            _ip("addr", "add", f"{gateway}/32", "dev", hub.uplink)
            hub.subnets.add(str(subnet))
        done = _ip("route", "add", f"{address}/32", "dev", hub.uplink, "src", gateway,
                   "table", "local", check=False)
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip()
            if "File exists" in why:
                raise AddressInUse(f"{node.instance_id}: {address}: Address already in use "
                                   "(a node of another farm on this machine has it)")
            raise NodeError(f"{node.instance_id}: cannot route {address} to the node: {why}")
        node._routed = True
        node.link = f"n{next(hub.links):x}"

    def _unplug(self, nodes: Sequence[Node]) -> None:
        """Remove the nodes' routes and veths (both ends of a pair go together), at once
        rather than when the kernel reaps their namespaces: the addresses are free again.
        One ``ip`` for the routes and one for the veths, however many nodes."""
        hub = self._hub
        if hub is None:
            return
        routes = [f"route del {n.address}/32 dev {hub.uplink} table local\n"
                  for n in nodes if n._routed]
        links = [f"link del {n.link}\n" for n in nodes if n.link]
        if routes:
            _ip("-force", "-batch", "-", input="".join(routes), check=False)
        if links:
            _ip("-force", "-batch", "-", input="".join(links), hub=hub, check=False)
        for node in nodes:
            node._routed, node.link = False, ""

    def _await_ready(self, node: Node, record: bool = True) -> None:
        remaining = self.start_timeout - (time.monotonic() - node._spawned_at)
        node._ready.wait(max(0.0, remaining))
        if node.init_pid and _ppid(node.init_pid) != node.pid:
            node.init_pid = _child_of(node.pid) or 0  # the printed pid was not the init
        if node._ready.is_set() and not node._failed and node.init_pid:
            seconds = time.monotonic() - node._spawned_at
            if record:
                node.startup_seconds = seconds
                with self._lock:
                    self.startup_times.append(seconds)
            log.debug("node %s at %s:22 ready in %.3f s", node.instance_id, node.address,
                      seconds)
            return
        why = node._failed or f"sshd did not listen within {self.start_timeout:g} s"
        tail = " | ".join(node.log_tail(6))
        with self._lock:
            if self._nodes.get(node.instance_id) is node:
                del self._nodes[node.instance_id]
        self._terminate(node)
        error = AddressInUse if "Address already in use" in why + tail else NodeError
        raise error(f"{node.instance_id}: node at {node.address}:22 failed to start: {why}"
                    + (f" (log: {tail})" if tail else ""))

    def _read_output(self, node: Node) -> None:
        """Drain the node's init/sshd output: keeps the pipe from filling, feeds the log
        file and the tail, and turns sshd's "Server listening" into the ready signal."""
        assert node._proc is not None and node._proc.stdout is not None
        try:
            logfile = open(node.log_path, "a", buffering=1) if node.log_path else None  # noqa: SIM115
        except OSError:
            logfile = None
        try:
            for raw in node._proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                node._lines.append(line)
                if logfile is not None:
                    with contextlib.suppress(OSError):
                        logfile.write(line + "\n")
                if line.startswith(_MARK):
                    words = line[len(_MARK):].split()
                    if words[:1] == ["init-pid"] and len(words) > 1:
                        node.init_pid = int(words[1])
                    elif words[:1] == ["error"]:
                        node._failed = " ".join(words[1:])
                        node._ready.set()
                elif SSHD_READY in line:
                    node._ready.set()
                elif not node._ready.is_set() and (
                        "fatal:" in line or line.startswith("chroot:")
                        or "Cannot bind any address" in line):
                    node._failed = line.strip()
                    node._ready.set()
        finally:
            if not node._ready.is_set():
                node._failed = node._failed or "the node's init exited"
                node._ready.set()
            if logfile is not None:
                logfile.close()

    @staticmethod
    def _kill(node: Node) -> None:
        """SIGKILL to the node's init: the kernel kills everything in the node, and
        unshare returns once they are all gone. The init is only signalled if it is still
        the child of our recorded unshare (guards pid reuse)."""
        proc = node._proc
        if (proc is not None and proc.poll() is None and node.init_pid
                and _ppid(node.init_pid) == proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.init_pid, signal.SIGKILL)

    def _terminate(self, node: Node, unplug: bool = True) -> None:
        proc = node._proc
        if proc is not None and proc.poll() is None:
            self._kill(node)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # --kill-child takes the init with it
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log.error("node %s (pid %d) did not stop", node.instance_id, proc.pid)
        if proc is not None and proc.stdout is not None:
            if node._reader is not None and node._reader is not threading.current_thread():
                node._reader.join(timeout=5)
            with contextlib.suppress(OSError):
                proc.stdout.close()
        if unplug:
            self._unplug([node])
        for name in ("init.sh", "ns"):
            path = node.workdir / name
            if path.is_dir():
                _safe_rmtree(path)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _processes(self, node: Node) -> list[tuple[int, str]]:
        """(host pid, comm) of every process inside the node's PID namespace."""
        ns = _pid_ns(node.init_pid)
        if ns is None:
            return []
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if _pid_ns(pid) != ns:
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    found.append((pid, f.read().strip()))
            except OSError:
                continue
        return found

    def _wait_gone(self, node: Node, pids: list[int], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while time.monotonic() < deadline:
            if not any(os.path.exists(f"/proc/{pid}") and _pid_ns(pid) == _pid_ns(node.init_pid)
                       for pid in pids):
                return
            time.sleep(delay)  # polling process exit; no event exists for a non-child
            delay = min(delay * 2, 0.05)
        raise NodeError(f"{node.instance_id}: sshd processes {pids} did not exit")

    def _script(self, node: Node, hub: _Hub, private: str, public: str, key: str) -> str:
        """The node's init: plug its network into the hub, build the root, write the
        node's identity, start sshd, restart it on SIGUSR1, and reap orphans (it is pid 1
        of the node)."""
        user = _login_account(node.login_user)
        d = str(node.workdir)
        r = node.root
        home = user.home
        subnet = ipaddress.IPv4Network(f"{node.address}/{_PREFIX}", strict=False)
        conf = "/proc/sys/net/ipv4/conf"
        lines = [
            "set -eu",
            "umask 022",
            f'fail() {{ echo "{_MARK} error $*"; exit 1; }}',
            f"echo \"{_MARK} init-pid $(cut -d' ' -f4 /proc/self/stat)\"",
            # the node's own network namespace: lo, and eth0 whose peer is on the bridge
            f"H=/proc/{hub.pid}/ns/net",
            # one `ip` for the node's side; the MAC follows the address, so a node that
            # takes over an address finds every neighbour cache (machine, nodes) right
            "ip -batch - <<EOF || fail cannot plug the node into the hub",
            "link set lo up",
            f'link add eth0 address {_mac(node.address)} type veth peer name {node.link}'
            ' netns "$H"',
            f"address add {node.address}/{_PREFIX} dev eth0",
            "link set eth0 up",
            f"route add {subnet} dev eth0 src {node.address} table local",
            "EOF",
            f'nsenter --net="$H" -- ip link set {node.link} master {_BRIDGE} up'
            " || fail cannot attach its link to the bridge of the hub",
            f"echo 1 > {conf}/all/route_localnet && echo 1 > {conf}/eth0/route_localnet"
            " || fail cannot set route_localnet",
            f"D={_q(d)}; R={_q(r)}",
            f'mount -t tmpfs -o mode=0755,size={_q(self.tmpfs_size)} node "$D/ns"'
            ' || fail cannot mount a tmpfs',
            'mkdir "$D/ns/upper" "$D/ns/work" "$R"',
            'mount -t overlay node -o "lowerdir=/,upperdir=$D/ns/upper,workdir=$D/ns/work" "$R"'
            " || fail cannot mount the overlay of /",
            'mount -t proc proc "$R/proc" 2>/dev/null || mount --rbind /proc "$R/proc"',
            'mount --rbind /dev "$R/dev"',
            # a sysfs of the node's own network namespace (its eth0, not the machine's)
            'mount -t sysfs sysfs "$R/sys" 2>/dev/null || mount --rbind /sys "$R/sys"',
            'mount -t tmpfs -o mode=0755,nosuid,nodev run "$R/run"',
            'mkdir -m 0755 "$R/run/sshd"; mkdir -m 1777 "$R/run/lock"',
            'mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"',
        ]
        # hide the farm's directory (other nodes' host keys) from the node
        if not (d + "/").startswith("/tmp/"):
            lines.append(f'mount -t tmpfs -o mode=0700,size=1m hide "$R"{_q(str(self.workdir))}')
        lines += [
            'if [ -d "$R/var/lib/apt/lists" ]; then'
            ' mount -t tmpfs -o mode=0755 aptlists "$R/var/lib/apt/lists";'
            ' mkdir -m 0700 "$R/var/lib/apt/lists/partial"; fi',
            f"echo {_q(node.hostname)} > /proc/sys/kernel/hostname",
            'put() { rm -f "$R$1"; printf "%s" "$2" > "$R$1"; }',
            f"put /etc/hostname {_q(node.hostname + chr(10))}",
            f"put /etc/hosts {_q(_HOSTS.format(address=node.address, hostname=node.hostname))}",
            "put /etc/resolv.conf 'nameserver 127.0.0.1\n'",
            'if [ -d "$R/etc/apt/apt.conf.d" ]; then'
            f" put /etc/apt/apt.conf.d/99zz-disposabledisco-offline {_q(_APT_OFFLINE)}; fi",
            f"put /etc/pip.conf {_q(_PIP_OFFLINE)}",
            'rm -f "$R/root/.config/pip/pip.conf" "$R/root/.pip/pip.conf" '
            '"$R/etc/xdg/pip/pip.conf"',
            f"put /root/.bashrc {_q(_BASHRC)}",
            # the node's own identity in /etc/ssh, none of the machine's host keys
            'rm -f "$R"/etc/ssh/ssh_host_*',
            f"put /etc/ssh/sshd_config {_q(_SSHD_CONFIG.format(address=node.address))}",
            "umask 077",
            f"put /etc/ssh/ssh_host_ed25519_key {_q(private)}",
            "umask 022",
            f"put /etc/ssh/ssh_host_ed25519_key.pub {_q(public + chr(10))}",
        ]
        name = node.login_user
        if user.exists:
            # a locked password ("!") makes sshd refuse key logins when UsePAM is off
            lines.append(f'sed -i "s/^{name}:[!*]*:/{name}:*:/" "$R/etc/shadow"')
        else:
            lines += [
                f"printf '%s\\n' {_q(f'{name}:x:{user.uid}:{user.gid}:Ubuntu:{home}:/bin/bash')}"
                ' >> "$R/etc/passwd"',
                f"printf '%s\\n' {_q(f'{name}:x:{user.gid}:')} >> \"$R/etc/group\"",
                f"printf '%s\\n' {_q(f'{name}:*:19000:0:99999:7:::')} >> \"$R/etc/shadow\"",
            ]
        authorized = key if key.endswith("\n") else key + "\n"
        lines += [
            f'mkdir -p "$R"{_q(home)}/.ssh',
            f"put {_q(home + '/.ssh/authorized_keys')} {_q(authorized)}",
            f"put {_q(home + '/.bashrc')} {_q(_BASHRC)}",
            f'chown {user.uid}:{user.gid} "$R"{_q(home)} "$R"{_q(home)}/.ssh'
            f' "$R"{_q(home)}/.ssh/authorized_keys "$R"{_q(home)}/.bashrc',
            f'chmod 0755 "$R"{_q(home)}; chmod 0700 "$R"{_q(home)}/.ssh;'
            f' chmod 0600 "$R"{_q(home)}/.ssh/authorized_keys',
            "mkdir -p \"$R/etc/sudoers.d\"",
            "put /etc/sudoers.d/90-cloud-init-users "
            + _q(f"{name} ALL=(ALL) NOPASSWD:ALL\n"),
            'chmod 0440 "$R/etc/sudoers.d/90-cloud-init-users"',
            "set +e",
            f'start_sshd() {{ chroot "$R" {_q(self.sshd_path)} -D -e -f /etc/ssh/sshd_config & }}',
            "trap start_sshd USR1",
            "trap 'exit 0' TERM",
            "start_sshd",
            # pid 1 of the node: wait (and so reap orphans) forever
            "while :; do sleep 1000000 & wait; done",
        ]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Account:
    exists: bool
    uid: int
    gid: int
    home: str


def _login_account(name: str) -> _Account:
    """The login user's ids: the machine's own entry if it has that user (the overlay
    shows it), else the first free uid/gid from 1000 up."""
    try:
        entry = pwd.getpwnam(name)
        return _Account(True, entry.pw_uid, entry.pw_gid, entry.pw_dir or f"/home/{name}")
    except KeyError:
        pass
    used_uids = {p.pw_uid for p in pwd.getpwall()}
    used_gids: set[int] = set()
    with contextlib.suppress(OSError), open("/etc/group") as f:
        for line in f:
            parts = line.split(":")
            if len(parts) > 2 and parts[2].isdigit():
                used_gids.add(int(parts[2]))
    uid = 1000
    while uid in used_uids or uid in used_gids:
        uid += 1
    return _Account(False, uid, uid, f"/home/{name}")


def _strip_comment(public_line: str) -> str:
    return " ".join(public_line.split()[:2])


def port_open(address: str, port: int = 22, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections at address:port (test helper)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False
