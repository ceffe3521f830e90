"""The doctor's questions to Disco itself: nodeinfo (every host of the table connected, none
blacklisted, no host missing or extra) and a one-line word count over DDFS.

Unit tests run the doctor's own job script (`templates/doctor_job.py`) against the Disco
double's nodeinfo over HTTP and read its output with the doctor's parser. The `disco` tier
runs the rendered node script (`doctor_job.sh`, as root, Disco as its own user) against a
real Disco built from the source bundle by the product's build step.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from disposabledisco import bootstrap, disco, doctor
from disposabledisco.cluster import TAG_HOSTS, Node
from disposabledisco.config import parse_config
from disposabledisco.doctor import DoctorReport, job_check, job_line, nodeinfo_checks
from tests.disco_double import DiscoDouble

JOB_PY = Path(doctor.__file__).parent / "templates" / "doctor_job.py"
BASE = {"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "TAG_KEY": "disco-test",
        "DISCO_INSTALL": "tarball", "DISCO_TARBALL": "/nonexistent/disco.tar"}


def node(ip: str, role: str = "slave") -> Node:
    return Node(role=role, group="master" if role == "master" else "c5.large",
                instance_type="c5.large", instance_id=f"i-{ip.replace('.', '')}",
                private_ip=ip, state="ready")


MASTER, SLAVE1, SLAVE2 = node("10.0.0.1", "master"), node("10.0.0.2"), node("10.0.0.3")
TABLE = [[disco.short_name(n), "2"] for n in (MASTER, SLAVE1, SLAVE2)]
M, S1, S2 = (disco.short_name(n) for n in (MASTER, SLAVE1, SLAVE2))


@pytest.fixture
def config(tmp_path: Path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(BASE))
    return parse_config(BASE, path=path)


def ask(url: str, hosts: list[str], wait: float = 0) -> str:
    """The doctor's nodeinfo question, asked the way the master asks it."""
    result = subprocess.run([sys.executable, str(JOB_PY), "nodeinfo", url, str(wait), *hosts],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def checks_of(config, double: DiscoDouble, table=TABLE) -> DoctorReport:
    output = ask(double.url + "/disco/ctrl/nodeinfo", [row[0] for row in table])
    return DoctorReport(tuple(nodeinfo_checks(config, MASTER, [SLAVE1, SLAVE2], output,
                                              table, waited=0)))


def failed(report: DoctorReport) -> dict[tuple[str, str], tuple[str, str]]:
    return {(c.node, c.check): (c.detail, c.fix) for c in report.checks if not c.ok}


def test_every_host_connected_is_healthy(config) -> None:
    with DiscoDouble() as double:
        double.table = TABLE
        report = checks_of(config, double)
    assert report.ok, report.to_text()
    workers = [c for c in report.checks if c.check == "disco worker"]
    assert [c.node for c in workers] == [f"{M} (master)", S1, S2]
    assert all(c.detail == "connected, 2 worker slot(s)" for c in workers)
    assert report.to_text().endswith("healthy")


def test_a_disconnected_host_fails_naming_the_host_and_how_to_see_why(config) -> None:
    with DiscoDouble() as double:
        double.table, double.disconnected = TABLE, {S2}
        report = checks_of(config, double)
    assert not report.ok
    assert report.to_text().endswith("1 check(s) failed")  # the issue: this said "healthy"
    [(where, (detail, fix))] = failed(report).items()
    assert where == (S2, "disco worker")
    assert detail.startswith("connected: false")
    assert f"`sudo -u disco ssh {S2} erl -noshell -eval 'halt().'`" in fix
    assert "ssh from master, erlang ping from master, erlang cookie" in fix


def test_a_blacklisted_host_fails_with_the_whitelist_command(config) -> None:
    with DiscoDouble() as double:
        double.table, double.blacklisted = TABLE, {S1}
        report = checks_of(config, double)
    [(where, (detail, fix))] = failed(report).items()
    assert where == (S1, "disco worker") and "blacklisted" in detail
    assert f"Disco().whitelist('{S1}')" in fix


def test_a_member_missing_from_disco_and_an_extra_host_are_drift(config) -> None:
    with DiscoDouble() as double:
        double.table = TABLE[:2]            # Disco's live table lacks the second slave
        double.extra = {"ip-10-0-0-9": "2"}  # and still has a node that left
        report = checks_of(config, double)
    fails = failed(report)
    assert set(fails) == {(S2, "disco worker"), (f"{M} (master)", "disco host table")}
    assert fails[(S2, "disco worker")][0] == "not in Disco's live host table"
    assert "ip-10-0-0-9" in fails[(f"{M} (master)", "disco host table")][0]
    for _, fix in fails.values():
        # the fix makes a converged `up` apply the membership again: it names the tag
        assert f"aws ec2 delete-tags --resources {MASTER.instance_id} --tags Key={TAG_HOSTS}" \
            in fix
        assert f"`disposabledisco up {config.path}`" in fix


def test_nodeinfo_waits_for_a_host_that_connects_late() -> None:
    with DiscoDouble() as double:
        double.table, double.disconnected = TABLE, {S1}
        threading.Timer(1.5, double.disconnected.clear).start()
        started = time.monotonic()
        output = ask(double.url + "/disco/ctrl/nodeinfo", [M, S1, S2], wait=20)
        took = time.monotonic() - started
    info = json.loads(output.removeprefix("nodeinfo "))
    assert info[S1]["connected"] is True
    assert 1.5 <= took < 10


def test_a_master_that_does_not_answer_says_how_to_start_it(config) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/disco/ctrl/nodeinfo"
    output = ask(url, [M])
    checks = nodeinfo_checks(config, MASTER, [], output, TABLE[:1], waited=0)
    [check] = checks
    assert (check.check, check.ok) == ("disco master answers", False)
    assert "Connection refused" in check.detail
    assert "`sudo -u disco disco start`" in check.fix


LINE = job_line("c0ffee00")
RIGHT = {"the": 2, "doctor": 2, "counts": 2, "c0ffee00": 2, "words": 1, "and": 1}


@pytest.mark.parametrize(("output", "ok", "detail", "fix"), [
    (f"step push\nstep run\njob j@1\nstep read\nresult {json.dumps(RIGHT)}\nstep clean\n",
     True, "word count over DDFS: 10 words counted exactly", ""),
    (f"step push\nstep run\njob j@1\nstep read\nresult {json.dumps({**RIGHT, 'the': 1})}\n"
     "step clean\n", False, "word count gave", "same DISCO_INSTALL tree"),
    ("step push\nstep run\njob j@1\nerror JobError: Timeout\nstep clean\n", False,
     "did not finish in 120 s (step run)", "`sudo -u disco disco events j@1`"),
    ("step push\nstep run\njob j@1\ntimeout 150\n", False,
     "did not finish in 120 s (step run)", "ssh from master, erlang ping"),
    ("step push\nerror CommError: not enough nodes\nstep clean\n", False,
     "`ddfs chunk` failed: CommError: not enough nodes", "DDFS_BLOB_REPLICAS"),
    ("ModuleNotFoundError: No module named 'disco'\nerror doctor_job.py exited 1\n", False,
     "doctor_job.py exited 1; ModuleNotFoundError: No module named 'disco'",
     "`python3 -c 'import disco'`"),
])
def test_job_output_is_read_exactly(config, output: str, ok: bool, detail: str,
                                    fix: str) -> None:
    assert dict(collections.Counter(LINE.split())) == RIGHT
    check = job_check(config, MASTER, output, LINE)
    assert check.ok is ok
    assert detail in check.detail
    assert fix in check.fix


def test_no_fix_says_run_up_again_without_saying_what_makes_up_act(config) -> None:
    """A converged `up` makes no SSH call: a fix that only says `up` repairs nothing."""
    with DiscoDouble() as double:
        double.table, double.extra = TABLE[:2], {"ip-10-0-0-9": "2"}
        double.disconnected = {S1}
        report = checks_of(config, double)
    fixes = {key: fix for key, (_, fix) in failed(report).items()}
    # the table is applied again only when the master's hosts tag is gone
    reapply = f"`aws ec2 delete-tags --resources {MASTER.instance_id} --tags Key={TAG_HOSTS}`"
    assert set(fixes) == {("ip-10-0-0-2", "disco worker"), ("ip-10-0-0-3", "disco worker"),
                          ("ip-10-0-0-1 (master)", "disco host table")}
    assert "`sudo -u disco ssh ip-10-0-0-2 erl -noshell" in fixes[("ip-10-0-0-2", "disco worker")]
    assert reapply in fixes[("ip-10-0-0-3", "disco worker")]
    assert reapply in fixes[("ip-10-0-0-1 (master)", "disco host table")]


def test_doctor_cluster_checks_the_ready_slaves_and_fails_the_others(config, monkeypatch) -> None:
    """Disco's table holds the master and the ready slaves (what `up` writes): those are
    checked; a slave still joining fails on its own with what repairs it."""
    import contextlib

    from disposabledisco import reconcile
    from disposabledisco.cluster import Cluster

    joining = Node(role="slave", group="c5.large", instance_type="c5.large",
                   instance_id="i-joining", private_ip="10.0.0.4", state="running",
                   reason="waiting for bootstrap")
    observed = Cluster(nodes=(MASTER, SLAVE1, joining))
    seen = {}

    def fake_run_doctor(config, master, slaves, gateway, vcpus, *, job):
        seen.update(master=master, slaves=slaves, job=job)
        return DoctorReport(())

    monkeypatch.setattr(reconcile, "observe", lambda config, ec2: observed)
    monkeypatch.setattr(doctor, "run_doctor", fake_run_doctor)
    monkeypatch.setattr(doctor, "ssh_gateway_for",
                        lambda config, ec2: contextlib.nullcontext(None))
    report = doctor.doctor_cluster(config, type("Ec2", (), {"vcpus": None})(), job=False)
    assert seen == {"master": MASTER, "slaves": [SLAVE1], "job": False}
    [check] = report.checks
    assert (check.node, check.check, check.ok) == ("ip-10-0-0-4", "slave ready", False)
    assert check.detail == "i-joining is running: waiting for bootstrap"
    assert f"`disposabledisco up {config.path}` --wait" in check.fix


def test_the_drift_fix_makes_a_converged_up_apply_the_membership() -> None:
    """What the fix says is true of the planner: a converged cluster plans nothing for the
    table; without the master's hosts tag it applies the membership (file + live table)."""
    from dataclasses import replace

    from disposabledisco.plan import ApplyMembership, plan
    from tests.test_plan import NOW, converged
    from tests.test_plan import config as plan_config
    from tests.test_plan import node as plan_node

    cfg = plan_config(NUM_SLAVES=2)
    steady = converged(cfg, [plan_node(), plan_node()])
    assert plan(cfg, steady, NOW).actions == ()
    master, *slaves = steady.nodes
    untagged = replace(master, tags={k: v for k, v in master.tags.items() if k != TAG_HOSTS})
    actions = plan(cfg, type(steady)((untagged, *slaves)), NOW).actions
    assert [type(a) for a in actions] == [ApplyMembership]
    assert set(actions[0].member_ids) == {n.instance_id for n in steady.nodes}


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_rendered_job_script_is_shellcheck_clean(config, tmp_path: Path) -> None:
    script = tmp_path / "doctor_job.sh"
    script.write_text(bootstrap.snippet(config, "doctor_job",
                                        JOB_PY=bootstrap.template("doctor_job.py"),
                                        HARD_SECONDS=60))
    # as test_bootstrap does: SC2034/SC2317 are lib.sh values and helpers this script
    # does not use
    subprocess.run(["shellcheck", "-s", "bash", "-e", "SC2034,SC2317", str(script)], check=True)


# -- the disco tier: the node script against a real Disco ------------------------------

from tests.test_disco_build import (  # noqa: E402 - fixtures of the disco tier
    JOB_TOOLS,
    OUTER_SH,
    Build,
    build_script,  # noqa: F401 - `built` needs it
    built,  # noqa: F401
    need_tools,
    run_namespaced,
)

HOST = "ip-127-0-1-1"   # the namespace's host name: an EC2-style short name, like a node's
GHOST = "ip-127-0-1-2"  # in /etc/hosts, but no node answers there
REAL_MASTER, REAL_GHOST = node("127.0.1.1", "master"), node("127.0.1.2")
URL = "http://127.0.1.1:8989/disco/ctrl/nodeinfo"

# Disco runs as its own user (as on a node); the doctor's script runs as root, as over SSH.
# Sections: healthy (nodeinfo + job), a member whose worker cannot start (ghost), the node
# blacklisted, tasks that cannot start (no `python` on the PATH: the job times out), then
# the worker stopped: its Erlang node killed and `erl` gone so Disco cannot start it again.
DOCTOR_INNER_SH = f'''\
set -uo pipefail
cd /tmp/job
LINE=$(<line.txt)
printf '127.0.1.2 {GHOST}\\n' >>/etc/hosts
id -u disco >/dev/null 2>&1 || useradd -m -s /bin/bash disco
chown -R disco: /usr/var/disco
disco_do() {{ runuser -u disco -- env -i PATH=/usr/bin:/bin HOME=/home/disco "$@"; }}
section() {{ echo "=== $1"; shift; bash doctor_job.sh "$@" </dev/null; }}
echo '[["{HOST}", "2"]]' | disco_do tee /usr/var/disco/disco_8989.config >/dev/null
disco_do disco start || exit 1
section healthy_nodeinfo nodeinfo {URL} 60 {HOST}
section healthy_job wordcount doctor-test-tag 60 "$LINE"
echo "=== leftovers"
disco_do ddfs ls doctor-test
disco_do disco jobs
disco_do python3 -W ignore -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], data=sys.argv[2].encode()).read()' \\
  http://127.0.1.1:8989/disco/ctrl/save_config_table '[["{HOST}", "2"], ["{GHOST}", "1"]]'
section ghost_nodeinfo nodeinfo {URL} 5 {HOST} {GHOST}
echo '[["{HOST}", "2"]]' | disco_do python3 -W ignore -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], data=sys.stdin.buffer.read()).read()' \\
  http://127.0.1.1:8989/disco/ctrl/save_config_table
post() {{ disco_do python3 -W ignore -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], data=sys.argv[2].encode()).read()' \\
  "http://127.0.1.1:8989/disco/ctrl/$1" "$2"; }}
post blacklist '"{HOST}"'
section blacklisted_nodeinfo nodeinfo {URL} 3 {HOST}
post whitelist '"{HOST}"'
mv /usr/bin/python /usr/bin/python.off
section no_python_job wordcount doctor-test-tag3 20 "$LINE"
mv /usr/bin/python.off /usr/bin/python
echo "=== leftovers_after_failure"
disco_do ddfs ls doctor-test
disco_do disco jobs
mv /usr/bin/erl /usr/bin/erl.stopped
for pid in $(ps -eo pid=,args= | awk '/disco_8989_slave/ && !/awk/ {{print $1}}'); do
  kill -9 "$pid"
done
section stopped_nodeinfo nodeinfo {URL} 5 {HOST}
section stopped_job wordcount doctor-test-tag2 15 "$LINE"
echo "=== end"
'''


def real_config(tmp_path: Path):
    values = {**BASE, "DISCO_USER": "disco", "DISCO_ROOT": "/usr/var/disco"}
    return parse_config(values, path=tmp_path / "cluster.json")


def sections(stdout: str) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("=== "):
            current = found.setdefault(line[4:], [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in found.items()}


@pytest.mark.disco
def test_doctor_job_script_against_a_real_disco(built: tuple[Path, Build, Path],  # noqa: F811
                                                tmp_path: Path) -> None:
    need_tools(*JOB_TOOLS)
    config = real_config(tmp_path)
    for folder in ("ovl", "root", "job"):
        (tmp_path / folder).mkdir()
    shutil.copy(built[0], tmp_path / "installed.tar.gz")
    (tmp_path / "outer.sh").write_text(OUTER_SH.replace("discotest", HOST))
    (tmp_path / "job" / "inner.sh").write_text(DOCTOR_INNER_SH)
    (tmp_path / "job" / "doctor_job.sh").write_text(bootstrap.snippet(
        config, "doctor_job", JOB_PY=bootstrap.template("doctor_job.py"), HARD_SECONDS=90))
    line = job_line("5eed")
    (tmp_path / "job" / "line.txt").write_text(line)
    started = time.monotonic()
    result = run_namespaced(tmp_path, timeout=400)
    seconds = time.monotonic() - started
    out = sections(result.stdout)
    assert "end" in out, result.stdout + result.stderr
    table = [[HOST, "2"]]

    healthy = nodeinfo_checks(config, REAL_MASTER, [], out["healthy_nodeinfo"], table)
    assert [(c.check, c.ok) for c in healthy] == [("disco master answers", True),
                                                   ("disco worker", True)], healthy
    assert healthy[1].detail == "connected, 2 worker slot(s)"
    job = job_check(config, REAL_MASTER, out["healthy_job"], line)
    assert job.ok, out["healthy_job"]
    assert "step clean" in out["healthy_job"] and "cleanup" not in out["healthy_job"]
    # the job removed its input tag and its job (results purged)
    assert "doctor-test-tag" not in out["leftovers"]
    assert "disposabledisco_doctor" not in out["leftovers"]

    ghost = nodeinfo_checks(config, REAL_MASTER, [REAL_GHOST], out["ghost_nodeinfo"],
                            [[HOST, "2"], [GHOST, "1"]], waited=5)
    assert [(c.node, c.ok) for c in ghost if c.check == "disco worker"] == \
        [(f"{HOST} (master)", True), (GHOST, False)], ghost
    assert f"ssh {GHOST} erl" in ghost[-1].fix

    blacklisted = nodeinfo_checks(config, REAL_MASTER, [], out["blacklisted_nodeinfo"], table,
                                  waited=3)
    assert [(c.check, c.ok) for c in blacklisted][1] == ("disco worker", False)
    assert f"Disco().whitelist('{HOST}')" in blacklisted[1].fix
    # the workers cannot run tasks (no `python` on the PATH): the job fails at step run,
    # the fix names the worker checks and the job's events; job and tag removed
    no_python = job_check(config, REAL_MASTER, out["no_python_job"], line, seconds=20)
    assert not no_python.ok, out["no_python_job"]
    assert "(step run)" in no_python.detail or "at step run" in no_python.detail
    assert "`sudo -u disco disco events disposabledisco_doctor@" in no_python.fix
    assert "doctor-test-tag" not in out["leftovers_after_failure"]
    assert "disposabledisco_doctor" not in out["leftovers_after_failure"]

    stopped = nodeinfo_checks(config, REAL_MASTER, [], out["stopped_nodeinfo"], table,
                              waited=5)
    assert [(c.check, c.ok) for c in stopped] == [("disco master answers", True),
                                                   ("disco worker", False)], stopped
    assert stopped[1].detail.startswith("connected: false")
    failed_job = job_check(config, REAL_MASTER, out["stopped_job"], line, seconds=15)
    assert not failed_job.ok, out["stopped_job"]
    # DDFS has no connected node left to take the input: named, with the worker checks
    assert "`ddfs chunk` failed" in failed_job.detail
    assert "Not enough nodes for replicas" in failed_job.detail
    assert "fix the failing disco worker checks" in failed_job.fix
    print(f"\nreal Disco, 7 doctor questions: {seconds:.1f} s; healthy job: {job.detail}; "
          f"no python: {no_python.detail}; stopped worker: {failed_job.detail}")


# -- the nodes tier: the whole doctor over SSH, Disco's endpoint played by the double ----

from disposabledisco.doctor import run_doctor  # noqa: E402
from tests.node_fixtures import (  # noqa: E402,F401 - pytest fixtures
    client_key,
    node_farm,
    ssh_gateway_factory,
    start_nodes,
)
from tests.test_provision import (  # noqa: E402,F401 - `cluster` is a fixture
    _missing_machine_packages,
    all_ok,
    cluster,
    fake_disco_tarball,
    free_port,
)


@pytest.mark.nodes
def test_the_whole_doctor_asks_disco_over_ssh(cluster, node_farm,  # noqa: F811
                                              tmp_path: Path) -> None:
    """Real sshd nodes, the doctor's node script as over SSH, Disco's nodeinfo from the
    double at the master's address (the fake Disco has no Python client: the job fails)."""
    if os.geteuid() != 0 or _missing_machine_packages():
        pytest.skip(f"needs root and {_missing_machine_packages()} (see test_provision)")
    port = free_port()
    prov, nodes, config = cluster(DISCO_INSTALL="tarball", DISCO_PORT=port,
                                  DISCO_TARBALL=str(fake_disco_tarball(tmp_path / "d.tgz")))
    master, slaves = nodes[0], nodes[1:]
    all_ok(prov.bootstrap(nodes))
    all_ok(prov.join(master, slaves))
    with node_farm.network_of(master.instance_id):
        double = DiscoDouble(master.private_ip, port)
    with double:
        assert prov.apply_membership(master, nodes).ok
        assert len(double.table or []) == 3

        def doctor_checks(**kwargs) -> tuple[DoctorReport, dict]:
            report = run_doctor(config, master, slaves, prov.ssh, prov.vcpus,
                                nodeinfo_wait=2, **kwargs)
            return report, failed(report)

        healthy, fails = doctor_checks(job=False)
        assert healthy.ok, healthy.to_text()
        workers = [c for c in healthy.checks if c.check == "disco worker"]
        assert len(workers) == 3 and all(c.ok for c in workers)
        nodeinfo = [r for r in double.requests if r.path == "/disco/ctrl/nodeinfo"]
        assert nodeinfo  # asked on the master, as the Disco user, over the SSH session

        short = disco.short_name(slaves[1])
        double.disconnected = {short}
        double.extra = {"ip-127-10-40-99": "2"}
        broken, fails = doctor_checks(job=False)
        assert set(fails) == {(short, "disco worker"),
                              (f"{disco.short_name(master)} (master)", "disco host table")}
        assert f"ssh {short} erl" in fails[(short, "disco worker")][1]
        assert broken.to_text().endswith("2 check(s) failed")

        double.disconnected, double.extra = set(), {}
        started = time.monotonic()
        with_job, fails = doctor_checks(job_seconds=10)
        assert list(fails) == [(f"{disco.short_name(master)} (master)", "disco job")]
        detail, fix = next(iter(fails.values()))
        assert "No module named 'disco'" in detail and "import disco" in fix
        assert time.monotonic() - started < 60
