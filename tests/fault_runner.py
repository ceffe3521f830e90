"""Run the real CLI in a child process, with faults the fault suite injects from outside.

    python tests/fault_runner.py [--trace FILE] [--clock-file FILE]
        [--kill-after-action K] [--kill-in-bootstrap SECONDS] -- up CONFIG [--wait ...]

Everything here wraps product functions from the outside (the product has no fault hooks):

* ``--kill-after-action K``: ``reconcile._Applier.apply`` is wrapped so the process
  SIGKILLs itself right after the K-th action of this run returns, i.e. at an action
  boundary, before the next action (or the next pass) starts. No cleanup, no ``finally``.
* ``--kill-in-bootstrap S``: the first bootstrap script sent to a node arms a timer that
  SIGKILLs the process S seconds later, while the scripts run on the nodes.
* ``--clock-file F``: the reconciler's "now" is wall time plus the offset (seconds) read
  from F on every pass, so a test can move the spot market's clock (which stamps request
  CreateTime) and the reconciler's clock forward together, as real EC2 and NTP agree.
* ``--trace F``: one JSON line per event (pass, action, bootstrap script start) so the
  test sees what the run did and can inject a fault at the right moment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disposabledisco import cli, provision, reconcile, ssh  # noqa: E402

_trace_lock = threading.Lock()
_trace_path: Path | None = None


def trace(event: str, **fields: object) -> None:
    """Append one event line (flushed and fsynced: the process may die right after)."""
    if _trace_path is None:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields})
    with _trace_lock, open(_trace_path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def die(why: str) -> None:
    """SIGKILL ourselves: no atexit, no finally, no lock release but the kernel's."""
    trace("sigkill", why=why)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def clock(path: Path):
    """``now`` for run_pass: wall time plus the offset the test keeps in ``path``."""
    def now() -> datetime:
        try:
            offset = float(path.read_text().strip() or 0)
        except (OSError, ValueError):
            offset = 0.0
        return datetime.now(timezone.utc) + timedelta(seconds=offset)
    return now


def install(args: argparse.Namespace) -> None:
    """Wrap product functions; each wrapper calls the original unchanged."""
    original_pass = reconcile.run_pass
    now = clock(Path(args.clock_file)) if args.clock_file else None

    def run_pass(*a, **kw):
        if now is not None and "now" not in kw:
            kw["now"] = now
        report = original_pass(*a, **kw)
        trace("pass", exit=report.exit_code, dry_run=report.dry_run,
              actions=[type(r.action).__name__ for r in report.results],
              failed=[r.action.describe() + ": " + r.detail for r in report.results
                      if not r.ok],
              problems=list(report.plan.problems))
        return report

    cli.run_pass = run_pass

    original_apply = reconcile._Applier.apply
    count = {"n": 0}

    def apply(self, action):
        count["n"] += 1
        n = count["n"]
        trace("action-start", n=n, kind=type(action).__name__, what=action.describe())
        result = original_apply(self, action)
        trace("action", n=n, kind=type(action).__name__, what=action.describe(),
              ok=result.ok, skipped=result.skipped, detail=result.detail)
        if args.kill_after_action and n >= args.kill_after_action:
            die(f"after action {n} ({type(action).__name__})")
        return result

    reconcile._Applier.apply = apply

    original_bootstrap = provision.Provisioner.bootstrap
    original_script = ssh.Session.script
    in_bootstrap = threading.Event()
    armed = threading.Lock()

    def bootstrap(self, nodes):
        trace("bootstrap", ids=[n.instance_id for n in nodes])
        in_bootstrap.set()
        try:
            return original_bootstrap(self, nodes)
        finally:
            in_bootstrap.clear()

    def script(self, text, *a, **kw):
        if in_bootstrap.is_set() and a:  # the bootstrap passes its digest as argument
            trace("bootstrap-script", id=self.target.instance_id)
            if args.kill_in_bootstrap is not None and armed.acquire(blocking=False):
                timer = threading.Timer(args.kill_in_bootstrap, die,
                                        ("during bootstrap scripts",))
                timer.daemon = True
                timer.start()
        return original_script(self, text, *a, **kw)

    provision.Provisioner.bootstrap = bootstrap
    ssh.Session.script = script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace")
    parser.add_argument("--clock-file")
    parser.add_argument("--kill-after-action", type=int, default=0)
    parser.add_argument("--kill-in-bootstrap", type=float, default=None)
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    global _trace_path
    _trace_path = Path(args.trace) if args.trace else None
    command = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    install(args)
    trace("start", argv=command)
    code = cli.main(command)
    trace("exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
