"""Time to ready: `up --wait` from nothing to a converged cluster of N nodes, in the sandbox.

Each run is a fresh cluster of 1 master + N-1 slaves on the sandbox's pieces: the local
EC2 endpoint (moto) with the spot market model (the sandbox's own fulfilment delay and
tick) and a NodeFarm of real sshd nodes, one per launched instance, at its own loopback
address. POST_INIT is ``sleep S`` on every node, so most of a node's bootstrap is waiting
on the node, as an apt install is on EC2. The tool runs as the user runs it: the CLI,
``disposabledisco up CONFIG --wait``, in its own process; the wall time of that process
is t(N).

Unlike the sandbox (whose market callback starts nodes one after another), this
benchmark starts the nodes that one market tick launched all at once, as EC2 boots
instances in parallel, so the boot of N nodes is not serialised by the harness.

Reported per run: t(N) and t(N)/t(1); when the last instance was running, bootstrapped
(every node's bootstrap tag) and joined, from EC2 tags polled once a second; SSH
sessions and connect attempts per node (from the per-node logs the tool writes); CPU
seconds of the CLI process (the operator's side), of the nodes' processes (sshd, sudo,
the scripts: on EC2 every node has its own CPUs, here they share this machine's) and of
this process (endpoint, market, farm); the machine's load average.

    sudo python bench/time_to_ready.py [--sizes 1 30 100 250] [--wait 15]
                                       [--concurrency DEFAULT 32] [--repeat 1]

Needs what the sandbox needs: root, openssh-server, sudo, erlang-nox.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bootstrap_time import cpu_times  # noqa: E402

from disposabledisco.cluster import TAG_BOOTSTRAP, TAG_JOINED  # noqa: E402
from disposabledisco.sandbox.endpoint import LocalEc2  # noqa: E402
from disposabledisco.sandbox.loopback import free_subnet  # noqa: E402
from disposabledisco.sandbox.market import SpotMarket  # noqa: E402
from disposabledisco.sandbox.nodes import (  # noqa: E402
    NodeError,
    NodeFarm,
    generate_ed25519_key,
    loopback_ends,
)
from disposabledisco.sandbox.run import SandboxOptions, sandbox_config  # noqa: E402
from tests.e2e_fixtures import terminate_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NETWORK = "127.44.0.0/16"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    size: int
    concurrency: str
    seconds: float
    exit_code: int
    phases: dict[str, float]  # "running" / "bootstrapped" / "joined" -> seconds from start
    sessions: dict[str, float]  # "master" / "slave" -> SSH sessions per node (mean)
    attempts: float  # connect attempts per node (mean)
    client_cpu: float
    node_cpu: float
    harness_cpu: float
    machine_busy: float
    load: tuple[float, float]  # 1-minute load average before, after
    node_memory_mib: float = 0.0
    notes: list[str] = field(default_factory=list)


class ParallelBoot:
    """Market launch callback: nodes launched by one tick are started together."""

    def __init__(self, farm: NodeFarm) -> None:
        self.farm = farm
        self.pending: queue.Queue[tuple[str, str]] = queue.Queue()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="boot")
        self.thread.start()

    def on_launch(self, instance_id: str, private_ip: str) -> None:
        self.pending.put((instance_id, private_ip))

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                batch = [self.pending.get(timeout=0.2)]
            except queue.Empty:
                continue
            time.sleep(0.05)  # the rest of the same tick
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self.pending.get_nowait())
            try:
                self.farm.start_many(batch, keep_going=True)
            except NodeError as error:
                self.errors.append(str(error)[:300])


def process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and its reaped children)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK)
    return table


def node_cpu_and_memory(farm: NodeFarm) -> tuple[float, float]:
    """CPU seconds used so far by every node's processes (sshd, sessions, scripts: the
    live ones and those they reaped) and their resident memory in MiB."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seconds, rss_kib = 0.0, 0
    for node in farm.nodes.values():
        stack = [node.pid]
        while stack:
            pid = stack.pop()
            if pid in table:
                seconds += table[pid][1]
                with contextlib.suppress(OSError, ValueError, StopIteration), \
                        open(f"/proc/{pid}/status") as handle:
                    rss_kib += next(int(line.split()[1]) for line in handle
                                    if line.startswith("VmRSS:"))
            stack.extend(children.get(pid, []))
    return seconds, rss_kib / 1024


def poll_phases(client: Any, tag_key: str, size: int, began: float,
                phases: dict[str, float], done: threading.Event) -> None:
    """Record when the last instance was running, bootstrapped and joined (EC2 tags)."""
    while not done.wait(1.0):
        try:
            pages = client.get_paginator("describe_instances").paginate(
                Filters=[{"Name": "tag-key", "Values": [tag_key]},
                         {"Name": "instance-state-name", "Values": ["running"]}])
            instances = [i for page in pages for r in page["Reservations"]
                         for i in r["Instances"]]
        except Exception:  # noqa: BLE001 - a busy endpoint: try again next second
            continue
        tags = [{t["Key"]: t["Value"] for t in i.get("Tags", [])} for i in instances]
        now = time.monotonic() - began
        if len(instances) >= size:
            phases.setdefault("running", now)
            if all(TAG_BOOTSTRAP in t for t in tags):
                phases.setdefault("bootstrapped", now)
            slaves = [t for t in tags if t.get(tag_key) == "slave"]
            if slaves and all(TAG_JOINED in t for t in slaves):
                phases.setdefault("joined", now)


def ssh_counts(log_dir: Path, roles: dict[str, str]) -> tuple[dict[str, float], float]:
    """Sessions per node by role, and connect attempts per node, from the node logs
    (the gateway writes "connected as … after K attempt(s)" for every session)."""
    sessions: dict[str, list[int]] = {"master": [], "slave": []}
    attempts = []
    for instance_id, role in roles.items():
        path = log_dir / f"{instance_id}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        sessions[role].append(text.count(" connected as "))
        attempts.append(sum(int(n) for n in re.findall(r" after (\d+) attempt\(s\)", text)))
    return ({role: statistics.mean(v) for role, v in sessions.items() if v},
            statistics.mean(attempts) if attempts else 0.0)


def roles_of(client: Any, tag_key: str) -> dict[str, str]:
    """instance id -> "master" / "slave" for the run's running instances."""
    pages = client.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag-key", "Values": [tag_key]},
                 {"Name": "instance-state-name", "Values": ["running"]}])
    return {i["InstanceId"]: t["Value"] for page in pages for r in page["Reservations"]
            for i in r["Instances"] for t in i.get("Tags", []) if t["Key"] == tag_key}


def measure(endpoint: LocalEc2, farm: NodeFarm, workdir: Path, key_file: Path, public: str,
            size: int, concurrency: str, wait: float, serial: int) -> Run:
    subnet = free_subnet(NETWORK, ends=loopback_ends())
    network = endpoint.setup_loopback_network(NETWORK, str(subnet), public_key=public)
    directory = workdir / f"run{serial}"
    directory.mkdir(mode=0o700)
    values = sandbox_config(endpoint, network, key_file, public,
                            SandboxOptions(directory, slaves=size - 1))
    tag_key = f"ttr{serial}"
    values.update(TAG_KEY=tag_key, STATE_DIR=str(directory / "state"),
                  POST_INIT=f"sleep {wait:g}" if wait > 0 else "")
    if concurrency != "default":
        values["SSH_CONCURRENCY"] = int(concurrency)
    config_path = directory / "config.json"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(values, handle)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true"}
    client = endpoint.client()
    phases: dict[str, float] = {}
    done = threading.Event()
    load_before = os.getloadavg()[0]
    busy0, total0 = cpu_times()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    harness0 = time.process_time()
    node_cpu0, _ = node_cpu_and_memory(farm)
    began = time.monotonic()
    poller = threading.Thread(target=poll_phases, daemon=True,
                              args=(client, tag_key, size, began, phases, done))
    poller.start()
    proc = subprocess.run([sys.executable, "-m", "disposabledisco", "up", str(config_path),
                           "--wait", "--timeout", "1800"], env=env, capture_output=True,
                          text=True, check=False)
    seconds = time.monotonic() - began
    done.set()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    harness = time.process_time() - harness0
    busy1, total1 = cpu_times()
    node_cpu, memory = node_cpu_and_memory(farm)
    load_after = os.getloadavg()[0]
    poller.join()
    [state] = (directory / "state").glob(f"{tag_key}@*")  # config.state_dir
    sessions, attempts = ssh_counts(state / "logs", roles_of(client, tag_key))
    notes = [] if proc.returncode == 0 else [proc.stdout[-400:] + proc.stderr[-400:]]
    run = Run(size, concurrency, seconds, proc.returncode, phases, sessions, attempts,
              (children1.ru_utime + children1.ru_stime)
              - (children0.ru_utime + children0.ru_stime),
              node_cpu - node_cpu0, harness, (busy1 - busy0) / max(1, total1 - total0),
              (load_before, load_after), memory, notes)
    teardown(client, farm, tag_key)
    return run


def teardown(client: Any, farm: NodeFarm, tag_key: str) -> None:
    """Cancel the run's requests, terminate its instances, stop every node."""
    terminate_cluster(client, tag_key)
    farm.stop_all()


def table(runs: list[Run]) -> str:
    base = {r.concurrency: r.seconds for r in runs if r.size == 1}
    lines = ["| nodes | SSH_CONCURRENCY | t(N) (s) | t(N)/t(1) | all running (s) | "
             "all bootstrapped (s) | all joined (s) | sessions per node (master / slave) | "
             "connect attempts per node | CLI CPU (s) | node CPU (s) | harness CPU (s) | "
             "machine CPU busy | load avg (before → after) |",
             "| " + " | ".join(["---:"] * 14) + " |"]
    for r in runs:
        t1 = base.get(r.concurrency) or base.get("default")
        ratio = f"{r.seconds / t1:.2f}×" if t1 else "–"
        sessions = " / ".join(f"{r.sessions[k]:.1f}" if k in r.sessions else "–"
                              for k in ("master", "slave"))
        phase = [f"{r.phases[k]:.0f}" if k in r.phases else "–"
                 for k in ("running", "bootstrapped", "joined")]
        lines.append(
            f"| {r.size} | {r.concurrency} | {r.seconds:.1f}"
            + ("" if r.exit_code == 0 else f" (exit {r.exit_code})")
            + f" | {ratio} | {' | '.join(phase)} | {sessions} | {r.attempts:.1f} | "
            f"{r.client_cpu:.1f} | {r.node_cpu:.1f} | {r.harness_cpu:.1f} | "
            f"{r.machine_busy:.0%} | {r.load[0]:.1f} → {r.load[1]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 30, 100])
    parser.add_argument("--wait", type=float, default=15.0, metavar="SECONDS",
                        help="POST_INIT `sleep SECONDS` on every node (default 15)")
    parser.add_argument("--concurrency", nargs="+", default=["default"],
                        help="SSH_CONCURRENCY values to run ('default': the config's "
                             "default)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the runs as JSON here")
    args = parser.parse_args(argv)
    ok, reason = NodeFarm.available()
    if not ok:
        print(f"cannot run real SSH nodes here: {reason}", file=sys.stderr)
        return 2
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
        os.environ.pop(name, None)
    private, public = generate_ed25519_key("disposabledisco-bench")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="dd-ttr-") as tmp:
        workdir = Path(tmp)
        key_file = workdir / "id_ed25519"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(private)
        market = SpotMarket(seed=1, fulfil_delay=SandboxOptions.fulfil_delay)
        endpoint = LocalEc2(market=market).start()
        serial = 0
        with NodeFarm(authorized_key=public, workdir=workdir / "nodes") as farm:
            boot = ParallelBoot(farm)
            market.on_launch(boot.on_launch)
            market.on_terminate(farm.on_terminate)
            market.background(0.5)
            try:
                for _ in range(args.repeat):
                    for level in args.concurrency:
                        for size in args.sizes:
                            serial += 1
                            run = measure(endpoint, farm, workdir, key_file, public, size,
                                          level, args.wait, serial)
                            runs.append(run)
                            print(f"  N={size} SSH_CONCURRENCY={level}: {run.seconds:.1f} s "
                                  f"exit {run.exit_code} phases {run.phases} sessions "
                                  f"{run.sessions} node CPU {run.node_cpu:.1f} s, load "
                                  f"{run.load}, node RSS {run.node_memory_mib:.0f} MiB "
                                  f"{run.notes}", file=sys.stderr, flush=True)
            finally:
                boot.stop.set()
                market.stop()
                endpoint.stop()
            if boot.errors:
                print("node start errors: " + "; ".join(boot.errors[:3]), file=sys.stderr)
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
