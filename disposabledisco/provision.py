"""The node phase of a pass: bootstrap nodes, join slaves to the master, apply membership.

Every step is idempotent on the node side (the scripts check before they act), so the
reconciler can call any of them again after a crash. Cluster secrets are made on the
master; the cookie and the cluster key's public half (never its private half, which stays
on the master) are copied master → slave through this process's memory only: they travel
on SSH stdin, are registered with the gateway for redaction, and are never put on a
command line, in a tag or in a log.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import bootstrap, disco
from .cluster import Node, ssh_address
from .hostkeys import HostKeyStore, HostKeyVerifier, known_hosts_line
from .ssh import (
    GivenUp,
    Outcome,
    Session,
    SshError,
    SshGateway,
    Target,
    fault_of,
    settings_from_config,
)

if TYPE_CHECKING:
    from .config import Config
    from .ec2 import Ec2Gateway

T = TypeVar("T")
VcpuLookup = Callable[[set[str]], dict[str, int]]
START_DEADLINE_SECONDS = 120
#: how disco_apply.sh's lines for the pass report begin: a restart done, one deferred
RESTARTED, RESTART_PENDING = "restarted Disco", "Disco restart pending"
DISCO_NOTES = (RESTARTED, RESTART_PENDING)
#: per-node limits (connect + work): a fresh instance may spend minutes in apt-get
BOOTSTRAP_TIMEOUT_SECONDS = 1800
NODE_STEP_TIMEOUT_SECONDS = 600
CLUSTER_SSH_PORT = 22  # Disco's master runs plain `ssh <host>` to start workers


class Stamp(str):
    """The digest a node's bootstrap stamped (equal to the plain string), and whether it
    wrote new Disco settings (a running Disco must then be restarted to read them)."""

    settings_changed: bool = False


class AppliedTable(list[list[str]]):
    """The host table as applied (equal to the plain list), plus what the master reported
    besides: that it restarted Disco because its settings changed, or that this restart
    waits until Disco has no active job (`restart_pending`)."""

    note: str = ""

    @property
    def restart_pending(self) -> bool:
        """Derived from the note, so the two can never disagree."""
        return RESTART_PENDING in self.note


class Provisioner:
    """Node work over SSH for one config; the reconciler tags instances from the outcomes."""

    def __init__(self, config: Config, ssh_gateway: SshGateway, vcpus: VcpuLookup) -> None:
        self.config = config
        self.ssh = ssh_gateway
        self.vcpus = vcpus

    def begin_pass(self) -> None:
        """Called at the start of each pass: nodes given up in the last one are tried
        again; within a pass, a node that stopped answering is tried once (ssh.GivenUp)."""
        self.ssh.begin_pass()

    # -- bootstrap -------------------------------------------------------------------

    def bootstrap(self, nodes: list[Node]) -> dict[str, Outcome[Stamp]]:
        """Run each node's role script (in parallel); the value is the digest it stamped."""
        scripts = {role: (bootstrap.render(self.config, role),
                          bootstrap.digest(self.config, role))
                   for role in {node.role for node in nodes}}
        by_id = {node.instance_id: node for node in nodes}

        def work(session: Session) -> Stamp:
            node = by_id[session.target.instance_id]
            if node.role == "master":
                self._upload(session, bootstrap.local_tarball(self.config),
                             bootstrap.tarball_sha256(self.config), bootstrap.STAGED_TARBALL)
                self._upload(session, bootstrap.local_source(self.config),
                             bootstrap.source_sha256(self.config), bootstrap.STAGED_SOURCE)
            script, digest = scripts[node.role]
            stamp = Stamp(digest)
            stamp.settings_changed = "settings-changed" in session.script(
                script, digest, sudo=True).stdout.split()
            return stamp

        return self._parallel(nodes, work, BOOTSTRAP_TIMEOUT_SECONDS)

    def _upload(self, session: Session, path: Path | None, want: str, staged: str) -> None:
        """A local DISCO_TARBALL or DISCO_SOURCE goes to the master only, unless it is
        there already (slaves get the installed tree from the master)."""
        if path is None:
            return
        have = session.run(f"install -d -m 0755 /var/lib/disposabledisco && "
                           f"{{ sha256sum {staged} 2>/dev/null || true; }}",
                           sudo=True).stdout.split(" ", 1)[0]
        if have != want:
            session.write_file(staged, path.read_bytes(), 0o644, owner="root", sudo=True)

    # -- join ------------------------------------------------------------------------

    def join(self, master: Node, slaves: list[Node]) -> dict[str, Outcome[str]]:
        """Give each slave the master's cluster key and cookie (and Disco, tarball mode),
        and trust each slave's pinned host key on the master. The value is the master id.

        When the master itself cannot be reached or read, that is the master's failure,
        not the slaves': it raises (SshError or ValueError) instead of failing each slave.
        """
        store = self.ssh.verifier.store
        pinned = [s for s in slaves if store.get(s.instance_id) is not None]
        outcomes: dict[str, Outcome[str]] = {
            s.instance_id: _failed(f"{s.instance_id}: no pinned host key yet (bootstrap it "
                                   "first), so the master cannot trust it")
            for s in slaves if s not in pinned}
        with self.ssh.connect(self._target(master)) as master_session:
            payload = self._read_cluster_secrets(master_session)
            self._trust_slaves(master_session, pinned, store)
            tree = self._tree_sha256(master_session) if pinned else ""
            by_id = {s.instance_id: s for s in pinned}
            outcomes.update(self._parallel(pinned, lambda session: self._join_slave(
                session, by_id[session.target.instance_id], master_session, master,
                payload, tree)))
        return {s.instance_id: outcomes[s.instance_id] for s in slaves}

    def _read_cluster_secrets(self, session: Session) -> bytes:
        """Cookie and the cluster's public key as two base64 lines, held in memory only."""
        result = session.script(bootstrap.snippet(self.config, "join_read"), sudo=True,
                                secret=True)
        lines = result.stdout.split()
        if len(lines) != 2:
            raise ValueError("could not read the cluster key and cookie from the master")
        self.ssh.redact(lines[0], base64.b64decode(lines[0]).decode())
        return ("\n".join(lines) + "\n").encode()

    def _trust_slaves(self, session: Session, slaves: Sequence[Node],
                      store: HostKeyStore) -> None:
        """The master's known_hosts for the Disco user, from the keys we pinned."""
        if not slaves:
            return
        names = {s.instance_id: [disco.short_name(s), s.private_ip] for s in slaves}
        entries = "".join(known_hosts_line(names[iid], store.get(iid), CLUSTER_SSH_PORT) + "\n"
                          for iid in sorted(names))
        all_names = sorted({name for group in names.values() for name in group})
        script = bootstrap.snippet(self.config, "join_known_hosts", HOST_NAMES=all_names)
        session.script(script + entries, sudo=True)

    def _join_slave(self, session: Session, slave: Node, master_session: Session,
                    master: Node, payload: bytes, want: str) -> str:
        result = session.script(bootstrap.snippet(self.config, "join_slave").encode()
                                + payload, sudo=True, secret=True)
        if want and f"tarball={want}" not in result.stdout.split():
            self._copy_tarball(session, master_session, slave, want)
        return master.instance_id

    def _tree_sha256(self, master_session: Session) -> str:
        """The installed tree a slave must have: the local DISCO_TARBALL's hash, or in
        source mode the hash of the tree the master built and unpacked ("" otherwise)."""
        if self.config["DISCO_INSTALL"] != "source":
            return bootstrap.tarball_sha256(self.config)
        answer = master_session.run("cat /var/lib/disposabledisco/tarball.sha256", sudo=True,
                                    check=False).stdout.strip()
        if len(answer) != 64:
            raise ValueError("the master has no built Disco tree yet (bootstrap it first)")
        return answer

    def _copy_tarball(self, session: Session, master_session: Session, slave: Node,
                      sha256: str) -> None:
        """Master → slave over the cluster link (no N uploads from the operator)."""
        incoming = f".disposabledisco-tarball-{secrets.token_hex(4)}.part"
        master_session.script(bootstrap.snippet(
            self.config, "join_copy", SLAVE_ADDRESS=slave.private_ip, INCOMING_NAME=incoming),
            sudo=True)
        session.script(bootstrap.snippet(self.config, "join_unpack", INCOMING_NAME=incoming,
                                         DISCO_TARBALL_SHA256=sha256), sudo=True)

    # -- membership ------------------------------------------------------------------

    def apply_membership(self, master: Node, members: list[Node],
                         drain: bool = False) -> Outcome[AppliedTable]:
        """/etc/hosts on every member, then the master's host table file and live table.
        One SSH session per member: the master's hosts and table share its session.
        `drain`: the live table only (scale-down), never Disco's settings or a restart."""
        started = time.monotonic()
        everyone = _unique([master, *members])
        try:
            table = AppliedTable(self.host_table(master, everyone))
        except (KeyError, ValueError) as error:
            return _failed(f"host table: {error}")
        errors: list[tuple[str, str, bool]] = []  # (error, fault, given up before)
        manage_hosts = self.config["MANAGE_HOSTS_FILE"]
        if manage_hosts:
            others = [n for n in everyone if n.instance_id != master.instance_id]
            results = self._parallel(others, lambda s: _write_hosts(s, everyone))
            errors += [(o.error, o.fault, o.given_up) for o in results.values() if not o.ok]
        try:
            with self.ssh.connect(self._target(master)) as session:
                if manage_hosts:
                    _write_hosts(session, everyone)
                said = self._apply_table(session, master, table, drain)
        except SshError as error:
            errors.append((str(error), fault_of(error), isinstance(error, GivenUp)))
        else:
            table.note = "; ".join(line for line in said if line.startswith(DISCO_NOTES))
        seconds = time.monotonic() - started
        if errors:
            given_up = all(g for _, _, g in errors)  # all reported earlier in this pass
            return Outcome(ok=False, error="; ".join(e for e, _, _ in errors),
                           seconds=seconds, given_up=given_up,
                           log_tail=() if given_up else tuple(self.ssh.tail(master.instance_id)),
                           fault=_blame(fault for _, fault, _ in errors))
        return Outcome(ok=True, value=table, seconds=seconds)

    def host_table(self, master: Node, members: Sequence[Node]) -> list[list[str]]:
        """The desired table, with vCPUs per instance type from the `vcpus` lookup."""
        counts = self.vcpus({n.instance_type for n in members})
        return desired_table(self.config, master, members,
                             {n.instance_id: counts[n.instance_type] for n in members})

    def _apply_table(self, session: Session, master: Node, table: list[list[str]],
                     drain: bool) -> list[str]:
        """Write and apply the table; returns what disco_apply.sh said on stdout."""
        root, port, user = (self.config[k] for k in ("DISCO_ROOT", "DISCO_PORT", "DISCO_USER"))
        # DISCO_ROOT is the Disco user's: written as that user, never through its links
        session.write_file(f"{root}/disco_{port}.config", disco.host_table_json(table),
                           0o644, owner=user, as_owner=True)
        if self.config["DISCO_INSTALL"] == "none":
            return []
        ctrl = f"http://{master.private_ip}:{port}/disco/ctrl"
        script = bootstrap.snippet(
            self.config, "disco_apply", TABLE_URL=f"{ctrl}/save_config_table",
            JOBLIST_URL=f"{ctrl}/joblist", TABLE_ONLY=int(drain),
            START_DEADLINE_SECONDS=START_DEADLINE_SECONDS)
        return session.script(script + json.dumps(table) + "\n", sudo=True).stdout.splitlines()

    # -- idle ----------------------------------------------------------------------

    def idle_probe(self, master: Node) -> str:
        """idle_probe.py's answer from the master (one SSH command); SshError or ValueError
        when the master cannot be reached."""
        url = f"http://{master.private_ip}:{self.config['DISCO_PORT']}/disco/ctrl/joblist"
        script = bootstrap.snippet(self.config, "idle_probe", JOBLIST_URL=url,
                                   PROBE_PY=bootstrap.template("idle_probe.py"))
        with self.ssh.connect(self._target(master)) as session:
            return session.script(script, sudo=True, timeout=60).stdout

    def _target(self, node: Node) -> Target:
        return node_target(self.config, node)

    def _parallel(self, nodes: Iterable[Node], fn: Callable[[Session], T],
                  timeout: float = NODE_STEP_TIMEOUT_SECONDS) -> dict[str, Outcome[T]]:
        return run_on_nodes(self.config, self.ssh, nodes, fn, timeout)


def node_target(config: Config, node: Node) -> Target:
    """Where to SSH for a node, per SSH_ADDRESS (ValueError when it has no address yet)."""
    address = ssh_address(node, config["SSH_ADDRESS"])
    if not address or not node.instance_id:
        raise ValueError(f"{node.instance_id or node.request_id}: no address to SSH to "
                         f"(SSH_ADDRESS {config['SSH_ADDRESS']})")
    return Target(node.instance_id, address, node.role)


def run_on_nodes(config: Config, gateway: SshGateway, nodes: Iterable[Node],
                 fn: Callable[[Session], T],
                 timeout: float = NODE_STEP_TIMEOUT_SECONDS) -> dict[str, Outcome[T]]:
    """run_parallel over nodes, each bounded by `timeout`; a node without an address
    fails alone."""
    outcomes: dict[str, Outcome[T]] = {}
    targets = []
    for node in nodes:
        try:
            targets.append(node_target(config, node))
        except ValueError as error:
            outcomes[node.instance_id or "?"] = _failed(str(error))
    outcomes.update(gateway.run_parallel(targets, fn, timeout=timeout))
    return outcomes


def desired_table(config: Config, master: Node, members: Sequence[Node],
                  cpus: Mapping[str | None, int]) -> list[list[str]]:
    """Master first, then the others by short name; `cpus` is keyed by instance id."""
    multipliers = {g.name: g.multiplier for g in config.groups}
    ordered = [master, *sorted((n for n in members if n.instance_id != master.instance_id),
                               key=disco.short_name)]
    return disco.host_table(
        (disco.short_name(n), cpus[n.instance_id],
         multipliers.get(n.group, config[f"{n.role.upper()}_MULTIPLIER"]))
        for n in ordered)


def _write_hosts(session: Session, members: Sequence[Node]) -> bool:
    """Rewrite the managed /etc/hosts block; True when the file changed."""
    current = session.read_file("/etc/hosts").decode()
    wanted = disco.rewrite_hosts(current, members)
    if wanted == current:
        return False
    session.write_file("/etc/hosts", wanted, 0o644, owner="root", sudo=True)
    return True


def _unique(nodes: Iterable[Node]) -> list[Node]:
    seen: dict[str, Node] = {}
    for node in nodes:
        seen.setdefault(node.instance_id or "", node)
    return list(seen.values())


def _blame(faults: Iterable[str]) -> str:
    """One fault for a step that failed on several nodes: anything that is not the node's
    (a host key, a planted path, the config) wins, so a step never burns a node for
    someone else's fault."""
    found = set(faults)
    return next((f for f in ("hostkey", "tamper", "config") if f in found), "node")


def _failed(error: str) -> Outcome[Any]:
    return Outcome(ok=False, error=error)


def ssh_gateway_for(config: Config, ec2: Ec2Gateway | None = None) -> SshGateway:
    """The gateway a pass uses: pins under STATE_DIR, node logs under STATE_DIR/logs."""
    store = HostKeyStore(config.state_dir)
    console = ec2.console_output if ec2 is not None else None
    verifier = HostKeyVerifier(config["HOST_KEY_POLICY"], store, console)
    return SshGateway(settings_from_config(config.values, config.state_dir / "logs"), verifier)


def make_provisioner(config: Config, ec2: Ec2Gateway) -> Provisioner:
    """What the CLI hands to the reconciler for node work."""
    return Provisioner(config, ssh_gateway_for(config, ec2), ec2.vcpus)
