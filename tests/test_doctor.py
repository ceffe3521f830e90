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
