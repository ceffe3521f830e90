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
     "doctor_job.py exited 1", "`python3 -c 'import disco'`"),
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
    source = Path(doctor.__file__).read_text()
    assert "RERUN" not in source and "up` again" not in source
    with DiscoDouble() as double:
        double.table, double.extra = TABLE[:2], {"ip-10-0-0-9": "2"}
        double.disconnected = {S1}
        report = checks_of(config, double)
    fixes = [c.fix for c in report.checks if not c.ok]
    assert len(fixes) == 3
    assert all("delete-tags" in fix or "ssh" in fix for fix in fixes)


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
)

HOST = "ip-127-0-1-1"   # the namespace's host name: an EC2-style short name, like a node's
GHOST = "ip-127-0-1-2"  # in /etc/hosts, but no node answers there
REAL_MASTER, REAL_GHOST = node("127.0.1.1", "master"), node("127.0.1.2")
URL = "http://127.0.1.1:8989/disco/ctrl/nodeinfo"

# Disco runs as its own user (as on a node); the doctor's script runs as root, as over SSH.
# Sections: healthy (nodeinfo + job), a member whose worker cannot start (ghost), then the
# worker stopped: its Erlang node killed and `erl` gone so Disco cannot start it again.
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
disco_do python3 -W ignore -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], data=sys.argv[2].encode()).read()' \\
  http://127.0.1.1:8989/disco/ctrl/save_config_table '[["{HOST}", "2"], ["{GHOST}", "1"]]'
section ghost_nodeinfo nodeinfo {URL} 5 {HOST} {GHOST}
echo '[["{HOST}", "2"]]' | disco_do python3 -W ignore -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], data=sys.stdin.buffer.read()).read()' \\
  http://127.0.1.1:8989/disco/ctrl/save_config_table
mv /usr/bin/erl /usr/bin/erl.stopped
for pid in $(ps -eo pid=,args= | awk '/disco_8989_slave/ && !/awk/ {{print $1}}'); do
  kill -9 "$pid"
done
section stopped_nodeinfo nodeinfo {URL} 5 {HOST}
section stopped_job wordcount doctor-test-tag2 15 "$LINE"
echo "=== tags"
disco_do ddfs ls doctor-test || true
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
    result = subprocess.run(
        ["unshare", "--mount", "--net", "--uts", "--pid", "--fork", "--kill-child",
         "--mount-proc", "bash", str(tmp_path / "outer.sh"), str(tmp_path)],
        capture_output=True, text=True, timeout=400, check=False)
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

    ghost = nodeinfo_checks(config, REAL_MASTER, [REAL_GHOST], out["ghost_nodeinfo"],
                            [[HOST, "2"], [GHOST, "1"]], waited=5)
    assert [(c.node, c.ok) for c in ghost if c.check == "disco worker"] == \
        [(f"{HOST} (master)", True), (GHOST, False)], ghost
    assert f"ssh {GHOST} erl" in ghost[-1].fix

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
    # both jobs removed their input tags
    assert "doctor-test-tag" not in out["tags"]
    print(f"\nreal Disco, 5 doctor questions: {seconds:.1f} s; healthy job: {job.detail}; "
          f"stopped worker: {failed_job.detail}")
