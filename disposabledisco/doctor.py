"""End-to-end health check of a live cluster, from the master, the way Disco uses it.

Disco reports a wrong cookie, an unreachable sshd, a host-key prompt or a name that does
not resolve only as a worker start timeout (~32 s, retried forever). The doctor tests each
of those directly and names the node, the check and the fix; then it asks Disco itself
(its nodeinfo: every host of the table connected, none blacklisted) and runs a one-line
word count over DDFS whose exact answer it checks.

Every fix says what repairs the fault with this tool as it is: a converged `up` makes no
SSH call, so it repairs a node only when one of the node's tags tells it to (the tag to
remove is named).
"""

from __future__ import annotations

import collections
import json
import secrets
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import bootstrap, disco
from .cluster import TAG_BOOTSTRAP, TAG_HOSTS, TAG_JOINED, Node
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
#: How long the doctor waits for Disco to connect every host of its table (Disco retries a
#: worker every 15 s and a start attempt times out after ~32 s).
NODEINFO_WAIT_SECONDS = 40
#: The word count's budget (push, run, read); the script is killed 30 s after it.
JOB_SECONDS = 120
WORKER_CHECKS = "ssh from master, erlang ping from master, erlang cookie, names resolve, " \
                "python and erl on PATH"


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
               vcpus: Callable[[set[str]], dict[str, int]] | None = None, *,
               job: bool = True, nodeinfo_wait: float = NODEINFO_WAIT_SECONDS,
               job_seconds: float = JOB_SECONDS) -> DoctorReport:
    """Check every node from the operator and every slave from the master, then ask Disco.

    Without `vcpus` the expected host table uses the CPU count each node reports. `job`
    runs the word count (about a second on a healthy cluster, `job_seconds` at most).
    """
    doctor = _Doctor(config, master, slaves, ssh_gateway)
    return doctor.run(vcpus, job=job, nodeinfo_wait=nodeinfo_wait, job_seconds=job_seconds)


def doctor_cluster(config: Config, ec2: Ec2Gateway, *, job: bool = True) -> DoctorReport:
    """The `doctor` command: find the live master and the ready slaves (the members of
    Disco's table) in EC2, then check them; a live slave that is not ready yet fails."""
    from .reconcile import observe

    cluster = observe(config, ec2)
    master = cluster.master
    if master is None or not master.private_ip:
        return DoctorReport((Check("cluster", "master", FAIL, "no running master found",
                                   f"run {up_command(config)} --wait: it bids for a "
                                   "master and sets it up"),))
    live = [n for n in cluster.live("slave") if n.private_ip and n.instance_id]
    slaves = [n for n in live if n.state == "ready"]
    waiting = tuple(Check(disco.short_name(n), "slave ready", FAIL,
                          f"{n.instance_id} is {n.state}: {n.reason}".rstrip(": "),
                          f"run {up_command(config)} --wait: it bootstraps and joins "
                          "running slaves and adds them to Disco's table")
                    for n in live if n.state != "ready")
    with ssh_gateway_for(config, ec2) as gateway:
        report = run_doctor(config, master, slaves, gateway, ec2.vcpus, job=job)
    return DoctorReport(report.checks + waiting)


def up_command(config: Config) -> str:
    """The `up` command line for this config, as the user would type it."""
    return f"`disposabledisco up {config.path or 'CONFIG'}`"


def delete_tag_command(node: Node, tag: str) -> str:
    """How to make the next `up` redo a step on a node: remove the tag that records it."""
    return f"`aws ec2 delete-tags --resources {node.instance_id} --tags Key={tag}`"


def nodeinfo_checks(config: Config, master: Node, slaves: list[Node], answer: str,
                    table: Sequence[Sequence[str]], waited: float = NODEINFO_WAIT_SECONDS
                    ) -> list[Check]:
    """The checks the doctor makes of doctor_job.py's nodeinfo output (one line)."""
    doctor = _Doctor(config, master, slaves, None)
    doctor.check_nodeinfo(answer, table, waited)
    return doctor.checks


def job_check(config: Config, master: Node, output: str, line: str,
              seconds: float = JOB_SECONDS) -> Check:
    """The check the doctor makes of doctor_job.py's word count output for input `line`."""
    doctor = _Doctor(config, master, [], None)
    doctor.check_job_output(output, line, seconds)
    return doctor.checks[0]


class _Doctor:
    def __init__(self, config: Config, master: Node, slaves: Sequence[Node],
                 gateway: SshGateway | None) -> None:
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

    @property
    def up(self) -> str:
        return up_command(self.config)

    @property
    def reapply_membership(self) -> str:
        return (f"make `up` apply the membership again (a converged `up` only compares the "
                f"master's {TAG_HOSTS} tag, it never reads the table): "
                f"{delete_tag_command(self.master, TAG_HOSTS)}, then {self.up}; it writes "
                "/etc/hosts (MANAGE_HOSTS_FILE), the table file and Disco's live table")

    def rebootstrap(self, node: Node) -> str:
        return (f"make `up` bootstrap {disco.short_name(node)} again: "
                f"{delete_tag_command(node, TAG_BOOTSTRAP)}, then {self.up}")

    def rejoin(self, node: Node) -> str:
        return (f"make `up` join {disco.short_name(node)} again (cluster key, cookie, pinned "
                f"host key in the master's known_hosts): "
                f"{delete_tag_command(node, TAG_JOINED)}, then {self.up}")

    def run(self, vcpus: Callable[[set[str]], dict[str, int]] | None, *, job: bool,
            nodeinfo_wait: float, job_seconds: float) -> DoctorReport:
        assert self.gateway is not None
        probes = self.probe_all()
        links: dict[str, dict[str, str]] = {}
        if self.master.instance_id in probes:
            try:
                with self.gateway.connect(node_target(self.config, self.master)) as session:
                    links = self.check_from_master(session)
                    table = self.check_table(session, probes, vcpus)
                    self.check_disco(session, table, job, nodeinfo_wait, job_seconds)
            except SshError as error:
                self.add(self.master, "checks on the master", False, str(error),
                         "the master stopped answering over SSH during the checks: run the "
                         "doctor again; if it repeats, read the master's log named above")
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
            self.add(node, "disco user", False, f"user {user} does not exist",
                     self.rebootstrap(node) + ("" if node is self.master else
                                               ", then " + self.rejoin(node)))
            return
        wrong = [f"{disco.short_name(m)} -> {facts.get('resolve_' + disco.short_name(m)) or '?'}"
                 f" (want {m.private_ip})" for m in self.members
                 if facts.get("resolve_" + disco.short_name(m)) != m.private_ip]
        self.add(node, "names resolve", not wrong, "; ".join(wrong) or "every member's short "
                 "name resolves to its private IP", "set MANAGE_HOSTS_FILE true in the config "
                 "(or enable VPC DNS hostnames), then " + self.reapply_membership)
        paths = link or facts
        missing = [t for t in ("python", "erl") if not paths.get("path_" + t, paths.get(t))]
        via = "over ssh from the master" if link else f"as {user}"
        self.add(node, "python and erl on PATH", not missing,
                 f"missing {', '.join(missing)} {via}" if missing else via,
                 "add python-is-python3 and erlang-nox to BASE_PACKAGES and run "
                 f"{self.up} (a changed BASE_PACKAGES bootstraps every node again); if they "
                 "are listed already, " + self.rebootstrap(node))
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
        fix = self.rejoin(node) if node is not self.master else (
            self.rebootstrap(node) + " (the master's bootstrap makes the cluster cookie), "
            "then remove every slave's " + TAG_JOINED + " tag the same way so they get it")
        if mode is None:
            self.add(node, "erlang cookie", False, "no ~/.erlang.cookie", fix)
            return
        same = facts.get("cookie_sha256") == master_facts.get("cookie_sha256")
        problems = ([] if same else ["differs from the master's"]) + \
            ([] if mode == f"400 {user}" else [f"mode/owner {mode}, want 400 {user}"])
        self.add(node, "erlang cookie", not problems,
                 "; ".join(problems) or "same as the master's, mode 400", fix)

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
                     else link["detail"].strip(), self.rejoin(slave))
            name = self.check_names[short]
            result = pings.get(name, "not run")
            self.add(slave, "erlang ping from master", result == "pong", f"{name}: {result}",
                     PING_FIXES.get(result, "could not start the check; see ssh from master"))
        return {short: link for short, link in links.items() if link["status"] == "ok"}

    # -- the master's host table and Disco itself --------------------------------------

    def check_table(self, session: Session, probes: Mapping[str, Mapping[str, str]],
                    vcpus: Callable[[set[str]], dict[str, int]] | None) -> list[list[str]]:
        """The table file against the members; returns the table the members make."""
        path = f"{self.config['DISCO_ROOT']}/disco_{self.config['DISCO_PORT']}.config"
        try:
            want = self.desired_table(probes, vcpus)
        except (ValueError, KeyError) as error:
            self.add(self.master, "host table", False, f"cannot work out the table: {error}",
                     "every member needs a known instance type and a short name")
            return [[disco.short_name(n), "?"] for n in self.members]
        try:
            have = json.loads(session.read_file(path, as_user=self.config["DISCO_USER"]))
        except (SshError, ValueError) as error:
            self.add(self.master, "host table", False, f"{path}: {error}",
                     self.reapply_membership)
            return want
        hosts = have.get("hosts") if isinstance(have, dict) else have
        self.add(self.master, "host table", hosts == want,
                 f"{path} lists every member with string counts" if hosts == want else
                 f"{path} has {json.dumps(hosts)}, want {json.dumps(want)}",
                 self.reapply_membership)
        return want

    def desired_table(self, probes: Mapping[str, Mapping[str, str]],
                      vcpus: Callable[[set[str]], dict[str, int]] | None) -> list[list[str]]:
        if vcpus is not None:
            counts = vcpus({n.instance_type for n in self.members})
            cpus = {n.instance_id: counts[n.instance_type] for n in self.members}
        else:
            cpus = {n.instance_id: int(probes[n.instance_id]["nproc"]) for n in self.members}
        return desired_table(self.config, self.master, self.members, cpus)

    def check_disco(self, session: Session, table: Sequence[Sequence[str]], job: bool,
                    nodeinfo_wait: float, job_seconds: float) -> None:
        """Disco's own view of its hosts, then (with `job`) a one-line word count."""
        if self.config["DISCO_INSTALL"] == "none":
            self.checks.append(Check(self.label(self.master), "disco master answers", SKIPPED,
                                     "DISCO_INSTALL is none: Disco is neither installed "
                                     "nor started (no nodeinfo, no job)"))
            return
        url = (f"http://{self.master.private_ip}:{self.config['DISCO_PORT']}"
               "/disco/ctrl/nodeinfo")
        hosts = [str(row[0]) for row in table]
        answer = self.ask_disco(session, nodeinfo_wait + 15,
                                ["nodeinfo", url, f"{nodeinfo_wait:g}", *hosts])
        answered = self.check_nodeinfo(answer, table, nodeinfo_wait)
        if not job:
            return
        if not answered:
            self.checks.append(Check(self.label(self.master), "disco job", SKIPPED,
                                     "the Disco master does not answer"))
            return
        line = job_line(secrets.token_hex(4))
        tag = f"disposabledisco-doctor-{secrets.token_hex(4)}"
        output = self.ask_disco(session, job_seconds + 30,
                                ["wordcount", tag, f"{job_seconds:g}", line])
        self.check_job_output(output, line, job_seconds)

    def ask_disco(self, session: Session, hard_seconds: float, args: list[str]) -> str:
        """doctor_job.py on the master as the Disco user, killed after `hard_seconds`."""
        script = bootstrap.snippet(self.config, "doctor_job",
                                   JOB_PY=bootstrap.template("doctor_job.py"),
                                   HARD_SECONDS=int(hard_seconds))
        return session.script(script, *args, sudo=True, timeout=hard_seconds + 30).stdout

    def check_nodeinfo(self, output: str, table: Sequence[Sequence[str]],
                       waited: float) -> bool:
        """Checks of one nodeinfo answer; False when the master did not answer."""
        user, root = self.config["DISCO_USER"], self.config["DISCO_ROOT"]
        found = _last_line(output, "nodeinfo")
        try:
            info = json.loads(found) if found is not None else None
        except ValueError:
            info = None
        if not isinstance(info, dict):
            error = _last_line(output, "error") or _last_line(output, "timeout") or \
                (output.strip().splitlines() or ["no answer"])[-1]
            self.add(self.master, "disco master answers", False, error,
                     f"start Disco on the master: `sudo -u {user} disco start` (it prints why "
                     f"it cannot start) and read {root}/log if it stops again")
            return False
        self.add(self.master, "disco master answers", True, "nodeinfo answered")
        view = {host: entry for host, entry in info.items()
                if isinstance(entry, dict) and "connected" in entry}
        by_name = {disco.short_name(n): n for n in self.members}
        for row in table:
            host = str(row[0])
            node = by_name.get(host)
            if node is None:
                continue
            entry = view.get(host)
            if entry is None:
                self.add(node, "disco worker", False, "not in Disco's live host table",
                         self.reapply_membership)
            elif entry.get("blacklisted") is True:
                self.add(node, "disco worker", False, "blacklisted in Disco: no task runs "
                         "on it", f"if it should run jobs, whitelist it: on the master run "
                         f"`sudo -u {user} python3 -c \"from disco.core import Disco; "
                         f"Disco().whitelist('{host}')\"`")
            elif entry.get("connected") is not True:
                self.add(node, "disco worker", False,
                         f"connected: false (waited {waited:g} s): Disco cannot start its "
                         "worker there", self.worker_fix(node))
            else:
                self.add(node, "disco worker", True,
                         f"connected, {entry.get('max_workers', '?')} worker slot(s)")
        extra = sorted(set(view) - {str(row[0]) for row in table})
        if extra:
            self.add(self.master, "disco host table", False,
                     f"Disco's live table has host(s) that are no cluster member: "
                     f"{', '.join(extra)}", self.reapply_membership)
        return True

    def worker_fix(self, node: Node) -> str:
        user, root = self.config["DISCO_USER"], self.config["DISCO_ROOT"]
        short = disco.short_name(node)
        if node is self.master:
            return (f"the master starts its own worker locally with `erl`: see this node's "
                    f"other checks, then read {root}/log on the master")
        return (f"Disco starts this worker with `ssh {short} erl ...` as {user} on the "
                f"master: fix {short}'s failing checks above ({WORKER_CHECKS}); if none "
                f"failed, run on the master `sudo -u {user} ssh {short} erl -noshell -eval "
                f"'halt().'` to see the error, and read {root}/log there")

    def check_job_output(self, output: str, line: str, seconds: float) -> None:
        user = self.config["DISCO_USER"]
        want = dict(collections.Counter(line.split()))
        result = _last_line(output, "result")
        step = _last_line(output, "step") or "start"
        if step == "clean":  # the step that failed is the one before cleaning up
            steps = [ln.split(" ", 1)[1] for ln in output.splitlines()
                     if ln.startswith("step ")]
            step = steps[-2] if len(steps) > 1 else "start"
        job = _last_line(output, "job")
        events = f"`sudo -u {user} disco events {job}` on the master" if job else \
            f"`sudo -u {user} disco jobs` on the master"
        try:
            got = json.loads(result) if result is not None else None
        except ValueError:
            got = None
        if got == want:
            self.add(self.master, "disco job", True,
                     f"word count over DDFS: {len(line.split())} words counted exactly")
            return
        timeout = _last_line(output, "timeout")
        error = _last_line(output, "error")
        if got is not None:
            detail = f"word count gave {json.dumps(got, sort_keys=True)}, want " \
                     f"{json.dumps(want, sort_keys=True)}"
            fix = ("the workers run a different Disco or Python than the master: every node "
                   "must get the same DISCO_INSTALL tree; see " + events)
        elif step == "push":
            detail = (f"`ddfs chunk` of the input did not finish in {seconds:g} s"
                      if timeout else f"`ddfs chunk` failed: {error}")
            fix = ("DDFS stores blobs on connected hosts only: fix the failing disco worker "
                   "checks above; DDFS_BLOB_REPLICAS and DDFS_TAG_REPLICAS must not exceed "
                   "the number of connected hosts")
        elif step in ("run", "read"):
            detail = (f"the word count did not finish in {seconds:g} s (step {step})"
                      if timeout or "timeout" in (error or "").lower()
                      else f"the word count failed at step {step}: {error}")
            fix = (f"the workers cannot run tasks (cookie, ssh or names between nodes): fix "
                   f"the failing checks above first ({WORKER_CHECKS}, disco worker); if none "
                   f"failed, read why the tasks failed: {events}")
        else:
            said = [ln.strip() for ln in output.splitlines() if ln.strip() and
                    ln.split(" ", 1)[0] not in JOB_OUTPUT_KINDS]  # e.g. an import error
            detail = "; ".join(filter(None, [
                error or (f"no answer in {seconds:g} s" if timeout else "no result"),
                said[-1] if said else ""]))
            fix = (f"Disco's Python client must run on the master as {user}: `python3 -c "
                   f"'import disco'` must work there (DISCO_INSTALL installs it)")
        self.add(self.master, "disco job", False, detail, fix)


JOB_OUTPUT_KINDS = ("step", "job", "result", "error", "timeout", "cleanup", "nodeinfo")


def job_line(token: str) -> str:
    """The doctor's one-line input: the token makes a stale result count wrong."""
    return f"the doctor counts {token} words and the doctor counts {token}"


def _last_line(output: str, kind: str) -> str | None:
    """What follows `kind ` on the last line that starts with it."""
    found = [line[len(kind) + 1:] for line in output.splitlines()
             if line.startswith(kind + " ")]
    return found[-1].strip() if found else None


def _key_values(text: str) -> dict[str, str]:
    """`key=value` lines (values may be empty) into a dict."""
    pairs = (line.partition("=") for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, _, value in pairs}
