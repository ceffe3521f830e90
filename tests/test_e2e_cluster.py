"""The whole tool end to end: the real CLI, the local EC2 endpoint with its spot market,
and a real sshd node (own overlay root, hostname and processes) for every instance.

One converged cluster (1 master + 4 slaves, built by a subprocess of create_cluster.py) is
shared by the tests that only look at it or change it in order (packages, scale-down,
master replacement, in that file order). Scenarios that break nodes on purpose (dead
sshd, changed host key) build small clusters of their own, with their own TAG_KEY and
subnet. Skipped with the reason when the machine cannot run real SSH nodes.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from disposabledisco import bootstrap, provision
from disposabledisco.cluster import Cluster, Node
from disposabledisco.config import load_config
from disposabledisco.disco import HOSTS_BEGIN, HOSTS_END, short_name
from disposabledisco.ec2 import Ec2Gateway
from disposabledisco.reconcile import observe
from disposabledisco.ssh import SshGateway
from tests.cli_capture import cli
from tests.e2e_fixtures import ClusterConfig, E2eEnv, terminate_cluster

pytestmark = pytest.mark.nodes

REPO = Path(__file__).resolve().parents[1]
DISCO_USER = "disco"
STAMP = "/var/lib/disposabledisco/bootstrap.sha256"
POST_INIT_OUT = "/root/dd-post-init.txt"
# Quotes, $HOME, backticks, a backslash and a heredoc: the node must run exactly this.
POST_INIT = r"""# POST_INIT of the end-to-end tests
out=/root/dd-post-init.txt
cat > "$out" <<'EOF'
single 'quotes' and "double quotes"
dollar $HOME and ${HOME} and $(id -u)
backticks `hostname` and a backslash \n
EOF
printf '%s\n' "home=$HOME" "host=$(hostname)" "it's \"quoted\"" "tick=\`not run\`" >> "$out"
echo "sub=$(echo "nested \"quote\" `echo ticked`")" >> "$out"
"""
POST_INIT_LITERAL = """single 'quotes' and "double quotes"
dollar $HOME and ${HOME} and $(id -u)
backticks `hostname` and a backslash \\n
"""
#: the dead node's SSH deadline (SSH_DEADLINE_SECONDS) for the dead-sshd scenario
DEAD_NODE_DEADLINE = 8.0


# ------------------------------------------------------------------------------ helpers
def observe_cluster(cfg: ClusterConfig) -> Cluster:
    config = load_config(cfg.path)
    return observe(config, Ec2Gateway(config))


def live(cluster: Cluster, role: str | None = None) -> list[Node]:
    return [n for n in cluster.nodes if n.is_live and (role is None or n.role == role)]


def sh(env: E2eEnv, instance_id: str, script: str) -> str:
    """Run a bash script as root inside a node (not over SSH); its stdout."""
    return env.farm.exec(instance_id, ["bash", "-c", script]).stdout.decode()


def as_disco(env: E2eEnv, instance_id: str, argv: list[str], timeout: float = 60) -> str:
    """Run argv on a node as the Disco user with that user's HOME (the cookie's place)."""
    home = disco_home(env, instance_id)
    done = env.farm.exec(instance_id, ["runuser", "-u", DISCO_USER, "--", "env",
                                       f"HOME={home}", "PATH=/usr/bin:/bin", *argv],
                         timeout=timeout)
    return done.stdout.decode()


def disco_home(env: E2eEnv, instance_id: str) -> str:
    return sh(env, instance_id, f"getent passwd {DISCO_USER} | cut -d: -f6").strip()


def cookie_of(env: E2eEnv, instance_id: str) -> tuple[str, str]:
    """(cookie, 'mode owner') of the Disco user's Erlang cookie on a node."""
    path = f"{disco_home(env, instance_id)}/.erlang.cookie"
    return (sh(env, instance_id, f"cat {path}"),
            sh(env, instance_id, f"stat -c '%a %U' {path}").strip())


def bootstraps_logged(cfg: ClusterConfig, instance_id: str) -> list[str]:
    """Digests of every completed bootstrap of a node, from the node's local log."""
    path = cfg.log_dir / f"{instance_id}.log"
    text = path.read_text() if path.exists() else ""
    return re.findall(r"bootstrap done: ([0-9a-f]{64})", text)


def log_times(text: str, marker: str) -> list[float]:
    """Timestamps (epoch seconds) of the local node log lines that contain marker."""
    return [time.mktime(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S"))
            for line in text.splitlines() if marker in line]


def log_sizes(cfg: ClusterConfig) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in cfg.log_dir.glob("*.log")}


def sshd_logins(env: E2eEnv, instance_ids: list[str]) -> dict[str, int]:
    """Logins each node's sshd accepted (its own log, independent of the client)."""
    counts = {}
    for instance_id in instance_ids:
        path = env.farm.node(instance_id).log_path
        text = path.read_text(errors="replace") if path and path.exists() else ""
        counts[instance_id] = text.count("Accepted publickey")
    return counts


def hosts_block(env: E2eEnv, instance_id: str) -> set[tuple[str, str]]:
    """The (address, name) pairs of the managed block in a node's /etc/hosts."""
    text = sh(env, instance_id, "cat /etc/hosts")
    inside, pairs = False, set()
    for line in text.splitlines():
        if line.strip() == HOSTS_BEGIN:
            inside = True
        elif line.strip() == HOSTS_END:
            inside = False
        elif inside and line.split():
            address, *names = line.split()
            pairs.update((address, name) for name in names)
    return pairs


def host_table(env: E2eEnv, cfg: ClusterConfig, master_id: str) -> list[list[str]]:
    path = f"{cfg.values.get('DISCO_ROOT', '/srv/disco')}/disco_8989.config"
    return json.loads(sh(env, master_id, f"cat {path}"))["hosts"]


def wait_until(what: str, check: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def ec2_calls(env: E2eEnv) -> Iterator[list[str]]:
    """Every EC2 action that reaches the endpoint meanwhile, as the server sees it."""
    seen: list[str] = []

    def hook(action: str | None) -> None:
        seen.append(action or "?")

    env.endpoint.set_http_hook(hook, slot="test")
    try:
        yield seen
    finally:
        env.endpoint.set_http_hook(None, slot="test")


STEADY_CALLS = ["DescribeInstances", "DescribeSpotInstanceRequests"]


def assert_quiet_pass(env: E2eEnv, cfg: ClusterConfig, gateways: list[SshGateway],
                      exact_calls: bool = True) -> list[str]:
    """One more pass is converged: exit 0, no SSH (needs `gateways`), and the 2 describes
    (with `exact_calls` False: describes only). Returns the calls."""
    logs = log_sizes(cfg)
    with ec2_calls(env) as calls:
        code, out, err = cli("up", str(cfg.path))
    assert code == 0, out + err
    if exact_calls:
        assert sorted(calls) == STEADY_CALLS
    assert set(calls) <= set(STEADY_CALLS), calls
    assert gateways and gateways[-1].sessions_opened == 0
    assert log_sizes(cfg) == logs
    return calls


@pytest.fixture
def gateways(monkeypatch: pytest.MonkeyPatch) -> list[SshGateway]:
    """Every SSH gateway an in-process pass builds (to count its sessions)."""
    made: list[SshGateway] = []
    real = provision.ssh_gateway_for

    def recording(config, ec2=None):  # type: ignore[no-untyped-def]
        gateway = real(config, ec2)
        made.append(gateway)
        return gateway

    monkeypatch.setattr(provision, "ssh_gateway_for", recording)
    return made


class ProcessSampler:
    """Collects every distinct command line on the machine (``ps -eo args``, read from
    /proc directly: cheap enough to sample every few ms while a pass runs)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.cmdlines: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ps-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        raw = handle.read()
                except OSError:
                    continue
                if raw:
                    self.cmdlines.add(raw.replace(b"\0", b" ").decode(errors="replace"))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class Shared:
    cfg: ClusterConfig
    code: int
    output: str
    seconds: float
    sampler: ProcessSampler


@pytest.fixture(scope="module")
def shared(e2e: E2eEnv) -> Iterator[Shared]:
    """1 master + 4 slaves converged by `python create_cluster.py CONFIG --wait` (its own
    process), with the machine's process list sampled throughout."""
    cfg = e2e.new_config("e2eshared", 4, POST_INIT=POST_INIT, MASTER_MULTIPLIER=1,
                         SLAVE_MULTIPLIER=3)
    started = time.monotonic()
    with ProcessSampler() as sampler:
        done = subprocess.run(
            [sys.executable, "create_cluster.py", str(cfg.path), "--wait", "--timeout", "150"],
            cwd=REPO, capture_output=True, text=True, timeout=240)
    yield Shared(cfg, done.returncode, done.stdout + done.stderr,
                 time.monotonic() - started, sampler)
    terminate_cluster(e2e.client, cfg.tag_key)


# ------------------------------------------------------------------------------ tests
def test_up_wait_from_empty_converges_and_doctor_passes(e2e: E2eEnv, shared: Shared) -> None:
    """1: from nothing to 1 master + 4 ready slaves in one `up --wait`; doctor all OK."""
    assert shared.code == 0, shared.output
    assert "converged" in shared.output
    cluster = observe_cluster(shared.cfg)
    nodes = live(cluster)
    assert sorted(n.role for n in nodes) == ["master"] + ["slave"] * 4
    assert all(n.state == "ready" for n in nodes), [(n.key, n.state, n.reason) for n in nodes]
    assert {n.instance_id for n in nodes} <= set(e2e.farm.nodes)

    code, out, err = cli("doctor", str(shared.cfg.path), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], out + err
    checks = report["checks"]
    skipped = {c["check"] for c in checks if c["status"] == "skipped"}
    assert skipped == {"disco master answers"}
    assert [c for c in checks if c["status"] != "ok" and c["check"] not in skipped] == []
    pings = [c for c in checks if c["check"] == "erlang ping from master"]
    assert len(pings) == 4 and all("pong" in c["detail"] for c in pings)


def test_converged_pass_makes_two_describes_and_no_ssh(e2e: E2eEnv, shared: Shared,
                                                        gateways: list[SshGateway]) -> None:
    """2: a pass over a converged cluster: exit 0, 2 describe calls, zero SSH sessions."""
    ids = [n.instance_id for n in live(observe_cluster(shared.cfg))]
    logs, logins = log_sizes(shared.cfg), sshd_logins(e2e, ids)
    assert all(logins.values()), f"sshd logs show no login at all: {logins}"
    with ec2_calls(e2e) as calls:
        code, out, err = cli("up", str(shared.cfg.path))
    assert code == 0, out + err
    assert sorted(calls) == ["DescribeInstances", "DescribeSpotInstanceRequests"]
    assert len(gateways) == 1, "the pass did not build its gateway through ssh_gateway_for"
    assert (gateways[0].sessions_opened, gateways[0].connect_attempts) == (0, 0)
    assert log_sizes(shared.cfg) == logs
    assert sshd_logins(e2e, ids) == logins


def test_changing_packages_rebootstraps_every_node_once(e2e: E2eEnv, shared: Shared,
                                                        gateways: list[SshGateway]) -> None:
    """3: a new ADDITIONAL_PACKAGES re-bootstraps master and slaves exactly once each; the
    pass after that is zero-SSH again."""
    nodes = live(observe_cluster(shared.cfg))
    before = {n.instance_id: bootstraps_logged(shared.cfg, n.instance_id) for n in nodes}
    path = shared.cfg(ADDITIONAL_PACKAGES=["sudo"])  # installed here, so offline nodes have it
    config = load_config(path)
    wanted = {role: bootstrap.digest(config, role) for role in ("master", "slave")}

    code, out, err = cli("up", str(path))
    assert code == 10, out + err
    for node in nodes:
        new = bootstraps_logged(shared.cfg, node.instance_id)[len(before[node.instance_id]):]
        assert new == [wanted[node.role]], f"{node.role} {node.instance_id}: {new}"
        assert sh(e2e, node.instance_id, f"cat {STAMP}").strip() == wanted[node.role]

    assert_quiet_pass(e2e, shared.cfg, gateways)


def test_post_init_runs_exactly_as_written(e2e: E2eEnv, shared: Shared) -> None:
    """6a: POST_INIT with quotes, $HOME, backticks and a heredoc reaches every node intact
    and runs there as the script it is."""
    nodes = live(observe_cluster(shared.cfg))
    assert len(nodes) >= 3
    for node in nodes:
        hostname = sh(e2e, node.instance_id, "hostname").strip()
        expected = POST_INIT_LITERAL + "\n".join([
            "home=/root", f"host={hostname}", 'it\'s "quoted"', "tick=`not run`",
            'sub=nested "quote" ticked']) + "\n"
        assert sh(e2e, node.instance_id, f"cat {POST_INIT_OUT}") == expected
        stored = sh(e2e, node.instance_id, "cat /var/lib/disposabledisco/post_init.sh")
        assert stored == POST_INIT + "\n"


BAD_PACKAGES = ["curl; touch /tmp/dd-pwned", "$(reboot)", "`id`", "vim|sh", "git && rm -rf /",
                "-oAPT::Update::Pre-Invoke::=id", "two words", "pkg\nother", "pkg'quote"]


def test_packages_with_shell_characters_are_rejected(e2e: E2eEnv) -> None:
    """6b: a package name with shell metacharacters: exit 2 naming the field, no EC2 call."""
    cfg = e2e.new_config("e2ebadpackages", 1)
    for package in BAD_PACKAGES:
        path = cfg(ADDITIONAL_PACKAGES=["curl", package])
        with ec2_calls(e2e) as calls:
            code, out, err = cli("up", str(path))
        assert (code, calls) == (2, []), f"{package!r}: {out}{err}"
        assert "ADDITIONAL_PACKAGES[1]" in err, f"{package!r}: {err}"


def test_cookie_is_shared_private_and_never_leaks(e2e: E2eEnv, shared: Shared) -> None:
    """7: one cookie, 0400 disco on every node, and not in logs, tags, user data or argv."""
    cluster = observe_cluster(shared.cfg)
    master = cluster.master
    assert master is not None
    cookies = {n.instance_id: cookie_of(e2e, n.instance_id) for n in live(cluster)}
    cookie, _ = cookies[master.instance_id]
    assert re.fullmatch(r"[0-9A-F]{40}", cookie), cookie
    assert set(cookies.values()) == {(cookie, f"400 {DISCO_USER}")}
    key_file = f"{disco_home(e2e, master.instance_id)}/.ssh/id_ed25519"
    private_key = sh(e2e, master.instance_id, f"cat {key_file}")
    key_body = max(private_key.splitlines(), key=len)
    leaks = {"cookie": cookie, "cookie (base64)": base64.b64encode(cookie.encode()).decode(),
             "cluster key": key_body,
             "cluster key (base64)": base64.b64encode(private_key.encode()).decode()[:60]}

    def found_in(text: str) -> list[str]:
        return [name for name, value in leaks.items() if value in text]

    state_root = Path(shared.cfg.values["STATE_DIR"])
    files = [p for p in state_root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files)
    for path in files:
        assert not found_in(path.read_bytes().decode(errors="replace")), path

    tags = e2e.client.describe_tags(MaxResults=1000)["Tags"]
    assert tags and not found_in(json.dumps(tags))
    requests = e2e.client.describe_spot_instance_requests(
        Filters=[{"Name": "tag-key", "Values": [shared.cfg.tag_key]}])["SpotInstanceRequests"]
    assert not found_in(json.dumps(requests, default=str))
    for node in live(cluster):
        attribute = e2e.client.describe_instance_attribute(
            InstanceId=node.instance_id, Attribute="userData")["UserData"]
        user_data = base64.b64decode(attribute.get("Value", "")).decode(errors="replace")
        assert not found_in(user_data), node.instance_id

    sampled = shared.sampler.cmdlines
    assert shared.sampler.samples > 20
    assert any("bash -s --" in line for line in sampled), "sampling missed every bootstrap"
    assert [line for line in sampled if found_in(line)] == []


def test_erlang_ping_from_master_to_every_slave(e2e: E2eEnv, shared: Shared) -> None:
    """8: real `erl` as the Disco user on the master pings each slave by short name."""
    cluster = observe_cluster(shared.cfg)
    master, slaves = cluster.master, live(cluster, "slave")
    assert master is not None and slaves
    token = secrets.token_hex(3)
    targets = [f"ddping{token}{i}@{short_name(s)}" for i, s in enumerate(slaves)]
    for target, slave in zip(targets, slaves, strict=True):
        as_disco(e2e, slave.instance_id, [
            "erl", "-sname", target.split("@")[0], "-detached", "-noshell",
            "-eval", "timer:apply_after(60000, init, stop, [])."])
    ping = ("Ping = fun Loop(_, 0) -> pang; Loop(N, K) -> case net_adm:ping(N) of "
            "pong -> pong; pang -> timer:sleep(200), Loop(N, K - 1) end end, "
            "lists:foreach(fun(A) -> N = list_to_atom(A), R = Ping(N, 50), "
            "io:format(\"~s ~s~n\", [A, R]), rpc:call(N, init, stop, []) end, "
            "init:get_plain_arguments()), halt().")
    out = as_disco(e2e, master.instance_id, [
        "erl", "-sname", f"ddprobe{token}", "-noshell", "-eval", ping, "-extra", *targets],
        timeout=90)
    answers = dict(line.split() for line in out.splitlines() if line.count(" ") == 1)
    assert answers == {target: "pong" for target in targets}, out


def test_host_table_and_scale_down(e2e: E2eEnv, shared: Shared,
                                   gateways: list[SshGateway]) -> None:
    """9: the host table lists master + ready slaves with vCPUs x multiplier as strings;
    after scaling 4 -> 2 the removed slaves leave the table and every /etc/hosts block,
    and the next pass is quiet again."""
    vcpus = e2e.client.describe_instance_types(InstanceTypes=["m5.large"])[
        "InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"]
    cluster = observe_cluster(shared.cfg)
    master, slaves = cluster.master, live(cluster, "slave")
    assert master is not None and len(slaves) == 4

    def expected(members: list[Node]) -> dict[str, str]:
        return {short_name(master): str(vcpus * 1),
                **{short_name(s): str(vcpus * 3) for s in members}}

    table = host_table(e2e, shared.cfg, master.instance_id)
    assert table[0][0] == short_name(master)
    assert len(table) == 5 and dict(table) == expected(slaves)

    code, out, err = cli("up", str(shared.cfg(NUM_SLAVES=2)), "--wait", "--timeout", "120")
    assert code == 0, out + err
    after = observe_cluster(shared.cfg)
    kept = live(after, "slave")
    assert after.master.instance_id == master.instance_id
    assert len(kept) == 2 and {n.instance_id for n in kept} < {n.instance_id for n in slaves}
    removed = [n for n in slaves if n.instance_id not in {k.instance_id for k in kept}]
    states = {i["InstanceId"]: i["State"]["Name"] for r in e2e.client.describe_instances(
        InstanceIds=[n.instance_id for n in removed])["Reservations"] for i in r["Instances"]}
    assert set(states.values()) <= {"shutting-down", "terminated"}
    assert not {n.instance_id for n in removed} & set(e2e.farm.nodes)

    table = host_table(e2e, shared.cfg, master.instance_id)
    assert len(table) == 3 and dict(table) == expected(kept)
    members = {(n.private_ip, short_name(n)) for n in [master, *kept]}
    for node in [master, *kept]:
        assert hosts_block(e2e, node.instance_id) == members, node.instance_id
    # exactly 2 calls is test_converged_pass_after_a_lost_slave_makes_two_calls's business
    assert_quiet_pass(e2e, shared.cfg, gateways, exact_calls=False)


def test_replacing_the_master(e2e: E2eEnv, shared: Shared,
                              gateways: list[SshGateway]) -> None:
    """10: the master's instance dies; `up --wait` brings a new master and the surviving
    slaves re-join it (same instances, new shared cookie, trusted host keys); the next
    pass is quiet again."""
    cluster = observe_cluster(shared.cfg)
    old_master, slaves = cluster.master, live(cluster, "slave")
    assert old_master is not None and slaves
    old_cookie, _ = cookie_of(e2e, old_master.instance_id)
    e2e.client.terminate_instances(InstanceIds=[old_master.instance_id])
    wait_until("the old master's node to stop",
               lambda: old_master.instance_id not in e2e.farm.nodes)

    with ProcessSampler() as sampler:  # the new cookie travels to every slave meanwhile
        code, out, err = cli("up", str(shared.cfg.path), "--wait", "--timeout", "150")
        doctor = cli("doctor", str(shared.cfg.path))
    assert code == 0, out + err
    assert doctor[0] == 0, doctor[1] + doctor[2]
    after = observe_cluster(shared.cfg)
    master = after.master
    assert master is not None and master.instance_id != old_master.instance_id
    assert {n.instance_id for n in live(after, "slave")} == {n.instance_id for n in slaves}
    assert all(n.state == "ready" for n in live(after))
    assert not [e for e in e2e.market.events if e.instance_id in
                {n.instance_id for n in slaves} and e.kind != "fulfil"]

    cookie, mode = cookie_of(e2e, master.instance_id)
    assert cookie != old_cookie and mode == f"400 {DISCO_USER}"
    for slave in slaves:
        assert cookie_of(e2e, slave.instance_id) == (cookie, f"400 {DISCO_USER}")
    assert [line for line in sampler.cmdlines if cookie in line] == []

    known = sh(e2e, master.instance_id,
               f"cat {disco_home(e2e, master.instance_id)}/.ssh/known_hosts").splitlines()
    for slave in slaves:
        key = e2e.farm.host_public_key(slave.instance_id)
        lines = [line for line in known if line.split(" ", 1)[1:] == [key]]
        assert lines, f"no known_hosts line with {slave.instance_id}'s host key"
        assert set(lines[0].split(" ", 1)[0].split(",")) >= {short_name(slave),
                                                              slave.private_ip}
    assert_quiet_pass(e2e, shared.cfg, gateways, exact_calls=False)


def test_dead_sshd_fails_alone_within_its_deadline(e2e: E2eEnv, gateways: list[SshGateway],
                                                   ) -> None:
    """4: a slave whose sshd is dead costs the pass at most its own SSH deadline, is named
    in the output, and the other nodes become ready."""
    cfg = e2e.new_config("e2edead", 3, SSH_DEADLINE_SECONDS=int(DEAD_NODE_DEADLINE))
    try:
        code, out, err = cli("up", str(cfg.path))
        assert code == 10, out + err
        instances = wait_for_instances(e2e, cfg, 4)
        dead = sorted(i for i, role in instances.items() if role == "slave")[0]
        e2e.farm.kill_sshd(dead)

        started = time.monotonic()
        code, out, err = cli("up", str(cfg.path))
        took = time.monotonic() - started
        assert code == 1, out + err
        assert re.search(rf"{dead}\b.*(no SSH session|connection refused)", out), out
        assert DEAD_NODE_DEADLINE <= took < DEAD_NODE_DEADLINE + 20, took
        dead_log = (cfg.log_dir / f"{dead}.log").read_text()
        assert dead_log.count("connect attempt") > 1
        # the others finished while the dead node was still being retried (1 s resolution)
        gave_up = log_times(dead_log, "FAILED:")[-1]
        for other in (i for i in instances if i != dead):
            done = log_times((cfg.log_dir / f"{other}.log").read_text(), "bootstrap done")
            assert done and done[-1] < gave_up, (other, done, gave_up)

        cluster = observe_cluster(cfg)
        states = {n.instance_id: n.state for n in live(cluster)}
        assert states.pop(dead) != "ready"
        assert set(states.values()) == {"ready"} and len(states) == 3
    finally:
        terminate_cluster(e2e.client, cfg.tag_key)


def test_changed_host_key_is_refused(e2e: E2eEnv) -> None:
    """5: a ready slave that presents a new host key is refused (exit 1, instance and
    "host key" named); the other nodes still get their new bootstrap."""
    cfg = e2e.new_config("e2ehostkey", 2)
    try:
        code, out, err = cli("up", str(cfg.path), "--wait", "--timeout", "120")
        assert code == 0, out + err
        cluster = observe_cluster(cfg)
        master, slaves = cluster.master, sorted(live(cluster, "slave"), key=lambda n: n.key)
        victim, others = slaves[0], [master, slaves[1]]
        pin = cfg.state_dir / "hostkeys" / victim.instance_id
        pinned = pin.read_text()
        old_stamp = sh(e2e, victim.instance_id, f"cat {STAMP}")
        e2e.farm.replace_host_key(victim.instance_id)

        path = cfg(ADDITIONAL_PACKAGES=["sudo"])
        wanted = {role: bootstrap.digest(load_config(path), role) for role in ("master", "slave")}
        code, out, err = cli("up", str(path))
        assert code == 1, out + err
        assert re.search(rf"{victim.instance_id}\b.*host key", out), out
        for node in others:
            assert sh(e2e, node.instance_id, f"cat {STAMP}").strip() == wanted[node.role]
        assert sh(e2e, victim.instance_id, f"cat {STAMP}") == old_stamp
        assert pin.read_text() == pinned
        states = {n.instance_id: n.state for n in live(observe_cluster(cfg))}
        assert states[master.instance_id] == states[slaves[1].instance_id] == "ready"
        assert states[victim.instance_id] != "ready"
    finally:
        terminate_cluster(e2e.client, cfg.tag_key)


def wait_for_instances(env: E2eEnv, cfg: ClusterConfig, count: int) -> dict[str, str]:
    """Wait until the market fulfilled `count` requests and their nodes listen;
    returns {instance id: role}."""
    found: dict[str, str] = {}

    def fulfilled() -> bool:
        requests = env.client.describe_spot_instance_requests(Filters=[
            {"Name": "tag-key", "Values": [cfg.tag_key]}])["SpotInstanceRequests"]
        found.clear()
        for request in requests:
            role = next(t["Value"] for t in request["Tags"] if t["Key"] == cfg.tag_key)
            if request.get("InstanceId"):
                found[request["InstanceId"]] = role
        return len(found) == count and set(found) <= set(env.farm.nodes)

    wait_until(f"{count} fulfilled instances with nodes", fulfilled)
    return found


def test_converged_pass_after_a_lost_slave_makes_two_calls(e2e: E2eEnv,
                                                          gateways: list[SshGateway]) -> None:
    """2b: the 2-call steady state also holds once a spot slave was lost and replaced."""
    cfg = e2e.new_config("e2elost", 1)
    try:
        code, out, err = cli("up", str(cfg.path), "--wait", "--timeout", "120")
        assert code == 0, out + err
        (lost,) = live(observe_cluster(cfg), "slave")
        e2e.market.interrupt(lost.instance_id)
        wait_until("the interrupted slave's node to stop",
                   lambda: lost.instance_id not in e2e.farm.nodes)
        code, out, err = cli("up", str(cfg.path), "--wait", "--timeout", "120")
        assert code == 0, out + err
        (replacement,) = live(observe_cluster(cfg), "slave")
        assert replacement.instance_id != lost.instance_id
        assert_quiet_pass(e2e, cfg, gateways)
    finally:
        terminate_cluster(e2e.client, cfg.tag_key)


def test_forgetting_a_changed_host_key_as_told_repairs_the_cluster(e2e: E2eEnv) -> None:
    """5b: the refusal says "forget its key and run again"; doing so must give a cluster
    that works, including the master's own SSH trust in that slave (what Disco uses)."""
    cfg = e2e.new_config("e2erekey", 1)
    try:
        code, out, err = cli("up", str(cfg.path), "--wait", "--timeout", "120")
        assert code == 0, out + err
        cluster = observe_cluster(cfg)
        master, (victim,) = cluster.master, live(cluster, "slave")
        new_key = e2e.farm.replace_host_key(victim.instance_id)
        code, out, err = cli("up", str(cfg(ADDITIONAL_PACKAGES=["sudo"])))
        assert code == 1 and "host key" in out, out + err

        # the pass names the command with this config's path (the refusal itself, which
        # does not know the path, says CONFIG)
        forget = re.search(r"disposabledisco (forget-host-key (?!CONFIG )\S+ \S+)", out)
        assert forget and victim.instance_id in forget.group(1), out
        code, said, err = cli(*forget.group(1).split())
        assert code == 0, said + err
        code, out, err = cli("up", str(cfg.path), "--wait", "--timeout", "120")
        assert code == 0, out + err
        known = sh(e2e, master.instance_id,
                   f"cat {disco_home(e2e, master.instance_id)}/.ssh/known_hosts")
        entries = [line for line in known.splitlines()
                   if short_name(victim) in line.split(" ", 1)[0].split(",")]
        assert [line.split(" ", 1)[1] for line in entries] == [new_key], known
        code, out, err = cli("doctor", str(cfg.path))
        assert code == 0, out + err
    finally:
        terminate_cluster(e2e.client, cfg.tag_key)
