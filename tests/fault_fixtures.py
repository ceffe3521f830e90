"""A fault lab: the local EC2 endpoint with the spot market, real SSH nodes, and the CLI.

Registered from ``tests/conftest.py`` (``pytest_plugins``). The fault suite
(tests/test_faults.py) and the churn benchmark (bench/churn.py) share it:

* one :class:`LocalEc2` (moto on 127.0.0.1) and one :class:`NodeFarm` for the whole module,
  and per scenario a fresh moto account, a fresh :class:`SpotMarket` (its own clock and
  seed) and a distinct ``TAG_KEY`` (:meth:`FaultLab.case`);
* the market's clock follows real time (``background``) and :meth:`Case.advance` moves it
  further; the reconciler children read the same offset from a file (fault_runner's
  ``--clock-file``), so request ages and unresponsive timers are honest without waiting;
* the reconciler runs as a child process (tests/fault_runner.py) so it can be SIGKILLed;
  :meth:`Case.check_converged` checks every end-state invariant from EC2 itself and from
  inside the nodes (its last, read-only steady-state pass and `doctor` run in-process).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from disposabledisco import cli
from disposabledisco.sandbox.endpoint import DUMMY_KEY_ID, DUMMY_SECRET, LocalEc2
from disposabledisco.sandbox.market import MarketEvent, SpotMarket
from disposabledisco.sandbox.nodes import NodeFarm, generate_ed25519_key, port_open
from disposabledisco.sandbox.run import SANDBOX_PACKAGES
from tests.cli_capture import cli as run_cli

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "fault_runner.py"
INSTANCE_TYPE = "m5.large"
SPOT_PRICE = 0.03
MAX_BID = 0.10
DISCO_HOME = "/home/disco"
POST_INIT_LOG = "/root/post-init.log"
#: appends one line per run; the sleep first keeps a kill inside the script before the
#: side effect, like a real POST_INIT that does work and then records it
POST_INIT = f"sleep 0.2\necho \"$(hostname) post-init v{{version}}\" >> {POST_INIT_LOG}\n"
LIVE = ("pending", "running")
VPC_CIDR = "127.77.0.0/16"  # other suites use 127.10/16: keep clear of their sshd nodes


def missing_packages() -> list[str]:
    """Machine packages the offline nodes' bootstrap expects to find installed."""
    missing = []
    for package in SANDBOX_PACKAGES:
        status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                                capture_output=True, text=True, check=False).stdout
        if status != "installed":
            missing.append(package)
    return missing


def skip_reason() -> str | None:
    """Why the lab cannot run here, or None."""
    ok, why = NodeFarm.available()
    if not ok:
        return f"real SSH nodes unavailable: {why}"
    missing = missing_packages()
    if missing:
        return f"the offline nodes need these machine packages: {' '.join(missing)}"
    return None


def reserve_subnet(prefix: str = "127.77", probe: int = 12) -> tuple[str, int]:
    """A /24 under ``prefix`` reserved for this process: an flock held until the lab
    closes (another run of this suite, e.g. a colleague's full pytest, may be between
    cases with no node listening) and no sshd listening on its first addresses.
    Returns the subnet and the lock's file descriptor."""
    start = os.getpid() % 200
    for third in [*range(start + 1, 250), *range(1, start + 1)]:
        subnet = f"{prefix}.{third}"
        path = Path(tempfile.gettempdir()) / f"disposabledisco-faults-{subnet}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if any(port_open(f"{subnet}.{host}", 22, 0.05) for host in range(4, 4 + probe)):
            os.close(fd)
            continue
        return subnet, fd
    raise RuntimeError(f"no free /24 under {prefix}.0.0/16")


@dataclass
class Run:
    """One finished reconciler child."""

    argv: list[str]
    code: int | None
    stdout: str
    stderr: str
    events: list[dict]
    seconds: float

    @property
    def killed(self) -> bool:
        return self.code == -9

    @property
    def passes(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "pass" and not e["dry_run"]]

    @property
    def actions(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "action"]

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    def describe(self) -> str:
        return (f"{' '.join(self.argv)} -> {self.code} in {self.seconds:.1f} s\n"
                f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}")


@dataclass
class Child:
    """A reconciler child still running (see :meth:`Case.start`)."""

    case: Case
    argv: list[str]
    proc: subprocess.Popen
    started: float

    def wait(self, timeout: float = 180) -> Run:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"reconciler {self.argv} still running after {timeout} s:"
                                 f"\n{out[-2000:]}\n{err[-2000:]}") from None
        events = [e for e in self.case.events() if e.get("pid") == self.proc.pid]
        run = Run(self.argv, self.proc.returncode, out, err, events,
                  time.monotonic() - self.started)
        self.case.runs.append(run)
        return run

    def events(self) -> list[dict]:
        return [e for e in self.case.events() if e.get("pid") == self.proc.pid]

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60) -> dict:
        """The first trace event of this child matching ``predicate`` (polled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            if self.proc.poll() is not None:
                for event in self.events():
                    if predicate(event):
                        return event
                raise AssertionError(f"reconciler ended ({self.proc.returncode}) before the "
                                     f"awaited event:\n{self.proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        raise AssertionError(f"no matching trace event within {timeout} s")


@dataclass
class Case:
    """One scenario: a clean EC2 account, its own market and tag key, a config file."""

    lab: FaultLab
    name: str
    market: SpotMarket
    network: dict[str, str]
    directory: Path
    slaves: int = 3
    post_init_version: int = 1
    runs: list[Run] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def tag(self) -> str:
        return f"fault-{self.name}"

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    @property
    def trace_path(self) -> Path:
        return self.directory / "trace.jsonl"

    @property
    def clock_path(self) -> Path:
        return self.directory / "clock-offset"

    # -- config -------------------------------------------------------------------
    def write_config(self, **overrides: Any) -> Path:
        values: dict[str, Any] = {
            "AMI": self.network["image_id"], "KEY_NAME": self.network["key_name"],
            "SECURITY_GROUPS": [self.network["security_group_id"]],
            "SUBNET_ID": self.network["subnet_id"], "REGION": self.lab.endpoint.region,
            "ENDPOINT_URL": self.lab.endpoint.url, "AWS_ACCESS": DUMMY_KEY_ID,
            "AWS_SECRET": DUMMY_SECRET, "TAG_KEY": self.tag, "INSTANCE_TYPE": INSTANCE_TYPE,
            "NUM_SLAVES": self.slaves, "MAX_BID": f"{MAX_BID:g}", "SSH_USER": "ubuntu",
            "SSH_KEY_FILE": str(self.lab.key_file), "SSH_ADDRESS": "private_ip",
            "MGMT_KEY": self.lab.mgmt_key, "STATE_DIR": str(self.directory / "state"),
            "BASE_PACKAGES": list(SANDBOX_PACKAGES), "DISCO_INSTALL": "none",
            "POST_INIT": POST_INIT.format(version=self.post_init_version),
            "SPOT_OPEN_TIMEOUT_MINUTES": 2, "UNRESPONSIVE_MINUTES": 3,
            # a dead node holds a pass this long (nodes answer in milliseconds here)
            "SSH_DEADLINE_SECONDS": 30,
        }
        values.update(overrides)
        self.slaves = values["NUM_SLAVES"]
        self.config_path.write_text(json.dumps(values, indent=1))
        self.config_path.chmod(0o600)  # it holds (dummy) AWS keys: no warning noise
        return self.config_path

    # -- clock --------------------------------------------------------------------
    def sync_clock(self) -> float:
        """Write the market clock's lead over wall time for the reconciler children."""
        offset = (self.market.clock.now() - datetime.now(timezone.utc)).total_seconds()
        self.clock_path.write_text(f"{offset:.3f}\n")
        return offset

    def advance(self, seconds: float) -> list[MarketEvent]:
        """Move EC2's and the reconciler's clocks forward together."""
        events = self.market.tick(seconds)
        self.sync_clock()
        return events

    # -- reconciler children ------------------------------------------------------
    def start(self, *cli_args: str, kill_after: int = 0,
              kill_in_bootstrap: float | None = None) -> Child:
        argv = [sys.executable, str(RUNNER), "--trace", str(self.trace_path),
                "--clock-file", str(self.clock_path)]
        if kill_after:
            argv += ["--kill-after-action", str(kill_after)]
        if kill_in_bootstrap is not None:
            argv += ["--kill-in-bootstrap", str(kill_in_bootstrap)]
        args = list(cli_args) or ["up", str(self.config_path), "--wait", "--timeout", "150"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true",
               "PYTHONUNBUFFERED": "1"}
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
            env.pop(name, None)
        proc = subprocess.Popen([*argv, "--", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        return Child(self, args, proc, time.monotonic())

    def run(self, *cli_args: str, timeout: float = 180, **faults: Any) -> Run:
        return self.start(*cli_args, **faults).wait(timeout)

    def up(self, *extra: str, timeout: float = 180) -> Run:
        return self.run("up", str(self.config_path), *extra, timeout=timeout)

    def converge(self, timeout: float = 150, attempts: int = 3) -> list[Run]:
        """``up --wait`` until it answers 0, at most ``attempts`` times (as cron would
        run it again after a failed run)."""
        made = []
        for _ in range(attempts):
            run = self.up("--wait", "--timeout", str(timeout), timeout=timeout + 60)
            made.append(run)
            if run.code == 0:
                return made
        raise AssertionError("not converged:\n" + "\n".join(r.describe() for r in made))

    def events(self) -> list[dict]:
        try:
            text = self.trace_path.read_text()
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # the child is writing this very line: read it next time
                break
        return events

    # -- what exists --------------------------------------------------------------
    def instances(self) -> list[dict]:
        client = self.lab.endpoint.client()
        return [i for r in client.describe_instances()["Reservations"] for i in r["Instances"]]

    def live_instances(self) -> list[dict]:
        return [i for i in self.instances() if i["State"]["Name"] in LIVE]

    def requests(self) -> list[dict]:
        return self.lab.endpoint.client().describe_spot_instance_requests()[
            "SpotInstanceRequests"]

    def role(self, instance: dict) -> str | None:
        return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}.get(self.tag)

    def live_of(self, role: str) -> list[dict]:
        return [i for i in self.live_instances() if self.role(i) == role]

    def sh(self, instance_id: str, script: str, check: bool = True) -> str:
        return self.lab.farm.exec(instance_id, ["bash", "-c", script],
                                  check=check).stdout.decode()

    # -- the end state ------------------------------------------------------------
    def check_converged(self, post_init_runs: int = 1, slaves: int | None = None,
                        steady_exit: int = 0, doctor: bool = True) -> dict[str, Any]:
        """Every invariant of a converged cluster; returns figures for the report.

        ``slaves`` is the number expected live (default: the config's), ``steady_exit``
        what one more pass must answer (1 when the config asks for more than a budget
        allows), doing nothing either way. ``doctor=False`` skips `disposabledisco doctor`:
        its Erlang checks need a free port in 30000-30010 per node, and here every node
        shares this machine's ports (11 of them), so beyond ~10 slaves it cannot pass.
        """
        from disposabledisco.cluster import TAG_JOINED, Node
        from disposabledisco.disco import short_name

        slaves = self.slaves if slaves is None else slaves
        live = self.live_instances()
        roles = sorted(str(self.role(i)) for i in live)
        assert roles == ["master"] + ["slave"] * slaves, \
            f"live instances by role: {roles} (every live instance in the account counts)"
        live_ids = {i["InstanceId"] for i in live}
        for request in self.requests():
            state = request["State"]
            assert state != "open", f"open orphan request {request['SpotInstanceRequestId']}"
            if state == "active":
                assert request.get("InstanceId") in live_ids, \
                    f"active request {request['SpotInstanceRequestId']} without a live " \
                    f"instance ({request.get('InstanceId')})"
        farm_nodes = self.lab.farm.nodes
        missing = live_ids - set(farm_nodes)
        assert not missing, f"live instances without a node: {missing}"
        nodes = {i["InstanceId"]: Node(role=str(self.role(i)), group="", instance_type="",
                                       instance_id=i["InstanceId"],
                                       private_ip=i["PrivateIpAddress"]) for i in live}
        names = {short_name(n) for n in nodes.values()}
        probe = (f"grep -cxF -- {shlex.quote(self.lab.mgmt_key)} {DISCO_HOME}/.ssh/authorized_keys;"
                 "grep -cx '# BEGIN disposabledisco' /etc/hosts;"
                 "sed -n '/^# BEGIN disposabledisco/,/^# END disposabledisco/p' /etc/hosts"
                 " | grep -v '^#' | awk '{print $2}' | sort | tr '\\n' ' '; echo;"
                 f"cat {POST_INIT_LOG} 2>/dev/null | wc -l")
        for iid, node in nodes.items():
            lines = self.sh(iid, probe, check=False).splitlines()
            assert lines[0] == "1", f"{iid}: MGMT_KEY {lines[0]} times in authorized_keys"
            assert lines[1] == "1", f"{iid}: {lines[1]} disposabledisco blocks in /etc/hosts"
            assert set(lines[2].split()) == names, \
                f"{iid}: /etc/hosts block lists {lines[2]!r}, members are {sorted(names)}"
            assert lines[3] == str(post_init_runs), \
                f"{iid} ({node.role}): POST_INIT ran {lines[3]} times, " \
                f"expected {post_init_runs}"
        master = next(n for n in nodes.values() if n.role == "master")
        joined = {i["InstanceId"]: {t["Key"]: t["Value"] for t in i.get("Tags", [])}.get(
            TAG_JOINED) for i in live if self.role(i) == "slave"}
        # the tag is "<master id><join suffix>" (before ae8163b: + "#<pinned key digest>"):
        # joined to *this* master
        assert all((v or "").split("#", 1)[0].startswith(master.instance_id)
                   for v in joined.values()), \
            f"slaves joined to {joined}, the master is {master.instance_id}"
        table = json.loads(self.sh(master.instance_id, "cat /srv/disco/disco_8989.config"))
        hosts = [row[0] for row in table["hosts"]]
        assert sorted(hosts) == sorted(names) and hosts[0] == short_name(master), \
            f"host table {hosts}, expected master {short_name(master)} + {sorted(names)}"
        assert not self.market.callback_errors, \
            f"harness: node callbacks failed: {self.market.callback_errors}"
        if doctor:
            code, text = in_process(["doctor", str(self.config_path)])
            assert code == 0, f"doctor exit {code}:\n{text}"
        code, text, actions = self.steady_pass()
        assert code == steady_exit and not actions, \
            f"a pass over the converged cluster did something (exit {code}):\n{text}"
        return {"live": len(live), "requests": len(self.requests()),
                "instances_ever": len(self.instances())}

    def steady_pass(self) -> tuple[int, str, list[str]]:
        """One `up` in this process (a child costs a second of imports), on the shared
        clock like the children; returns exit code, output and the actions applied."""
        original = cli.run_pass
        offset = float(self.clock_path.read_text())
        applied: list[str] = []

        def run_pass(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("now", lambda: datetime.now(timezone.utc)
                              + timedelta(seconds=offset))
            report = original(*args, **kwargs)
            applied.extend(r.action.describe() for r in report.results)
            return report

        cli.run_pass = run_pass
        try:
            code, text = in_process(["up", str(self.config_path)])
        finally:
            cli.run_pass = original
        return code, text, applied

    def summary(self) -> dict[str, Any]:
        """Passes and child runs so far (for docs/faults.md)."""
        return {"runs": len(self.runs), "passes": sum(len(r.passes) for r in self.runs),
                "killed": sum(r.killed for r in self.runs),
                "tracebacks": sum(r.traceback for r in self.runs),
                "codes": [r.code for r in self.runs]}


def in_process(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this process (cheap for read-only commands), output captured."""
    code, out, err = run_cli(*argv)
    return code, out + err


class FaultLab:
    """Endpoint + node farm shared by many cases; :meth:`case` gives each a clean world."""

    def __init__(self, workdir: Path, nodes: bool = True) -> None:
        self.workdir = workdir
        self.nodes = nodes  # False: EC2 only (bench --ec2-only), no sshd nodes
        self.endpoint = LocalEc2()
        self.farm: NodeFarm | None = None
        self.market: SpotMarket | None = None
        self.subnet = ""
        self._subnet_lock: int | None = None
        private, self.public_key = generate_ed25519_key("disposabledisco-faults")
        self.key_file = workdir / "id_ed25519"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(private)
        self.mgmt_key = generate_ed25519_key("fault-suite-operator")[1]

    def __enter__(self) -> FaultLab:
        self.endpoint.start()
        if self.nodes:
            self.farm = NodeFarm(self.public_key, login_user="ubuntu")
        self.subnet, self._subnet_lock = reserve_subnet()
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop_market()
        if self.farm is not None:
            self.farm.close()
        self.endpoint.stop()
        if self._subnet_lock is not None:
            os.close(self._subnet_lock)
            self._subnet_lock = None

    def _drop_market(self) -> None:
        if self.market is not None:
            self.market.uninstall()
            self.endpoint.market = None
            self.market = None

    def _await_subnet_free(self, timeout: float = 10) -> None:
        """Nodes of the previous case must be gone before their addresses come back."""
        deadline = time.monotonic() + timeout
        busy: list[str] = []
        while time.monotonic() < deadline:
            busy = [f"{self.subnet}.{h}" for h in range(4, 40)
                    if port_open(f"{self.subnet}.{h}", 22, 0.05)]
            if not busy:
                return
            time.sleep(0.05)
        listing = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        raise RuntimeError(f"sshd still listening at {busy} after stop_all:\n"
                           + "\n".join(ln for ln in listing.splitlines()
                                       if self.subnet + "." in ln))

    def case(self, name: str, *, slaves: int = 3, seed: int = 7, tick: float = 0.1,
             **market: Any) -> Case:
        """A clean account and a new market (fulfil_delay 0.3 s unless given)."""
        self._drop_market()
        if self.farm is not None:
            self.farm.stop_all()
            self._await_subnet_free()
        self.endpoint.reset()
        market.setdefault("fulfil_delay", 0.3)
        spot = SpotMarket(seed=seed, default_price=SPOT_PRICE, region=self.endpoint.region,
                          **market)
        if self.farm is not None:
            spot.on_launch(self.farm.on_launch)
            spot.on_terminate(self.farm.on_terminate)
        spot.install(self.endpoint)
        self.endpoint.market = spot
        self.market = spot
        network = self.endpoint.setup_loopback_network(
            VPC_CIDR, f"{self.subnet}.0/24", public_key=self.public_key)
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        made = Case(self, name, spot, network, directory, slaves=slaves)
        made.sync_clock()
        if tick:
            spot.background(tick)
        made.write_config()
        return made


@pytest.fixture(scope="module")
def fault_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultLab]:
    """One endpoint and node farm for a module of fault scenarios (skips when the
    machine cannot run real SSH nodes)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with FaultLab(tmp_path_factory.mktemp("faults")) as lab:
        yield lab
