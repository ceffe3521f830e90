"""End-to-end health check of a live cluster, from the master, the way Disco uses it.

Disco reports a wrong cookie, an unreachable sshd, a host-key prompt or a name that does
not resolve only as a worker start timeout (~32 s, retried forever). The doctor tests each
of those directly and names the node, the check and the fix.
"""

from __future__ import annotations

import json
import secrets
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import bootstrap, disco
from .cluster import Node
from .provision import desired_table, node_target, run_on_nodes, ssh_gateway_for
from .ssh import Session, SshError, SshGateway

if TYPE_CHECKING:
    from .config import Config
    from .ec2 import Ec2Gateway

OK, FAIL, SKIPPED = "ok", "fail", "skipped"
CHECK_NODE_LIFETIME_MS = 60000
#: Pings each check node given after -extra, prints `ping NODE pong|refused|not_started`.
#: A node that is registered with epmd but answers pang refused us (cookie or ports), so
#: it fails at once; one that is not registered yet is waited for (it may be booting).
PING_ERL = (
    "Ping = fun Loop(N, Host, Name, K) -> case net_adm:ping(N) of pong -> pong; "
    "pang when K =:= 0 -> not_started; pang -> Up = case net_adm:names(Host) of "
    "{ok, Names} -> lists:keymember(Name, 1, Names); _ -> false end, "
    "case Up of true -> refused; false -> timer:sleep(250), Loop(N, Host, Name, K - 1) end "
    "end end, "
    "lists:foreach(fun(A) -> [Name, Host] = string:split(A, \"@\"), N = list_to_atom(A), "
    "R = Ping(N, Host, Name, 40), io:format(\"ping ~s ~s~n\", [A, R]), "
    "case R of pong -> rpc:call(N, init, stop, []); _ -> ok end end, "
    "init:get_plain_arguments()), halt()."
)
PING_FIXES = {
    "refused": "the slave's Erlang node is up but refused the master: its cookie differs "
               "(see the cookie check) or ports 30000-30010 are blocked between them",
    "not_started": "the check node did not come up on the slave or its name does not "
                   "resolve from the master: see the names check and port 4369",
}
RERUN = "run `disposabledisco up` again"


@dataclass(frozen=True)
class Check:
    """One row of the report: a node, what was checked, the result, and how to fix it."""

    node: str
    check: str
    status: str
    detail: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAIL


@dataclass(frozen=True)
class DoctorReport:
    """All checks; the cluster is healthy when none failed (skipped ones do not count)."""

    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok,
                "checks": [{**asdict(check), "ok": check.ok} for check in self.checks]}

    def to_text(self) -> str:
        rows = [("NODE", "CHECK", "STATUS", "DETAIL")]
        rows += [(c.node, c.check, c.status.upper(), c.detail) for c in self.checks]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                 + "  " + row[3] for row in rows]
        fixes = [f"- {c.node}, {c.check}: {c.fix}" for c in self.checks if not c.ok and c.fix]
        verdict = "healthy" if self.ok else \
            f"{sum(not c.ok for c in self.checks)} check(s) failed"
        return "\n".join([line.rstrip() for line in lines] + (["", "How to fix:", *fixes]
                                                            if fixes else []) + ["", verdict])


def run_doctor(config: Config, master: Node, slaves: list[Node], ssh_gateway: SshGateway,
               vcpus: Callable[[set[str]], dict[str, int]] | None = None) -> DoctorReport:
    """Check every node from the operator and every slave from the master.

    Without `vcpus` the expected host table uses the CPU count each node reports.
    """
    return _Doctor(config, master, slaves, ssh_gateway).run(vcpus)


def doctor_cluster(config: Config, ec2: Ec2Gateway) -> DoctorReport:
    """The `doctor` command: find the live master and slaves in EC2, then check them."""
    from .reconcile import observe

    cluster = observe(config, ec2)
    master = cluster.master
    if master is None or not master.private_ip:
        return DoctorReport((Check("cluster", "master", FAIL, "no running master found",
                                   RERUN),))
    slaves = [n for n in cluster.live("slave") if n.private_ip and n.instance_id]
    with ssh_gateway_for(config, ec2) as gateway:
        return run_doctor(config, master, slaves, gateway, ec2.vcpus)


class _Doctor:
    def __init__(self, config: Config, master: Node, slaves: Sequence[Node],
                 gateway: SshGateway) -> None:
        self.config = config
        self.master = master
        self.slaves = list(slaves)
        self.members = [master, *self.slaves]
        self.gateway = gateway
        self.checks: list[Check] = []
        self.check_names: dict[str, str] = {}

    def label(self, node: Node) -> str:
        name = disco.short_name(node) if node.private_ip else node.instance_id or "?"
        return f"{name} (master)" if node is self.master else name

    def add(self, node: Node, check: str, ok: bool, detail: str = "", fix: str = "") -> None:
        self.checks.append(Check(self.label(node), check, OK if ok else FAIL, detail,
                                 "" if ok else fix))

    def run(self, vcpus: Callable[[set[str]], dict[str, int]] | None) -> DoctorReport:
        probes = self.probe_all()
        links: dict[str, dict[str, str]] = {}
        if self.master.instance_id in probes:
            try:
                with self.gateway.connect(node_target(self.config, self.master)) as session:
                    links = self.check_from_master(session)
                    self.check_table(session, probes, vcpus)
                    self.check_disco_service(session)
            except SshError as error:
                self.add(self.master, "checks on the master", False, str(error), RERUN)
        for node in self.members:
            facts = probes.get(node.instance_id)
            if facts is not None:
                self.check_node(node, facts, probes.get(self.master.instance_id) or {},
                                links.get(disco.short_name(node), {}))
        order = {self.label(node): i for i, node in enumerate(self.members)}
        return DoctorReport(tuple(sorted(self.checks, key=lambda c: order.get(c.node, -1))))

    # -- every node, from the operator -------------------------------------------------

    def probe_all(self) -> dict[str, dict[str, str]]:
        names = [disco.short_name(n) for n in self.members]
        script = bootstrap.snippet(self.config, "doctor_probe", NAMES=names)
        outcomes = run_on_nodes(self.config, self.gateway, self.members,
                                lambda s: s.script(script, sudo=True).stdout)
        probes = {}
        for node in self.members:
            outcome = outcomes[node.instance_id]
            self.add(node, "ssh from operator", outcome.ok, outcome.error,
                     "check the security group (port 22), SSH_USER and SSH_KEY_FILE")
            if outcome.ok:
                probes[node.instance_id] = _key_values(outcome.value or "")
        return probes

    def check_node(self, node: Node, facts: Mapping[str, str], master_facts: Mapping[str, str],
                   link: Mapping[str, str]) -> None:
        user = self.config["DISCO_USER"]
        if facts.get("user") == "missing":
            self.add(node, "disco user", False, f"user {user} does not exist", RERUN)
            return
        wrong = [f"{disco.short_name(m)} -> {facts.get('resolve_' + disco.short_name(m)) or '?'}"
                 f" (want {m.private_ip})" for m in self.members
                 if facts.get("resolve_" + disco.short_name(m)) != m.private_ip]
        self.add(node, "names resolve", not wrong, "; ".join(wrong) or "every member's short "
                 "name resolves to its private IP", "set MANAGE_HOSTS_FILE true (or enable VPC "
                 "DNS hostnames) and " + RERUN)
        paths = link or facts
        missing = [t for t in ("python", "erl") if not paths.get("path_" + t, paths.get(t))]
        via = "over ssh from the master" if link else f"as {user}"
        self.add(node, "python and erl on PATH", not missing,
                 f"missing {', '.join(missing)} {via}" if missing else via,
                 "install python-is-python3 and erlang-nox (BASE_PACKAGES), then " + RERUN)
        self.check_cookie(node, facts, master_facts)
        if node is self.master:
            host, want = facts.get("hostname", ""), disco.short_name(node)
            self.add(node, "master hostname", host == want, f"hostname {host}",
                     f"Disco names the master's Erlang node after its hostname: set it to "
                     f"{want} (or make {host} resolve on every node)")

    def check_cookie(self, node: Node, facts: Mapping[str, str],
                     master_facts: Mapping[str, str]) -> None:
        user = self.config["DISCO_USER"]
        mode = facts.get("cookie_mode")
        if mode is None:
            self.add(node, "erlang cookie", False, "no ~/.erlang.cookie", RERUN)
            return
        same = facts.get("cookie_sha256") == master_facts.get("cookie_sha256")
        problems = ([] if same else ["differs from the master's"]) + \
            ([] if mode == f"400 {user}" else [f"mode/owner {mode}, want 400 {user}"])
        self.add(node, "erlang cookie", not problems,
                 "; ".join(problems) or "same as the master's, mode 400",
                 "join the slave again: remove its disposabledisco:joined tag and " + RERUN)

    # -- every slave, from the master --------------------------------------------------

    def check_from_master(self, session: Session) -> dict[str, dict[str, str]]:
        """SSH and Erlang ping master -> slave; returns what each slave's PATH showed."""
        if not self.slaves:
            return {}
        output = session.script(self.master_script(), sudo=True).stdout
        return self.read_master_output(output)

    def master_script(self) -> str:
        erlang = disco.erlang_args(self.config, len(self.members))
        token = secrets.token_hex(3)
        shorts = [disco.short_name(s) for s in self.slaves]
        checks = [f"ddcheck{token}{i}@{short}" for i, short in enumerate(shorts)]
        lifetime = f"timer:apply_after({CHECK_NODE_LIFETIME_MS}, init, stop, [])."
        start = [shlex.join([*erlang, "-sname", name, "-detached", "-eval", lifetime])
                 for name in checks]
        stop = [shlex.join([*erlang, "-sname", f"ddstop{token}{i}@{short}", "-noshell", "-eval",
                            f"io:format(\"~p~n\", [rpc:call('{name}', init, stop, [])]), halt()."])
                for i, (short, name) in enumerate(zip(shorts, checks, strict=True))]
        self.check_names = dict(zip(shorts, checks, strict=True))
        return bootstrap.snippet(self.config, "doctor_master", SLAVES=shorts,
                                 CHECK_NODES=checks, START_CHECK=start, STOP_CHECK=stop,
                                 ERLANG=erlang, PING_ERL=PING_ERL)

    def read_master_output(self, output: str) -> dict[str, dict[str, str]]:
        links: dict[str, dict[str, str]] = {}
        pings = {}
        for line in output.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "ssh":
                short, status, detail = (rest.split(" ", 2) + ["", ""])[:3]
                paths = _key_values(detail.replace(" ", "\n")) if status == "ok" else {}
                links[short] = {"status": status, "detail": detail, **paths}
            elif kind == "ping":
                name, _, result = rest.partition(" ")
                pings[name] = result
        user = self.config["DISCO_USER"]
        for slave in self.slaves:
            short = disco.short_name(slave)
            link = links.get(short, {"status": "failed", "detail": "no result"})
            linked = link["status"] == "ok"
            self.add(slave, "ssh from master", linked,
                     f"as {user}, BatchMode, StrictHostKeyChecking=yes" if linked
                     else link["detail"].strip(), "join the slave again (cluster key, pinned "
                     "host key in the master's known_hosts): " + RERUN)
            name = self.check_names[short]
            result = pings.get(name, "not run")
            self.add(slave, "erlang ping from master", result == "pong", f"{name}: {result}",
                     PING_FIXES.get(result, "could not start the check; see ssh from master"))
        return {short: link for short, link in links.items() if link["status"] == "ok"}

    # -- the master's host table and Disco itself --------------------------------------

    def check_table(self, session: Session, probes: Mapping[str, Mapping[str, str]],
                    vcpus: Callable[[set[str]], dict[str, int]] | None) -> None:
        path = f"{self.config['DISCO_ROOT']}/disco_{self.config['DISCO_PORT']}.config"
        try:
            want = self.desired_table(probes, vcpus)
            have = json.loads(session.read_file(path, as_user=self.config["DISCO_USER"]))
        except (SshError, ValueError, KeyError) as error:
            self.add(self.master, "host table", False, f"{path}: {error}", RERUN)
            return
        hosts = have.get("hosts") if isinstance(have, dict) else have
        self.add(self.master, "host table", hosts == want,
                 f"{path} lists every member with string counts" if hosts == want else
                 f"{path} has {json.dumps(hosts)}, want {json.dumps(want)}", RERUN)

    def desired_table(self, probes: Mapping[str, Mapping[str, str]],
                      vcpus: Callable[[set[str]], dict[str, int]] | None) -> list[list[str]]:
        if vcpus is not None:
            counts = vcpus({n.instance_type for n in self.members})
            cpus = {n.instance_id: counts[n.instance_type] for n in self.members}
        else:
            cpus = {n.instance_id: int(probes[n.instance_id]["nproc"]) for n in self.members}
        return desired_table(self.config, self.master, self.members, cpus)

    def check_disco_service(self, session: Session) -> None:
        if self.config["DISCO_INSTALL"] == "none":
            self.checks.append(Check(self.label(self.master), "disco master answers", SKIPPED,
                                     "DISCO_INSTALL is none: Disco is neither installed "
                                     "nor started"))
            return
        url = (f"http://{self.master.private_ip}:{self.config['DISCO_PORT']}"
               "/disco/ctrl/nodeinfo")
        code = ("import sys, urllib.request\n"
                "with urllib.request.urlopen(sys.argv[1], timeout=10) as r:\n"
                "    print(r.status)\n")
        result = session.run(f"python3 -W ignore -c {shlex.quote(code)} {shlex.quote(url)}",
                             check=False)
        self.add(self.master, "disco master answers", result.ok,
                 url if result.ok else f"{url}: {result.stderr.strip().splitlines()[-1:]}",
                 f"start it as {self.config['DISCO_USER']} (`disco start`) and read "
                 f"{self.config['DISCO_ROOT']}/log")


def _key_values(text: str) -> dict[str, str]:
    """`key=value` lines (values may be empty) into a dict."""
    pairs = (line.partition("=") for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, _, value in pairs}
