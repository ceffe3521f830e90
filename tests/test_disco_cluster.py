"""Real Disco on a cluster the tool converged: the `disco` tier, end to end.

Disco is built once per session by the product's own build step (`disco_source.
build_script()`, as `tests/test_disco_build.py` runs it) from the vendor bundle; the
installed tree is handed to the real CLI as `DISCO_INSTALL: "tarball"`. `up --wait`
converges 1 master + 2 slaves on the local EC2 endpoint, every instance a real sshd node
with its own network namespace (own epmd and port 8989, as Disco needs). Then, as a user
would, through the `run Disco:` line that `up` prints (`disposabledisco exec CONFIG
--role master --as disco -- ...`: the client on the master as the Disco user, the client
path that works, see `../shared/docs/disco-facts.md`):
Disco's nodeinfo shows every host connected, `ddfs chunk` pushes the input, a word count
runs with tasks on the slaves and gives exact counts. A second `up` opens no SSH session,
makes the 2 describe calls and leaves Disco alone. Then the cluster is disturbed while
Disco runs (a slave interrupted mid-job, scale 2 -> 4 -> 2 -> 1, the master replaced) and
every job must still give exact counts, with map tasks on the hosts that should run them
(docs/disco-cluster.md lists the scenarios and their times).

Skipped with the reason when the bundle, root, a build tool or real SSH nodes are missing.
"""

from __future__ import annotations

import ast
import collections
import json
import shlex
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest

from disposabledisco.cluster import Node
from disposabledisco.config import load_config
from disposabledisco.disco import short_name
from disposabledisco.sandbox.run import DEMO_TEXTS
from tests.disco_bundle import vendor_build
from tests.e2e_fixtures import ClusterConfig, E2eEnv
from tests.test_disco_build import JOB_PY
from tests.test_e2e_cluster import (  # noqa: F401 - gateways is a fixture used here
    assert_quiet_pass,
    cli,
    gateways,
    live,
    observe_cluster,
    wait_until,
)

pytestmark = [pytest.mark.disco, pytest.mark.nodes]

DISCO_USER = "disco"
#: `up --wait` converged this cluster in 9-15 s on the loaded 2-core machine
UP_TIMEOUT = 180
#: the sandbox demo's eight inputs: eight map tasks, more than the master's worker slots,
#: so the scheduler has to use the slaves
TEXTS = DEMO_TEXTS

@pytest.fixture(scope="session")
def installed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed tree of the session's one build of the vendor bundle."""
    return vendor_build(tmp_path_factory)[0]


@dataclass
class Converged:
    """The first `up --wait` of the real-Disco cluster, whatever its outcome."""

    cfg: ClusterConfig
    code: int
    out: str
    err: str
    seconds: float

    def run_disco(self) -> list[str]:
        """The `run Disco:` command that `up` printed, up to its `--` (the example command
        after it is replaced by ours), with the CLI of this tree."""
        lines = [line for line in self.out.splitlines()
                 if line.strip().startswith("run Disco:")]
        assert lines, f"up printed no 'run Disco:' line:\n{self.out}"
        argv = shlex.split(lines[-1].split("run Disco:", 1)[1])
        assert argv[0] == "disposabledisco" and "--" in argv, lines[-1]
        return [sys.executable, "-m", "disposabledisco.cli", *argv[1:argv.index("--") + 1]]


@pytest.fixture(scope="module")
def converged(e2e: E2eEnv, installed_tree: Path) -> Converged:
    cfg = e2e.new_config("ddrealdisco", 2, DISCO_INSTALL="tarball",
                         DISCO_TARBALL=str(installed_tree))
    started = time.monotonic()
    code, out, err = cli("up", str(cfg.path), "--wait", "--timeout", str(UP_TIMEOUT))
    seconds = time.monotonic() - started
    print(f"\nup --wait, 1 master + 2 slaves with real Disco: {seconds:.1f} s (exit {code})")
    if code != 0:
        print(out + err)
    return Converged(cfg, code, out, err, seconds)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def on_master(done: Converged, script: str, timeout: float = 120) -> Run:
    """Run a bash script as the Disco user on the master the way `up` told the user to
    (`disposabledisco exec CONFIG --role master --as disco -- ...`, a child process);
    the master's exit code and output, from `--json`."""
    argv = [*done.run_disco()[:-1], "--json", "--", "bash", "-c", script]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    (node,) = json.loads(result.stdout)["nodes"]
    assert node["role"] == "master", node
    return Run(node["exit_code"], node["stdout"], node["stderr"] + node["error"])


def test_up_converges_a_cluster_that_runs_disco(converged: Converged) -> None:
    assert converged.code == 0, converged.out + converged.err
    cluster = observe_cluster(converged.cfg)
    assert len(live(cluster, "master")) == 1 and len(live(cluster, "slave")) == 2
    assert all(node.state == "ready" for node in live(cluster))


def wait_connected(done: Converged, hosts: set[str], seconds: float = 60) -> None:
    """Until Disco's nodeinfo lists exactly `hosts`, all connected and none blacklisted."""
    deadline = time.monotonic() + seconds
    while True:
        info = on_master(done, "disco nodeinfo")
        assert info.returncode == 0, info.stdout + info.stderr
        # one `host<TAB>{python dict}` line per host of the table
        view = {host: ast.literal_eval(state) for host, state in
                (line.split("\t", 1) for line in info.stdout.splitlines() if "\t" in line)}
        if set(view) == hosts and all(state["connected"] and not state["blacklisted"]
                                      for state in view.values()):
            return
        assert time.monotonic() < deadline, f"not exactly {hosts} connected:\n{info.stdout}"
        time.sleep(1)


@dataclass
class JobRun:
    """A word count's outcome: its counts, the hosts that finished map tasks, its time."""

    counts: dict[str, int]
    ran_on: set[str]
    seconds: float
    line: str


def word_count(done: Converged, tag: str, texts: list[str], *, slow: float = 0,
               name: str = "wordcount", timeout: float = 300) -> JobRun:
    """`ddfs chunk` the texts into tag `data:TAG`, then the word count over that tag as job
    `name` (each map call sleeping `slow` seconds, so a job can be caught while it runs)."""
    files = "".join(f"cat > in{k}.txt <<'EOF'\n{text}EOF\n" for k, text in enumerate(texts))
    push = (f"{files}ddfs chunk data:{tag} {' '.join(f'./in{k}.txt' for k in range(len(texts)))}"
            " >/dev/null\n")
    return run_word_count(done, push, [f"tag://data:{tag}"], "chain", slow=slow, name=name,
                          timeout=timeout)


def raw_word_count(done: Converged, texts: list[str], *, slow: float, name: str) -> JobRun:
    """The word count over one `raw://TEXT` input per text: one map task each, with no
    locality (Disco takes the text as the URL's host, which is in no host table), so the
    scheduler gives each to whichever host has a free worker slot."""
    assert all("\n" not in text for text in texts), "one line per raw:// input"
    return run_word_count(done, "", [f"raw://{text}" for text in texts], "lines", slow=slow,
                          name=name, timeout=300)


def run_word_count(done: Converged, setup: str, inputs: list[str], reader: str, *,
                   slow: float, name: str, timeout: float) -> JobRun:
    """After the bash `setup`, the word count template over `inputs` with map_reader
    `reader` as job `name`, and its events, all on the master as the Disco user."""
    script = (f"set -euo pipefail\ncd \"$(mktemp -d)\"\n{setup}"
              f"cat > job.py <<'EOF'\n{JOB_PY}EOF\n"
              f"WORD_COUNT_NAME={name} WORD_COUNT_PAUSE={slow} WORD_COUNT_READER={reader}"
              f" python3 -W ignore job.py {' '.join(shlex.quote(i) for i in inputs)}"
              " || failed=$?\n"  # the events of a failed job too, to see why
              f"disco events \"$(disco jobs | grep -m 1 '^{name}@')\"\nexit ${{failed:-0}}\n")
    started = time.monotonic()
    job = on_master(done, script, timeout=timeout)
    seconds = time.monotonic() - started
    assert job.returncode == 0, job.stdout + job.stderr
    results = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, job.stdout + job.stderr
    # Disco's job events, one JSON array [time, source, message] a line: the hosts that
    # finished map tasks
    events = [json.loads(line) for line in job.stdout.splitlines() if line.startswith("[")]
    ran_on = {source for _, source, message in events if message.startswith("DONE: [map:")}
    line = next(line for line in job.stdout.splitlines() if line.startswith("JOB_"))
    return JobRun(json.loads(results[0].removeprefix("RESULT ")), ran_on, seconds, line)


def expected_counts(texts: list[str]) -> dict[str, int]:
    return dict(collections.Counter(" ".join(texts).split()))


def test_word_count_over_ddfs_runs_on_the_slaves(converged: Converged) -> None:
    assert converged.code == 0, converged.out + converged.err
    cluster = observe_cluster(converged.cfg)
    hosts = {short_name(node) for node in live(cluster)}
    slaves = {short_name(node) for node in live(cluster, "slave")}
    wait_connected(converged, hosts)
    job = word_count(converged, "words", TEXTS)
    assert job.counts == expected_counts(TEXTS)
    assert job.ran_on <= hosts and slaves <= job.ran_on, job.ran_on
    print(f"\npush + word count through `disposabledisco exec`: {job.seconds:.1f} s; "
          f"{job.line}; map tasks on {sorted(job.ran_on)}")


def test_second_pass_touches_neither_nodes_nor_disco(
        e2e: E2eEnv, converged: Converged, gateways) -> None:  # noqa: F811
    assert converged.code == 0, converged.out + converged.err
    master = live(observe_cluster(converged.cfg), "master")[0]

    def disco_state() -> tuple[str, str]:
        """The master's Disco processes (pid + start time) and its host table file."""
        ps = e2e.farm.exec(master.instance_id, ["ps", "-u", DISCO_USER, "-o", "pid=,lstart=,comm="])
        config = load_config(converged.cfg.path)
        table = e2e.farm.exec(master.instance_id, [
            "stat", "-c", "%Y %s", f"{config['DISCO_ROOT']}/disco_{config['DISCO_PORT']}.config"])
        return ps.stdout.decode(), table.stdout.decode()

    before = disco_state()
    assert "beam" in before[0], before
    assert_quiet_pass(e2e, converged.cfg, gateways)
    assert disco_state() == before


def wait_for_job_on(done: Converged, name: str, host: str = "", seconds: float = 60) -> None:
    """Until the master has assigned a task of the running job `name` to `host` (to any
    host when empty)."""
    deadline = time.monotonic() + seconds
    while True:
        seen = on_master(done, f"j=$(disco jobs | grep -m 1 '^{name}@') && disco events \"$j\"")
        if any(" assigned to " + host in json.loads(line)[2]
               for line in seen.stdout.splitlines() if line.startswith("[")):
            return
        assert time.monotonic() < deadline, f"job {name} never reached {host}:\n{seen.stdout}"
        time.sleep(0.5)


def test_a_slave_interrupted_mid_job(e2e: E2eEnv, converged: Converged) -> None:
    """The spot market takes a slave while a word count runs there: the job still gives
    exact counts (Disco re-runs the lost tasks elsewhere), `up --wait` brings a replacement
    that Disco connects, and the next job runs map tasks on it."""
    assert converged.code == 0, converged.out + converged.err
    started = time.monotonic()
    cluster = observe_cluster(converged.cfg)
    victim = live(cluster, "slave")[0]
    texts = [text + f"lost{k}\n" for k, text in enumerate(TEXTS)]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(word_count, converged, "interrupted", texts, slow=0.05,
                              name="interrupted", timeout=150)
        wait_for_job_on(converged, "interrupted", short_name(victim))
        e2e.market.interrupt(victim.instance_id)
        wait_until("the interrupted slave's node to stop",
                   lambda: victim.instance_id not in e2e.farm.nodes)
        job = running.result()  # hung before disco_fixes re-ran the lost hosts' tasks
    assert job.counts == expected_counts(texts)
    print(f"\nword count with a slave interrupted mid-job: {job.seconds:.1f} s; "
          f"{job.line}; map tasks done on {sorted(job.ran_on)}; "
          f"{waited_line(regenerations(converged, 'interrupted'))}")

    code, out, err = cli("up", str(converged.cfg.path), "--wait", "--timeout", str(UP_TIMEOUT))
    assert code == 0, out + err
    after = observe_cluster(converged.cfg)
    (replacement,) = [n for n in live(after, "slave")
                      if n.instance_id not in {s.instance_id for s in live(cluster, "slave")}]
    assert victim.instance_id not in {n.instance_id for n in live(after)}
    wait_connected(converged, {short_name(node) for node in live(after)})
    again = word_count(converged, "afterloss", TEXTS, name="afterloss")
    assert again.counts == expected_counts(TEXTS)
    assert short_name(replacement) in again.ran_on, again.ran_on
    print(f"interrupted slave: job, replacement, job on it: {time.monotonic() - started:.1f} s")


def regenerations(done: Converged, name: str) -> list[str]:
    """Disco's events (with our job_coordinator fix) for tasks of job `name` that waited
    for tasks re-run because their outputs were only on hosts that left: the proof that a
    run took the path of the hang it used to have."""
    seen = on_master(done, f"disco events \"$(disco jobs | grep -m 1 '^{name}@')\"")
    return [json.loads(line)[2] for line in seen.stdout.splitlines()
            if line.startswith("[") and "hosts that left the cluster" in line]


def waited_line(waits: list[str]) -> str:
    return f"{len(waits)} task(s) waited for lost outputs to be remade: {waits}"


def disco_slots(master_ip: str, port: int) -> dict[str, int]:
    """The master Disco's live host table, as Disco answers for it: worker slots by host."""
    url = f"http://{master_ip}:{port}/disco/ctrl/load_config_table"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return {host: int(count) for host, count in json.load(answer)}


def disco_table(master_ip: str, port: int) -> set[str]:
    """The hosts of the master Disco's live host table."""
    return set(disco_slots(master_ip, port))


@dataclass
class ScaleDown:
    """`up --wait` to fewer slaves while a slow word count runs, and what it left."""

    code: int
    out: str
    err: str
    texts: list[str]
    job: Future[JobRun]
    at_termination: dict[str, set[str]]
    kept: list[Node]
    seconds: float


def scale_down_during_a_job(e2e: E2eEnv, done: Converged, slaves: int, name: str,
                            ) -> ScaleDown:
    """Start a slow word count, scale to `slaves` while it runs, and record Disco's live
    host table at the moment each instance is terminated (a market callback)."""
    master = observe_cluster(done.cfg).master
    assert master is not None
    port = int(load_config(done.cfg.path)["DISCO_PORT"])
    at_termination: dict[str, set[str]] = {}
    watching = True

    def watch(instance_id: str) -> None:
        if watching:
            at_termination[instance_id] = disco_table(master.private_ip, port)

    e2e.market.on_terminate(watch)  # the market keeps it: `watching` switches it off
    texts = [text + f"{name}{k}\n" for k, text in enumerate(TEXTS)]
    started = time.monotonic()
    pool = ThreadPoolExecutor(1)
    try:
        running = pool.submit(word_count, done, name, texts, slow=0.05, name=name)
        wait_for_job_on(done, name)
        code, out, err = cli("up", str(done.cfg(NUM_SLAVES=slaves)), "--wait",
                             "--timeout", str(UP_TIMEOUT))
        wait([running])
    finally:
        watching = False
        pool.shutdown()
    return ScaleDown(code, out, err, texts, running, at_termination,
                     live(observe_cluster(done.cfg), "slave"), time.monotonic() - started)


def test_scale_up_then_down_while_disco_runs(e2e: E2eEnv, converged: Converged) -> None:
    """2 -> 4 slaves: Disco connects the new ones, its table gives them worker slots and a
    job with one task per slot finishes map tasks on every host, the new slaves included.
    4 -> 2 while a job runs: every leaving slave is out of Disco's live host table when its
    instance is terminated (the plan applies the smaller table first), and the job that was
    running gives exact counts."""
    assert converged.code == 0, converged.out + converged.err
    started = time.monotonic()
    before = observe_cluster(converged.cfg)
    master = before.master
    assert master is not None
    code, out, err = cli("up", str(converged.cfg(NUM_SLAVES=4)), "--wait",
                         "--timeout", str(UP_TIMEOUT))
    assert code == 0, out + err
    grown = observe_cluster(converged.cfg)
    slaves = live(grown, "slave")
    new = {short_name(n) for n in slaves} - {short_name(n) for n in live(before, "slave")}
    assert len(slaves) == 4 and len(new) == 4 - len(live(before, "slave"))
    assert grown.master.instance_id == master.instance_id
    wait_connected(converged, {short_name(n) for n in live(grown)})
    # As many tasks as Disco's table has worker slots, with no locality and each lasting
    # over 2 s: a task only goes to a host with a free slot and none ends before all are
    # assigned, so every slot gets one. `ddfs chunk` input would run only where DDFS put
    # the chunks, which on sandbox nodes (one shared disk) may be no new slave at all.
    slots = disco_slots(master.private_ip, int(load_config(converged.cfg.path)["DISCO_PORT"]))
    assert set(slots) == {short_name(n) for n in live(grown)}, slots
    texts = [f"slot{k % 3}" for k in range(sum(slots.values()))]  # no spaces in a URL
    job = raw_word_count(converged, texts, slow=2, name="scaledup")
    assert job.counts == expected_counts(texts)
    assert new <= job.ran_on and job.ran_on == {h for h, n in slots.items() if n}, \
        (new, job.ran_on)
    print(f"\n2 -> 4 slaves and a job on every host: {time.monotonic() - started:.1f} s; "
          f"{job.line}; map tasks on {sorted(job.ran_on)}")

    down = scale_down_during_a_job(e2e, converged, 2, "drainto2")
    assert down.code == 0, down.out + down.err
    assert "restarted Disco" not in down.out  # 3 nodes: DDFS replicas unchanged
    kept = {n.instance_id for n in down.kept}
    leaving = [n for n in slaves if n.instance_id not in kept]
    assert len(kept) == 2 and len(leaving) == 2
    assert_drained(down, master, leaving)
    wait_connected(converged, {short_name(master), *(short_name(n) for n in down.kept)})
    result = down.job.result()  # hung before disco_fixes re-ran the lost hosts' tasks
    assert result.counts == expected_counts(down.texts)
    print(f"4 -> 2 slaves while a job runs: {down.seconds:.1f} s; {result.line}; "
          f"map tasks on {sorted(result.ran_on)}; "
          f"{waited_line(regenerations(converged, 'drainto2'))}")


def assert_drained(down: ScaleDown, master: Node, leaving: list[Node]) -> None:
    """Each leaving slave was out of Disco's live table when its instance was terminated:
    the table then held exactly the master and the kept slaves."""
    assert set(down.at_termination) == {n.instance_id for n in leaving}, down.at_termination
    table = {short_name(master), *(short_name(n) for n in down.kept)}
    for node in leaving:
        assert down.at_termination[node.instance_id] == table, \
            (node.instance_id, down.at_termination)


def test_scale_to_one_slave_while_a_job_runs(e2e: E2eEnv, converged: Converged) -> None:
    """2 -> 1 while a job runs. It lowers DDFS replicas, so every node's bootstrap digest
    changes and no node is ready in that pass: the leaving slave is still drained first
    (out of Disco's live table when its instance is terminated). The master's Disco must
    restart for the new settings, but not under the running job: the pass says the
    restart is pending and names the job, the job gives exact counts, and a later pass of
    the same `up --wait` restarts Disco once it is idle."""
    assert converged.code == 0, converged.out + converged.err
    before = observe_cluster(converged.cfg)
    down = scale_down_during_a_job(e2e, converged, 1, "drainto1")
    assert down.code == 0, down.out + down.err
    kept = {n.instance_id for n in down.kept}
    assert_drained(down, before.master, [n for n in live(before, "slave")
                                         if n.instance_id not in kept])
    job = down.job.result()
    assert job.counts == expected_counts(down.texts)
    print(f"\n2 -> 1 slave while a job runs: {down.seconds:.1f} s; {job.line}; "
          f"{down.out.count('Disco restart pending on ')} passes waited for the job")
    pending = down.out.find("Disco restart pending on ")
    assert pending >= 0 and "waiting for job(s) drainto1@" in down.out, down.out
    assert down.out.find("restarted Disco on ", pending) > pending, down.out
    wait_connected(converged, {short_name(before.master), *(short_name(n) for n in down.kept)})


def test_replaced_master_runs_jobs_on_the_rejoined_slaves(e2e: E2eEnv,
                                                          converged: Converged) -> None:
    """The master's instance dies; `up --wait` brings a new master, the surviving slaves
    re-join it, Disco on it connects them and a word count finishes map tasks on each."""
    assert converged.code == 0, converged.out + converged.err
    started = time.monotonic()
    cluster = observe_cluster(converged.cfg)
    old, slaves = cluster.master, live(cluster, "slave")
    assert old is not None and slaves
    e2e.client.terminate_instances(InstanceIds=[old.instance_id])
    wait_until("the old master's node to stop", lambda: old.instance_id not in e2e.farm.nodes)
    code, out, err = cli("up", str(converged.cfg.path), "--wait", "--timeout", str(UP_TIMEOUT))
    assert code == 0, out + err
    after = observe_cluster(converged.cfg)
    assert after.master is not None and after.master.instance_id != old.instance_id
    assert {n.instance_id for n in live(after, "slave")} == {n.instance_id for n in slaves}
    wait_connected(converged, {short_name(n) for n in live(after)})
    job = word_count(converged, "newmaster", TEXTS, name="newmaster")
    assert job.counts == expected_counts(TEXTS)
    assert {short_name(n) for n in slaves} <= job.ran_on, job.ran_on
    print(f"\nmaster replaced, then a job on the re-joined slaves: "
          f"{time.monotonic() - started:.1f} s; {job.line}; map tasks on {sorted(job.ran_on)}")
