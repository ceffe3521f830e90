"""EC2 API calls per pass for both LAUNCH_API values, and the cost of one converged pass.

The local EC2 endpoint (moto over HTTP with the sandbox spot market, which serves
RequestSpotInstances and CreateFleet alike) runs in a child process, so this process is
only disposabledisco. Every API call is counted with a botocore `before-call` hook.

For each launch API and size N it runs, with real passes (`reconcile.run_pass`):
- the launch passes (node work off, as `up --ec2-only`): bids or fleets, tagging of
  fulfilled instances, until EC2 has nothing left to do;
- the node-work pass: an in-process node worker (no SSH; every bootstrap, join and host
  table works, and bootstrap pins a host key per node as the first SSH contact does), so
  the pass records bootstrap digests, joins and the host table in tags as a real one does;
- one converged pass (asserted converged, no node work).

Then, in a fresh process that loads the config and makes converged passes at the largest
N: wall time split into botocore's HTTP sends (the endpoint's share: transfer, moto, its
XML), the rest of observe and the rest of the pass; peak RSS around the first pass and
tracemalloc's peak of another.

    python bench/ec2_calls.py [--sizes 10 100 1000] [--apis spot-requests fleet]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disposabledisco import reconcile  # noqa: E402
from disposabledisco.config import load_config  # noqa: E402
from disposabledisco.ec2 import Ec2Gateway, make_client  # noqa: E402
from disposabledisco.hostkeys import HostKey, HostKeyStore  # noqa: E402

TAG_CALLS = ("CreateTags", "DeleteTags")
SUBNET = {"cidr": "127.20.0.0/16", "subnet": "127.20.0.0/20"}  # room for 4000 instances


# -- the endpoint, in a child process ---------------------------------------------------------

def _serve(conn: Any) -> None:
    """Child process: a LocalEc2 with the spot market, driven over a pipe."""
    from disposabledisco.sandbox.endpoint import LocalEc2
    from disposabledisco.sandbox.market import SpotMarket

    market = SpotMarket(seed=1, fulfil_delay=0.0)
    with LocalEc2(market=market) as endpoint:
        conn.send((endpoint.url, endpoint.region))
        while True:
            command = conn.recv()
            if command == "reset":
                endpoint.reset()
                conn.send(endpoint.setup_loopback_network(**SUBNET))
            elif command == "tick":
                market.tick(1.0)
                conn.send(None)
            else:
                return


class Endpoint:
    """The child process's endpoint: `reset()` gives a fresh account, `tick()` lets the
    market fulfil open requests."""

    def __enter__(self) -> Endpoint:
        self.conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=_serve,
                                                                     args=(child,))
        self.process.start()
        self.url, self.region = self.conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.send("stop")
        self.process.join(30)

    def reset(self) -> dict[str, str]:
        self.conn.send("reset")
        return self.conn.recv()

    def tick(self) -> None:
        self.conn.send("tick")
        self.conn.recv()


# -- our side ---------------------------------------------------------------------------------

def write_config(folder: Path, endpoint: Endpoint, network: dict[str, str], slaves: int,
                 api: str) -> Path:
    path = folder / f"{api}-{slaves}.json"
    path.write_text(json.dumps({
        "AMI": network["image_id"], "KEY_NAME": network["key_name"],
        "SECURITY_GROUPS": [network["security_group_id"]], "SUBNET_ID": network["subnet_id"],
        "ENDPOINT_URL": endpoint.url, "REGION": endpoint.region, "TAG_KEY": "bench",
        "NUM_SLAVES": slaves, "MAX_BID": "0.10", "LAUNCH_API": api, "MGMT_KEY": "",
        "DISCO_INSTALL": "none", "STATE_DIR": str(folder / f"state-{api}-{slaves}")}))
    return path


class Counted:
    """A gateway whose client counts API calls and the time spent in HTTP sends."""

    def __init__(self, config: Any) -> None:
        client = make_client(config)
        self.calls: Counter = Counter()
        self.http_seconds = 0.0
        client.meta.events.register("before-call.ec2.*",
                                    lambda model, **_: self.calls.update([model.name]))
        session = client._endpoint.http_session  # botocore's: the one place bytes leave
        send = session.send

        def timed(request: Any) -> Any:
            started = time.perf_counter()
            try:
                return send(request)
            finally:
                self.http_seconds += time.perf_counter() - started

        session.send = timed
        self.client = client
        self.gateway = Ec2Gateway(config, client=client)

    def reset(self) -> None:
        self.calls.clear()
        self.http_seconds = 0.0


class Worker:
    """Node work without SSH: everything works; bootstrap pins a key per node."""

    def __init__(self, store: HostKeyStore) -> None:
        self.store = store
        self.steps = 0

    def begin_pass(self) -> None:
        """Nothing to forget: this worker gives up on no node."""

    def bootstrap(self, nodes: list[Any]) -> dict[str, Any]:
        for node in nodes:
            blob = (b"\0\0\0\x0bssh-ed25519\0\0\0\x20"
                    + int(node.instance_id[2:], 16).to_bytes(32, "big"))
            self.store.pin(node.instance_id, HostKey.from_blob(blob))
        return self._done(nodes)

    def join(self, master: Any, slaves: list[Any]) -> dict[str, Any]:
        return self._done(slaves)

    def apply_membership(self, master: Any, members: list[Any], drain: bool = False) -> Any:
        self.steps += 1
        return _Ok()

    def idle_probe(self, master: Any) -> str:
        raise AssertionError("IDLE_MINUTES is off here")

    def _done(self, nodes: list[Any]) -> dict[str, Any]:
        self.steps += 1
        return {n.instance_id: _Ok() for n in nodes}


class _Ok:
    ok, error, log_tail, fault = True, None, (), "node"


def mark_converged(config: Any, client: Any) -> reconcile.PassReport:
    """The node phase without SSH (`Worker`): one pass that leaves the tags and join
    records a real node phase leaves. EC2 must have nothing left to do."""
    report = reconcile.run_pass(config, Ec2Gateway(config, client=client),
                                Worker(HostKeyStore(config.state_dir)))
    assert not report.failed and not report.plan.ec2_actions, \
        [r.detail for r in report.results if not r.ok] or report.plan.ec2_actions
    return report


def passes(endpoint: Endpoint, config_path: Path) -> dict[str, Any]:
    """Calls by name of the launch passes, the node-work pass and a converged pass."""
    config = load_config(config_path)
    counted = Counted(config)
    launch = []
    for _ in range(6):
        counted.reset()
        report = reconcile.run_pass(config, counted.gateway, None)
        if not report.plan.ec2_actions:
            break
        launch.append(Counter(counted.calls))
        endpoint.tick()
    else:
        raise AssertionError("the launch did not settle in 6 passes")
    counted.reset()
    mark_converged(config, counted.client)
    node_work = Counter(counted.calls)
    counted.reset()
    worker = Worker(HostKeyStore(config.state_dir))
    report = reconcile.run_pass(config, counted.gateway, worker)
    assert report.converged and worker.steps == 0, [a.describe() for a in report.plan.actions]
    return {"launch": launch, "node_work": node_work, "converged": Counter(counted.calls)}


def high_water_mib() -> float:
    """This process's peak RSS so far. /proc's VmHWM belongs to this program alone; the
    fallback ru_maxrss may carry the parent's peak across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_converged(config_path: str, repeat: int = 3) -> dict[str, float]:
    """Converged passes in this fresh process: the first for peak memory, then `repeat`
    timed ones (medians), split into HTTP sends (the endpoint: transfer, moto, XML out),
    the rest of `observe` (botocore's parsing and our ownership filter) and the rest of
    the pass (pins and join book, the cluster model, the plan); then tracemalloc's peak
    of one more pass."""
    config = load_config(config_path)
    counted = Counted(config)
    worker = Worker(HostKeyStore(config.state_dir))
    observe = counted.gateway.observe
    spent = {"observe": 0.0, "observe_cpu": 0.0}

    def timed_observe() -> Any:
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            return observe()
        finally:
            spent["observe"] += time.perf_counter() - started
            spent["observe_cpu"] += time.process_time() - started_cpu

    counted.gateway.observe = timed_observe  # type: ignore[method-assign]
    before = high_water_mib()
    runs = []
    for _ in range(1 + repeat):
        counted.reset()
        spent.update(observe=0.0, observe_cpu=0.0)
        started_cpu, started = time.process_time(), time.perf_counter()
        report = reconcile.run_pass(config, counted.gateway, worker)
        wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        assert report.converged and worker.steps == 0
        runs.append({"wall_s": wall, "cpu_s": cpu, "observe_cpu_s": spent["observe_cpu"],
                     "rest_cpu_s": cpu - spent["observe_cpu"],
                     "http_s": counted.http_seconds,
                     "parse_s": spent["observe"] - counted.http_seconds,
                     "model_s": wall - spent["observe"],
                     "calls": sum(counted.calls.values())})
        if len(runs) == 1:
            after = high_water_mib()
    tracemalloc.start()
    reconcile.run_pass(config, counted.gateway, worker)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    timed = runs[1:]
    return {"nodes": len(report.cluster.nodes),
            **{k: statistics.median(r[k] for r in timed) for k in timed[0]},
            "tracemalloc_peak_mib": peak / 2**20, "hwm_before_mib": before,
            "hwm_after_mib": after}


# -- output -----------------------------------------------------------------------------------

def by_name(calls: Counter) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(calls.items())) or "none"


def tags(calls: Counter) -> int:
    return sum(calls[name] for name in TAG_CALLS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--apis", nargs="+", default=["spot-requests", "fleet"])
    parser.add_argument("--measure-converged", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ.setdefault(name, value)
    if args.measure_converged:
        print(json.dumps(measure_converged(args.measure_converged)))
        return
    rows, measured = [], {}
    with Endpoint() as endpoint, tempfile.TemporaryDirectory() as scratch:
        for api in args.apis:
            for size in sorted(args.sizes):
                path = write_config(Path(scratch), endpoint, endpoint.reset(), size, api)
                started = time.perf_counter()
                rows.append((api, size, passes(endpoint, path), time.perf_counter() - started))
            measured[api] = json.loads(subprocess.run(  # the largest, before the next reset
                [sys.executable, __file__, "--measure-converged", str(path)], check=True,
                stdout=subprocess.PIPE, text=True).stdout)
    print("| LAUNCH_API | slaves | launch passes: calls each (tag calls) | node-work pass: "
          "calls (tag calls) | converged pass: calls (tag calls) |")
    print("| --- | ---: | --- | --- | --- |")
    for api, size, found, _ in rows:
        launch = " + ".join(f"{sum(c.values())} ({tags(c)})" for c in found["launch"])
        work, steady = found["node_work"], found["converged"]
        print(f"| {api} | {size} | {launch} | {sum(work.values())} ({tags(work)}) "
              f"| {sum(steady.values())} ({tags(steady)}) |")
    print("\nBy API name:\n")
    for api, size, found, seconds in rows:
        print(f"- {api}, {size} slaves ({seconds:.1f} s): launch "
              + "; ".join(by_name(c) for c in found["launch"])
              + f" | node work: {by_name(found['node_work'])}"
              + f" | converged: {by_name(found['converged'])}")
    print(f"\nOne converged pass at {max(args.sizes)} slaves, in a fresh process:\n")
    for api, m in measured.items():
        print(f"- {api}: {m['nodes']} nodes, {m['calls']:.0f} calls; median of 3 passes: wall "
              f"{m['wall_s']:.3f} s = HTTP sends {m['http_s']:.3f} s + parsing and "
              f"ownership in observe {m['parse_s']:.3f} s + pins, join book, model and "
              f"plan {m['model_s']:.3f} s; CPU {m['cpu_s']:.3f} s = observe (HTTP client, "
              f"parsing, ownership) {m['observe_cpu_s']:.3f} s + the rest "
              f"{m['rest_cpu_s']:.3f} s; tracemalloc peak "
              f"{m['tracemalloc_peak_mib']:.1f} MiB; peak RSS {m['hwm_before_mib']:.0f} MiB "
              f"before the first pass, {m['hwm_after_mib']:.0f} MiB after it")


if __name__ == "__main__":
    main()
