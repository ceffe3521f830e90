"""Idle shutdown: the decision from Disco's answer, the pass that acts on it, the config.

The decision tests feed idle.judge the exact lines templates/idle_probe.py prints; the
pass tests reuse test_reconcile_unit's in-process EC2 double and node worker, with a probe
answer the test chooses; the config tests go through the CLI (exit 2, no EC2 call).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from disposabledisco import idle
from disposabledisco.cli import main
from disposabledisco.plan import ApplyMembership, Terminate
from disposabledisco.ssh import SshError
from tests.test_disco_cluster import installed_tree  # noqa: F401, F811 - a fixture
from tests.test_reconcile_unit import NOW, FakeEc2, FakeWorker, config, run

T0 = int(NOW.timestamp())


def probe(now=T0, jobs=(), started=None, seen_active=None) -> str:
    lines = [f"now {now}"]
    if started is not None:
        lines.append(f"started {started}")
    lines.append("joblist " + json.dumps([list(j) for j in jobs]))
    if seen_active is not None:
        lines.append(f"seen-active {seen_active}")
    return "\n".join(lines) + "\n"


# -- the decision ------------------------------------------------------------------------

def test_never_idle_while_a_job_runs_however_old_it_is():
    verdict = idle.judge(probe(jobs=[[T0 - 86400, "active", "long@1"]]), 30)
    assert not verdict.idle and "long@1" in verdict.note and verdict.warning is None


@pytest.mark.parametrize("quiet_seconds, idle_now", [(30 * 60 - 1, False), (30 * 60, True),
                                                     (30 * 60 + 60, True)])
def test_the_boundary_is_at_exactly_idle_minutes(quiet_seconds, idle_now):
    verdict = idle.judge(probe(jobs=[[T0 - quiet_seconds, "ready", "a@1"],
                                     [T0 - 5 * 3600, "dead", "b@1"]],
                               started=T0 - 6 * 3600), 30)
    assert verdict.idle is idle_now
    assert f"no Disco job for {quiet_seconds // 60} min" in verdict.note


def test_no_job_ever_counts_from_discos_start():
    assert not idle.judge(probe(started=T0 - 29 * 60), 30).idle
    assert idle.judge(probe(started=T0 - 31 * 60), 30).idle


def test_a_job_seen_running_by_an_earlier_probe_is_activity():
    """The job list has start times only: a 5-hour job that ended 10 minutes ago."""
    answer = probe(jobs=[[T0 - 5 * 3600, "ready", "long@1"]], seen_active=T0 - 600)
    assert not idle.judge(answer, 30).idle
    assert idle.judge(answer, 10).idle


@pytest.mark.parametrize("answer", [
    "",
    "error http://10.0.0.1:8989/disco/ctrl/joblist: connection refused\n",
    f"now {T0}\n",  # no job list
    f"now {T0}\njoblist {{not json\n",
    f"now {T0}\njoblist {{\"a\": 1}}\n",
    f"now {T0}\njoblist [[\"x\", \"ready\", \"a\"]]\n",
    f"now {T0}\njoblist [[{T0}, \"ready\"]]\n",
    "now soon\njoblist []\n",
    f"now {T0}\nstarted 99999999999999999999\njoblist []\n",
    f"now {T0}\njoblist []\n",  # no job and no start time: unknown, not idle
    "\x00\xff garbage",
])
def test_damaged_answers_are_not_idle_and_warn(answer):
    verdict = idle.judge(answer, 1)
    assert verdict.idle is False
    assert verdict.warning and verdict.warning.startswith("idle check skipped")


def test_the_sleep_record_round_trips_and_a_damaged_one_is_none(tmp_path):
    cfg = config(tmp_path, DISCO_INSTALL="preinstalled", IDLE_MINUTES=30)
    assert idle.read_sleep(cfg) is None
    idle.write_sleep(cfg, idle.Sleep("down", 3, "2026-11-21T12:00:00+00:00"))
    assert idle.read_sleep(cfg) == idle.Sleep("down", 3, "2026-11-21T12:00:00+00:00")
    (cfg.state_dir / idle.STATE_FILE).write_text('{"action": "nap", "slaves": 1, "since": ""}')
    assert idle.read_sleep(cfg) is None
    (cfg.state_dir / idle.STATE_FILE).write_text("{")
    assert idle.read_sleep(cfg) is None


def test_zero_slaves_zeroes_every_group(tmp_path):
    cfg = config(tmp_path, NUM_SLAVES=None, SLAVE_GROUPS=[
        {"INSTANCE_TYPE": "m5.large", "COUNT": 2}, {"INSTANCE_TYPE": "c5.large", "COUNT": 3}])
    zeroed = idle.zero_slaves(cfg)
    assert [g.count for g in zeroed.slave_groups] == [0, 0] and cfg.desired_slaves == 5
    assert idle.zero_slaves(config(tmp_path, NUM_SLAVES=4)).desired_slaves == 0


# -- the pass ----------------------------------------------------------------------------

class ProbedWorker(FakeWorker):
    """The node worker, with the master's idle answer chosen by the test."""

    def __init__(self, answer: str | Exception) -> None:
        super().__init__()
        self.answer = answer

    def idle_probe(self, master):
        self.calls.append(("idle", (master.instance_id,)))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def converged(cfg, worker, slaves=2):
    ec2 = FakeEc2()
    for _ in range(4):
        report = run(cfg, ec2, worker)
    assert report.converged, report.results
    assert len([n for n in report.cluster.nodes if n.role == "slave" and n.is_live]) == slaves
    return ec2


def live(ec2, role):
    return sorted(i for i, inst in ec2.instances.items() if inst["State"]["Name"] == "running"
                  and {"Key": "dd-unit", "Value": role} in inst["Tags"])


def notes(report):
    return [r.action.describe() for r in report.results if isinstance(r.action, idle.IdleNote)]


def test_idle_slaves_to_zero_then_a_raised_count_brings_them_back(tmp_path):
    cfg = config(tmp_path, DISCO_INSTALL="preinstalled", NUM_SLAVES=2, IDLE_MINUTES=30)
    busy = probe(jobs=[[T0 - 60, "ready", "a@1"]])
    worker = ProbedWorker(busy)
    ec2 = converged(cfg, worker)
    master = live(ec2, "master")
    assert ("idle", tuple(master)) in worker.calls  # asked only once the master was ready

    worker.answer = probe(jobs=[[T0 - 31 * 60, "ready", "a@1"]])
    worker.calls.clear()
    slept = run(cfg, ec2, worker)
    assert worker.kinds().count("idle") == 1  # one probe (one SSH command) per pass
    assert notes(slept) and "no Disco job for 31 min" in notes(slept)[0]
    assert "terminating the slaves" in notes(slept)[0]
    terminated = [r for r in slept.results if isinstance(r.action, Terminate)]
    assert terminated and terminated[0].ok
    kinds = [type(r.action) for r in slept.results]
    assert kinds.index(ApplyMembership) < kinds.index(Terminate)  # out of Disco first
    assert live(ec2, "slave") == [] and live(ec2, "master") == master

    worker.calls.clear()
    asleep = run(cfg, ec2, worker)  # same count: stays asleep, the master is not probed
    assert asleep.converged and asleep.exit_code == 0
    assert "asleep since" in notes(asleep)[0] and worker.calls == []
    assert live(ec2, "slave") == []

    raised = config(tmp_path, DISCO_INSTALL="preinstalled", NUM_SLAVES=3, IDLE_MINUTES=30)
    worker.answer = busy
    woken = run(raised, ec2, worker)
    assert "slave count changed from 2 to 3" in notes(woken)[0]
    assert sum(r.action.count for r in woken.results if type(r.action).__name__ == "Launch") == 3
    assert idle.read_sleep(raised) is None


def test_idle_down_terminates_everything_and_stays_down_until_the_count_changes(tmp_path):
    cfg = config(tmp_path, DISCO_INSTALL="preinstalled", NUM_SLAVES=1, IDLE_MINUTES=30,
                 IDLE_ACTION="down")
    worker = ProbedWorker(probe(started=T0 - 10 * 60))
    ec2 = converged(cfg, worker, slaves=1)
    worker.answer = probe(started=T0 - 45 * 60)
    gone = run(cfg, ec2, worker)
    assert "terminating the whole cluster" in notes(gone)[0]
    assert live(ec2, "master") == [] and live(ec2, "slave") == []
    launches = len(ec2.launched)
    again = run(cfg, ec2, worker, now=NOW + timedelta(hours=1))
    assert again.converged and again.exit_code == 0 and len(ec2.launched) == launches
    assert "asleep since" in notes(again)[0]
    back = run(config(tmp_path, DISCO_INSTALL="preinstalled", NUM_SLAVES=2, IDLE_MINUTES=30,
                      IDLE_ACTION="down"), ec2, worker)
    assert [r.action.role for r in back.results if type(r.action).__name__ == "Launch"] == \
        ["master", "slave"]


@pytest.mark.parametrize("answer", ["error no answer\n", SshError(None, "refused"),
                                    ValueError("no address")])
def test_an_unreadable_master_keeps_the_cluster_and_says_so(tmp_path, answer):
    cfg = config(tmp_path, DISCO_INSTALL="preinstalled", IDLE_MINUTES=1)
    worker = ProbedWorker(probe(jobs=[[T0, "ready", "a@1"]]))
    ec2 = converged(cfg, worker, slaves=1)
    worker.answer = answer
    report = run(cfg, ec2, worker, now=NOW + timedelta(days=1))
    assert notes(report)[0].startswith("idle check skipped")
    assert report.exit_code == 0 and len(live(ec2, "slave")) == 1
    assert idle.read_sleep(cfg) is None


def test_idle_minutes_null_never_asks_the_master_and_wakes_a_sleeping_cluster(tmp_path):
    cfg = config(tmp_path, DISCO_INSTALL="preinstalled", NUM_SLAVES=1)
    worker = ProbedWorker(AssertionError("the master must not be asked"))
    ec2 = converged(cfg, worker, slaves=1)
    assert "idle" not in worker.kinds()
    idle.write_sleep(cfg, idle.Sleep("slaves-to-zero", 1, "2026-11-21T11:00:00+00:00"))
    report = run(cfg, ec2, worker)
    assert "IDLE_MINUTES is null" in notes(report)[0] and idle.read_sleep(cfg) is None
    assert len(live(ec2, "slave")) == 1 and "idle" not in worker.kinds()


# -- the config --------------------------------------------------------------------------

def test_idle_with_disco_install_none_is_refused_naming_the_key(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"AMI": "ami-12345678", "KEY_NAME": "k", "TAG_KEY": "disco-t",
                                "DISCO_INSTALL": "none", "IDLE_MINUTES": 20}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "IDLE_MINUTES" in err and "DISCO_INSTALL" in err


@pytest.mark.parametrize("extra, key", [({"IDLE_MINUTES": 0}, "IDLE_MINUTES"),
                                        ({"IDLE_MINUTES": "30"}, "IDLE_MINUTES"),
                                        ({"IDLE_ACTION": "stop"}, "IDLE_ACTION")])
def test_bad_idle_values_exit_2_naming_the_key(tmp_path, capsys, extra, key):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"AMI": "ami-12345678", "KEY_NAME": "k", "TAG_KEY": "disco-t",
                                **extra}))
    assert main(["validate", str(path)]) == 2
    assert key in capsys.readouterr().err


def test_the_probe_script_prints_what_parse_probe_reads(tmp_path):
    """idle_probe.py itself, against a local HTTP server that answers like Disco."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    listing = [[T0 - 60, "ready", "a@1"]]

    class Disco(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps(listing).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Disco)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from disposabledisco.bootstrap import template
        url = f"http://127.0.0.1:{server.server_port}/disco/ctrl/joblist"
        out = subprocess.run([sys.executable, "-c", template("idle_probe.py"), url, "nobody"],
                             capture_output=True, text=True, timeout=30).stdout
    finally:
        server.shutdown()
    parsed = idle.parse_probe(out)
    assert parsed.jobs == ((parsed.jobs[0][0], "ready", "a@1"),)
    assert int(parsed.jobs[0][0].timestamp()) == T0 - 60


# -- real Disco (tiers nodes + disco) ------------------------------------------------------

def _idle_pass_output(path: str, seconds: float) -> str:
    """`up` every few seconds until a pass takes the idle action; that pass's output."""
    from tests.test_e2e_cluster import cli

    deadline = time.monotonic() + seconds
    while True:
        code, out, err = cli("up", path)
        if "idle: no Disco job for" in out or time.monotonic() > deadline:
            return out + err
        assert code in (0, 10), out + err
        assert "idle check skipped" not in out, out
        time.sleep(5)


@pytest.mark.nodes
@pytest.mark.disco
def test_real_disco_idle_slaves_to_zero_and_back(e2e, installed_tree):  # noqa: F811
    """Disco's own job list on a converged master: a fresh cluster gets its grace, then
    an idle pass takes the slaves away, later passes keep them away, and raising the
    count brings them back."""
    from tests.test_e2e_cluster import cli, live, observe_cluster

    cfg = e2e.new_config("ddidlereal", 1, DISCO_INSTALL="tarball",
                         DISCO_TARBALL=str(installed_tree))
    path = str(cfg.path)
    code, out, err = cli("up", path, "--wait", "--timeout", "180")
    assert code == 0, out + err
    cfg(IDLE_MINUTES=10080)
    code, out, err = cli("up", path)  # the real probe answers and parses: not idle, quiet
    assert code == 0 and "idle:" not in out and "idle check" not in out, out + err
    cfg(IDLE_MINUTES=1)
    out = _idle_pass_output(path, 150)
    assert "idle: no Disco job for 1 min" in out and "terminating the slaves" in out, out
    assert live(observe_cluster(cfg), "slave") == []
    code, out, err = cli("up", path)
    assert code == 0 and "asleep since" in out, out + err
    cfg(NUM_SLAVES=2)
    code, out, err = cli("up", path, "--wait", "--timeout", "180")
    assert code == 0 and "slave count changed from 1 to 2" in out, out + err
    assert len(live(observe_cluster(cfg), "slave")) == 2
