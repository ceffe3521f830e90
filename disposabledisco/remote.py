"""Using a running cluster: `ssh`, `exec`, `put`, `get`, `tunnel`, `forget-host-key`.

Every connection goes through the host keys pinned per instance id (`hostkeys`):

* the system `ssh` (interactive log-in, the tunnel, the lines `up` prints) reads a
  per-cluster ``known_hosts`` written from the pins under the cluster's state folder, with
  ``HostKeyAlias=<instance id>`` and strict checking, so a reused address never triggers
  "REMOTE HOST IDENTIFICATION HAS CHANGED" and no prompt ever appears;
* `exec`, `put` and `get` use the SSH gateway's parallel pool (paramiko, same pins).

Commands reach the node's shell only as ``shlex``-quoted words.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shlex
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from . import statefiles
from .cluster import Cluster, Node, ssh_address
from .config import Config, plural
from .disco import short_name
from .ec2 import Ec2Gateway
from .hostkeys import HostKeyStore, HostKeyVerifier
from .ssh import Outcome, Session, SshGateway, Target, settings_from_config

T = TypeVar("T")

ROLES = ("master", "slaves", "all")
#: how long `exec`/`put`/`get` try to reach a node that should be up (not a boot wait)
CONNECT_SECONDS = 20.0
#: runs ARGV as the Disco user with the environment a non-interactive SSH command gets
#: (its ~/.bashrc, a FIFO there skipped), in its home: how Disco itself runs commands
_AS_USER = ('cd && { [ ! -f "$HOME/.bashrc" ] || . "$HOME/.bashrc" >/dev/null 2>&1 '
            '</dev/null; } && exec "$@"')


class RemoteError(Exception):
    """A usage mistake about nodes (unknown node, none running): exit 2, one line."""


@dataclass(frozen=True)
class NodeRun:
    """What one node did for `exec`: exit code (None when it could not run), output."""

    node: str
    instance_id: str
    role: str
    exit_code: int | None
    stdout: str
    stderr: str
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def label(node: Node) -> str:
    """How a node is named in output and in `get`'s folders: its short host name."""
    try:
        return short_name(node)
    except ValueError:
        return node.instance_id or node.key


def reachable(config: Config, cluster: Cluster) -> list[Node]:
    """Live nodes with a running instance and an address, the master first."""
    found = [n for n in cluster.nodes if n.is_live and n.instance_state == "running"
             and ssh_address(n, config["SSH_ADDRESS"])]
    master = cluster.master
    return sorted(found, key=lambda n: (n is not master, n.role != "master", label(n)))


def select_role(config: Config, cluster: Cluster, role: str) -> list[Node]:
    """The reachable nodes of ``role`` (master, slaves or all); RemoteError if none."""
    nodes = reachable(config, cluster)
    master = cluster.master
    if role == "master":
        nodes = [n for n in nodes if n is master]
    elif role == "slaves":
        nodes = [n for n in nodes if n.role == "slave"]
    if not nodes:
        what = {"master": "no running master", "slaves": "no running slave"}.get(
            role, "no running node")
        raise RemoteError(f"{what} in cluster {config.tag_key!r}: run `disposabledisco "
                          "status` to see what exists, `up` to create it")
    return nodes


def find_node(config: Config, cluster: Cluster, name: str) -> Node:
    """A reachable node by instance id, short name, address or `master`."""
    nodes = reachable(config, cluster)
    if name == "master":
        return select_role(config, cluster, "master")[0]
    for node in nodes:
        names = {node.instance_id, label(node), node.private_ip, node.public_ip,
                 node.private_dns, node.public_dns, ssh_address(node, config["SSH_ADDRESS"])}
        if name in names:
            return node
    known = ", ".join(f"{label(n)} ({n.instance_id})" for n in nodes) or "none"
    raise RemoteError(f"no running node {name!r} in cluster {config.tag_key!r}; give an "
                      f"instance id, short name, address or master (running: {known})")


# ------------------------------------------------------------------------- system ssh
def known_hosts_path(config: Config) -> Path:
    """The per-cluster known_hosts the system ssh reads (written from the pins)."""
    return config.state_dir / "known_hosts"


def write_known_hosts(config: Config, nodes: Sequence[Node]) -> Path:
    """(Re)write the known_hosts file from the pins of ``nodes``, keyed by instance id
    (the HostKeyAlias every ssh line uses), through `statefiles` (no planted links)."""
    store = HostKeyStore(config.state_dir)
    text = store.known_hosts({n.instance_id: [n.instance_id] for n in nodes
                              if n.instance_id})
    path = known_hosts_path(config)
    statefiles.ensure_dir(path.parent)
    statefiles.write_atomic(path, text.encode("ascii"), 0o600)
    return path


def ensure_pinned(config: Config, ec2: Ec2Gateway, node: Node) -> None:
    """Pin the node's host key if it has none yet (HOST_KEY_POLICY decides whether the
    key it offers is accepted), so the system ssh never has to ask."""
    if HostKeyStore(config.state_dir).get(node.instance_id or "") is not None:
        return
    gateway = gateway_for(config, ec2)
    with gateway.connect(node_target(config, node), deadline_seconds=CONNECT_SECONDS):
        pass


def ssh_options(config: Config, node: Node) -> list[str]:
    """The system ssh's options to reach ``node`` through its pinned key, never asking."""
    options = ["-o", f"UserKnownHostsFile={known_hosts_path(config)}",
               "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
               "-o", f"HostKeyAlias={node.instance_id}", "-o", "CheckHostIP=no",
               "-o", "UpdateHostKeys=no"]
    if config["SSH_KEY_FILE"]:
        options += ["-i", str(config.resolve_path(config["SSH_KEY_FILE"]))]
    if config["SSH_PORT"] != 22:
        options += ["-p", str(config["SSH_PORT"])]
    return options


def ssh_argv(config: Config, node: Node, command: Sequence[str] = (),
             extra: Sequence[str] = ()) -> list[str]:
    """``ssh OPTIONS [EXTRA] USER@ADDRESS [-- QUOTED COMMAND]``."""
    argv = ["ssh", *ssh_options(config, node), *extra,
            f"{config['SSH_USER']}@{ssh_address(node, config['SSH_ADDRESS'])}"]
    if command:
        argv += ["--", shlex.join(command)]
    return argv


def tunnel_argv(config: Config, node: Node, local_port: int) -> list[str]:
    """The system ssh holding the master's Disco port open on ``local_port``."""
    port = config["DISCO_PORT"]
    return ssh_argv(config, node, extra=["-N", "-o", "ExitOnForwardFailure=yes",
                                         "-o", "ServerAliveInterval=15",
                                         "-L", f"{local_port}:localhost:{port}"])


# ------------------------------------------------------------------------- pool
def gateway_for(config: Config, ec2: Ec2Gateway | None) -> SshGateway:
    """The SSH gateway of these commands: the cluster's pins and logs, a short connect
    deadline (the nodes should be up; a dead one must not hold the others for minutes)."""
    store = HostKeyStore(config.state_dir)
    verifier = HostKeyVerifier(config["HOST_KEY_POLICY"], store,
                               ec2.console_output if ec2 is not None else None)
    settings = dataclasses.replace(settings_from_config(config.values,
                                                        config.state_dir / "logs"),
                                   deadline_seconds=CONNECT_SECONDS)
    return SshGateway(settings, verifier)


def node_target(config: Config, node: Node) -> Target:
    return Target(node.instance_id or "?", ssh_address(node, config["SSH_ADDRESS"]) or "",
                  label(node))


def _parallel(config: Config, ec2: Ec2Gateway | None, nodes: Sequence[Node],
              fn: Callable[[Session, Node], T], timeout: float | None
              ) -> dict[str, Outcome[T]]:
    by_id = {n.instance_id: n for n in nodes}
    gateway = gateway_for(config, ec2)
    return gateway.run_parallel([node_target(config, n) for n in nodes],
                                lambda s: fn(s, by_id[s.target.instance_id]),
                                timeout=timeout)


def remote_command(argv: Sequence[str], as_user: str | None) -> str:
    """One shell line running exactly ``argv`` (every word quoted), as ``as_user`` via
    `sudo -n -H -u` when given."""
    if not as_user:
        return shlex.join(argv)
    return shlex.join(["sudo", "-n", "-H", "-u", as_user, "--", "sh", "-c", _AS_USER,
                       "as-user", *argv])


def run_everywhere(config: Config, ec2: Ec2Gateway | None, nodes: Sequence[Node],
                   argv: Sequence[str], as_user: str | None, timeout: float | None,
                   on_done: Callable[[NodeRun], None] | None = None) -> list[NodeRun]:
    """Run ``argv`` on every node at once; ``on_done`` sees each node as it finishes."""
    command = remote_command(argv, as_user)
    lock = threading.Lock()

    def work(session: Session, node: Node) -> NodeRun:
        result = session.run(command, check=False)
        run = NodeRun(label(node), node.instance_id or "", node.role, result.status,
                      result.stdout, result.stderr)
        if on_done:
            with lock:
                on_done(run)
        return run

    runs = []
    outcomes = _parallel(config, ec2, nodes, work, timeout)
    for node in nodes:
        outcome = outcomes[node.instance_id or "?"]
        if outcome.ok and outcome.value is not None:
            runs.append(outcome.value)
            continue
        run = NodeRun(label(node), node.instance_id or "", node.role, None, "", "",
                      outcome.error)
        if on_done:
            on_done(run)
        runs.append(run)
    return runs


def print_run(run: NodeRun, out: TextIO, err: TextIO) -> None:
    """A node's output, each line prefixed by the node; its failure as one line."""
    for line in run.stdout.splitlines():
        out.write(f"{run.node}: {line}\n")
    for line in run.stderr.splitlines():
        err.write(f"{run.node}: {line}\n")
    if run.error:
        err.write(f"{run.node}: {run.error}\n")
    out.flush()
    err.flush()


def summary(runs: Sequence[NodeRun], what: str = "exited 0") -> str:
    """``4 nodes: 3 exited 0, 1 failed (ip-… exit 1)``."""
    bad = [r for r in runs if r.exit_code != 0]
    head = f"{plural(len(runs), 'node')}: {len(runs) - len(bad)} {what}"
    if not bad:
        return head
    shown = ", ".join(f"{r.node} " + (f"exit {r.exit_code}" if r.exit_code is not None
                                      else "not done") for r in bad)
    return f"{head}, {len(bad)} failed ({shown})"



# ------------------------------------------------------------------------- files
def _remote_path(session: Session, path: str, as_user: str | None) -> str:
    if path.startswith("/"):
        return path
    if as_user:
        home = session.run(f"getent passwd {shlex.quote(as_user)} | cut -d: -f6").stdout.strip()
    else:
        home = session.home()
    return posixpath.join(home, path)


def put(config: Config, ec2: Ec2Gateway | None, nodes: Sequence[Node], local: Path,
        remote: str, as_user: str | None, timeout: float | None
        ) -> list[NodeRun]:
    """Copy ``local`` to ``remote`` on every node, atomically (temporary name, rename),
    with the local file's mode; as ``as_user`` through its own writer when given."""
    data = local.read_bytes()
    mode = local.stat().st_mode & 0o777
    if remote.endswith("/"):
        remote += local.name

    def work(session: Session, node: Node) -> str:
        path = _remote_path(session, remote, as_user)
        if as_user:
            session.write_file(path, data, mode, owner=as_user, as_owner=True)
        else:
            session.write_file(path, data, mode)
        return path

    return _file_runs(nodes, _parallel(config, ec2, nodes, work, timeout))


def get(config: Config, ec2: Ec2Gateway | None, nodes: Sequence[Node], remote: str,
        local_dir: Path, as_user: str | None, timeout: float | None) -> list[NodeRun]:
    """Fetch ``remote`` from every node into ``local_dir/<node>/<name>`` (each local file
    written to a temporary name and renamed)."""
    name = posixpath.basename(remote.rstrip("/"))
    if not name:
        raise RemoteError(f"{remote!r} names no file: give the path of a file on the nodes")

    def work(session: Session, node: Node) -> str:
        path = _remote_path(session, remote, as_user)
        data = session.read_file(path, as_user=as_user) if as_user else session.read_file(path)
        folder = local_dir / label(node)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target)

    return _file_runs(nodes, _parallel(config, ec2, nodes, work, timeout))


def _file_runs(nodes: Sequence[Node], outcomes: dict[str, Outcome[str]]) -> list[NodeRun]:
    runs = []
    for node in nodes:
        outcome = outcomes[node.instance_id or "?"]
        runs.append(NodeRun(label(node), node.instance_id or "", node.role,
                            0 if outcome.ok else None, outcome.value or "", "",
                            "" if outcome.ok else outcome.error))
    return runs


# ------------------------------------------------------------------------- pins
def forget_host_key(config: Config, instance_id: str) -> tuple[bool, Path]:
    """Drop the pin of ``instance_id``; (whether there was one, the pin's path)."""
    store = HostKeyStore(config.state_dir)
    try:
        path = store.path(instance_id)
    except ValueError as error:
        raise RemoteError(f"{instance_id!r} is not an instance id (like i-0123456789abcdef0)"
                          ) from error
    return store.forget(instance_id), path


def after_forget(config: Config, instance_id: str) -> str:
    """What happens once a pin is gone, per HOST_KEY_POLICY."""
    how = {"console": "only if it is among the host keys in the instance's EC2 console "
                      "output",
           "pin": "on first use (trust on first use: check its fingerprint in the EC2 "
                  "console if in doubt)",
           "insecure": "without any check (HOST_KEY_POLICY insecure)"}[config["HOST_KEY_POLICY"]]
    return (f"the next `disposabledisco up` (or ssh/exec) pins the key {instance_id} offers "
            f"then, {how}, and re-joins it to the master")
