"""Churn benchmark: from empty to a converged 1 + N cluster while the spot market interrupts.

The local EC2 endpoint (moto on 127.0.0.1) runs the project's spot market model with an
interruption rate per *simulated* minute; the market clock runs at ``--time-scale``
simulated seconds per wall second (a ticker thread calls ``market.tick(0.1 * scale)``
every 0.1 s of wall time), and the reconciler reads the same clock (tests/fault_runner.py
``--clock-file``), so its request ages and unresponsive timers agree with EC2's.

With real SSH nodes (root, sshd, overlayfs: tests/fault_fixtures.py) the reconciler is the
real CLI, ``up --wait`` in a child process, with ``DISCO_INSTALL: "none"`` (everything but
installing Disco is done for real). Without them, or with ``--ec2-only``, single
``up --ec2-only`` passes are run back to back until a pass has nothing to do on EC2 and
1 + N instances are live and tagged (the nodes themselves are never bootstrapped).

Measured: passes needed, EC2 calls (every HTTP call that reaches the endpoint, counted by
an HTTP hook in slot "bench"; the benchmark's own sampling reads moto's backend in-process
and makes none), wall and simulated time, and the peak number of live instances (from the
market's launch/terminate events, from a sampler every 20 ms, and after every pass). It
must never exceed 1 + N.

    python bench/churn.py [--slaves 20] [--interruption-rate 0.1] [--time-scale 1 3]
                          [--seeds 1 2 3] [--ec2-only] [--timeout 240]
                          [--launch-api spot-requests fleet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moto.backends import get_backend  # noqa: E402

from tests.fault_fixtures import Case, FaultLab, skip_reason  # noqa: E402

TICK_SECONDS = 0.1
FULFIL_DELAY = 5.0  # simulated seconds from bid to instance


@dataclass
class Result:
    mode: str
    slaves: int
    rate: float
    scale: float
    seed: int
    ssh_deadline: int
    launch_api: str = "spot-requests"
    failed_passes: int = 0
    converged: bool = False
    passes: int = 0
    runs: int = 0
    calls: Counter = field(default_factory=Counter)
    wall: float = 0.0
    simulated: float = 0.0
    interruptions: int = 0
    launched: int = 0
    peak_events: int = 0
    peak_sampled: int = 0
    peak_passes: int = 0
    settle_runs: int = 0
    checked: str = ""


def live_count(case: Case) -> int:
    """Live instances straight from moto's backend (no HTTP: not counted as an EC2 call)."""
    backend = get_backend("ec2")[case.market.account_id][case.market.region]
    for _ in range(5):
        try:
            return sum(1 for i in list(backend.all_instances())
                       if i.state in ("pending", "running"))
        except RuntimeError:  # changed during iteration: read again
            continue
    return -1


def peak_from_events(case: Case) -> int:
    """Replay the market's launches and terminations in order; the highest live count."""
    live, peak = 0, 0
    for event in list(case.market.events):
        if event.kind in ("fulfil", "launch"):
            live += 1
        elif event.kind in ("interrupt", "terminate"):
            live -= 1
        peak = max(peak, live)
    return peak


class Churn:
    """Ticks the market at the time scale and samples live instances."""

    def __init__(self, case: Case, scale: float) -> None:
        self.case, self.scale = case, scale
        self.peak = 0
        self.per_pass: list[int] = []
        self._seen_passes = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._tick, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]

    def __enter__(self) -> Churn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _tick(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            self.case.market.tick((now - last) * self.scale)
            self.case.sync_clock()
            last = now

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, live_count(self.case))
            passes = sum(1 for e in self.case.events() if e["event"] == "pass")
            if passes > self._seen_passes:
                self._seen_passes = passes
                self.per_pass.append(live_count(self.case))


def run_one(lab: FaultLab, mode: str, slaves: int, rate: float, scale: float, seed: int,
            timeout: float, ssh_deadline: int, launch_api: str) -> Result:
    result = Result(mode, slaves, rate, scale, seed, ssh_deadline, launch_api)
    case = lab.case(f"churn-{mode}-{launch_api}-{scale:g}-{seed}", slaves=slaves, seed=seed,
                    tick=0, fulfil_delay=FULFIL_DELAY, interruption_rate=rate)
    # a node interrupted between observe and connect is retried this long by a pass
    case.write_config(NUM_SLAVES=slaves, SSH_DEADLINE_SECONDS=ssh_deadline,
                      SSH_CONCURRENCY=16, LAUNCH_API=launch_api)
    calls: Counter = Counter()
    lock = threading.Lock()

    def count(action: str | None) -> None:
        if action:
            with lock:
                calls[action] += 1

    started_sim = case.market.clock.seconds
    started = time.monotonic()
    lab.endpoint.set_http_hook(count, slot="bench")
    try:
        with Churn(case, scale) as churn:
            if mode == "nodes":
                child = case.start("up", str(case.config_path), "--wait", "--timeout",
                                   str(timeout))
                try:  # --timeout is checked between passes: give the last one time
                    runs = [child.wait(timeout + 120)]
                except AssertionError:  # killed: record what it did, not converged
                    runs = []
                    result.passes = sum(1 for e in child.events() if e["event"] == "pass")
                result.converged = bool(runs) and runs[0].code == 0
            else:
                runs = ec2_only_passes(case, slaves, timeout)
                result.converged = bool(runs) and not [
                    a for a in runs[-1].actions if not a["skipped"]]
            result.wall = time.monotonic() - started
            result.simulated = case.market.clock.seconds - started_sim
            case.market.interruption_rate = 0.0  # no churn while we look
            result.peak_sampled = churn.peak
            result.peak_passes = max(churn.per_pass, default=0)
    finally:
        lab.endpoint.set_http_hook(None, slot="bench")
    result.calls = calls
    result.runs = len(runs) or 1
    result.passes = sum(len(r.passes) for r in runs) or result.passes
    result.failed_passes = sum(1 for r in runs for e in r.passes if e["exit"] == 1)
    events = Counter(e.kind for e in case.market.events)
    result.interruptions = events["interrupt"]
    result.launched = events["fulfil"] + events["launch"]
    result.peak_events = peak_from_events(case)
    if mode == "nodes" and result.converged:
        # an interruption may have landed after the converging pass: settle, then check
        settle = case.converge(attempts=2) if case.up().code != 0 else []
        result.settle_runs = len(settle)
        print(f"converged: {result}", file=sys.stderr)
        case.check_converged(doctor=False)  # see Case.check_converged: shared ports
        result.checked = "invariants ok"
    return result


def ec2_only_passes(case: Case, slaves: int, timeout: float) -> list:
    """Back-to-back `up --ec2-only` passes until one does nothing and 1 + N are live."""
    deadline = time.monotonic() + timeout
    runs = []
    while time.monotonic() < deadline:
        run = case.up("--ec2-only")
        runs.append(run)
        if run.code not in (0, 10):
            raise SystemExit(f"up --ec2-only failed:\n{run.describe()}")
        tagged = [i for i in case.live_instances() if case.role(i)]
        ec2_work = [a for a in run.actions if not a["skipped"]]  # node work is skipped
        if not ec2_work and len(tagged) == 1 + slaves:
            return runs
        time.sleep(0.5)
    return runs


def table(results: list[Result]) -> str:
    head = ["mode", "LAUNCH_API", "slaves", "interruptions per sim. min",
            "time scale (sim s / wall s)",
            "SSH deadline s", "seed", "passes (failed)", "reconciler runs", "EC2 calls",
            "wall s", "simulated s", "interrupted", "instances launched",
            "peak live (events / sampled / after passes)", "converged"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [r.mode, r.launch_api, r.slaves, f"{r.rate:.0%}", f"{r.scale:g}",
                 r.ssh_deadline, r.seed,
                 f"{r.passes} ({r.failed_passes})", r.runs,
                 sum(r.calls.values()), f"{r.wall:.0f}", f"{r.simulated:.0f}",
                 r.interruptions, r.launched,
                 f"{r.peak_events} / {r.peak_sampled} / {r.peak_passes}",
                 ("yes" if r.converged else "NO") + (f", {r.checked}" if r.checked else "")]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines = [*rows, "", "EC2 calls by action:", ""]
    for r in results:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(r.calls.items()))
        lines.append(f"- {r.mode}, {r.launch_api}, scale {r.scale:g}, "
                     f"SSH deadline {r.ssh_deadline} s, "
                     f"seed {r.seed}: {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slaves", type=int, default=20)
    parser.add_argument("--interruption-rate", type=float, default=0.10,
                        help="chance per running spot instance per simulated minute")
    parser.add_argument("--time-scale", type=float, nargs="+", default=[1.0, 3.0],
                        help="simulated seconds per wall second (one run per value)")
    parser.add_argument("--ec2-only", action="store_true", help="no SSH nodes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="one run per seed and time scale (the market's randomness)")
    parser.add_argument("--timeout", type=float, default=240,
                        help="`up --wait --timeout` of each run, wall seconds")
    parser.add_argument("--ssh-deadline", type=int, default=30,
                        help="SSH_DEADLINE_SECONDS of the config (product default 300)")
    parser.add_argument("--workdir", help="keep configs, traces and node logs here")
    parser.add_argument("--launch-api", nargs="+", default=["spot-requests"],
                        choices=["spot-requests", "fleet"],
                        help="LAUNCH_API of the config (one set of runs per value)")
    args = parser.parse_args(argv)
    mode = "nodes"
    why = skip_reason()
    if args.ec2_only or why:
        mode = "ec2-only"
        print(f"mode: ec2-only ({'asked' if args.ec2_only else why})", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="churn-") as tmp, \
            FaultLab(Path(args.workdir or tmp), nodes=mode == "nodes") as lab:
        for launch_api in args.launch_api:
            for scale in args.time_scale:
                for seed in args.seeds:
                    result = run_one(lab, mode, args.slaves, args.interruption_rate, scale,
                                     seed, args.timeout, args.ssh_deadline, launch_api)
                    results.append(result)
                    print(f"{launch_api} scale {scale:g} seed {seed}: {result}",
                          file=sys.stderr)
    print(table(results))
    worst = max(max(r.peak_events, r.peak_sampled, r.peak_passes) for r in results)
    if worst > 1 + args.slaves:
        print(f"PEAK {worst} EXCEEDS {1 + args.slaves} LIVE INSTANCES", file=sys.stderr)
        return 1
    return 0 if all(r.converged for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
