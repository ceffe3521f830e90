"""Bootstrap wall time: parallel SSH against the same nodes one after another.

Runs the real node phase (``provision.Provisioner.bootstrap``: the rendered per-role
scripts, the real SSH gateway with pinning and logs) on real local sshd nodes
(``sandbox.nodes.NodeFarm``: one isolated overlay root per node, at its own loopback
address). Every measurement gets fresh nodes (1 master + N-1 slaves), so each one is a
first bootstrap, and a fresh STATE_DIR (nothing pinned yet). The config is the sandbox's:
``DISCO_INSTALL: "none"`` and packages already present in the nodes' lower layer, so the
time is the tool's own work (SSH, scripts, user, keys, settings) rather than apt.

For each size it runs SSH_CONCURRENCY 1 (the same nodes one after another), 16 and 32
(waves, as the defaults before 1024 made them), ``--repeat`` times each, and prints a
Markdown table of median wall times, the speedup over concurrency 1, t(N)/t(1) at the
same concurrency, the SSH sessions opened, the CPU time of this (client) process, and
how busy the machine's CPUs were meanwhile. ``--wait S`` adds ``sleep S`` as POST_INIT to
every node, to model a bootstrap that mostly waits (apt downloads on real EC2) instead of computing.

    sudo python bench/bootstrap_time.py [--sizes 1 10 30] [--concurrency 1 16 32]
                                        [--repeat 3] [--wait 0]

Needs what the sandbox needs: root, openssh-server, sudo, erlang-nox.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disposabledisco.cluster import Node  # noqa: E402
from disposabledisco.config import Config, parse_config  # noqa: E402
from disposabledisco.provision import Provisioner, ssh_gateway_for  # noqa: E402
from disposabledisco.sandbox.nodes import (  # noqa: E402
    NodeFarm,
    generate_ed25519_key,
    port_open,
)
from disposabledisco.sandbox.run import SANDBOX_PACKAGES  # noqa: E402

SUBNET_OCTETS = range(100, 250)  # 127.10.X.0/24; 127.10.0.x is the sandbox's default


@dataclass
class Run:
    size: int
    concurrency: int
    seconds: float
    sessions: int
    cpu_busy: float  # share of all the machine's CPU time spent busy during the run
    client_cpu: float  # CPU seconds of this process (SSH client, paramiko) during the run
    node_seconds: float  # median time of one node's bootstrap (connect + script)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def free_subnet(needed: int) -> str:
    """A 127.10.X prefix where none of the addresses we need has a listener already."""
    for octet in SUBNET_OCTETS:
        prefix = f"127.10.{octet}"
        if not any(port_open(f"{prefix}.{h}", 22, timeout=0.05) for h in range(4, 4 + needed)):
            return prefix
    raise SystemExit("no free 127.10.X.0/24 subnet for the benchmark nodes")


def make_config(workdir: Path, key_file: Path, public: str, size: int,
                concurrency: int, wait: float) -> Config:
    return parse_config({
        "POST_INIT": f"sleep {wait:g}" if wait > 0 else "",
        "AMI": "ami-0123456789abcdef0", "KEY_NAME": "bench", "TAG_KEY": "bench",
        "NUM_SLAVES": size - 1, "INSTANCE_TYPE": "m5.large",
        "SSH_USER": "ubuntu", "SSH_KEY_FILE": str(key_file), "SSH_ADDRESS": "private_ip",
        "SSH_CONCURRENCY": concurrency, "MGMT_KEY": public,
        "STATE_DIR": str(workdir), "BASE_PACKAGES": list(SANDBOX_PACKAGES),
        "DISCO_INSTALL": "none",
    })


def measure(farm: NodeFarm, prefix: str, key_file: Path, public: str, size: int,
            concurrency: int, serial: int, wait: float) -> Run:
    """Bootstrap `size` fresh nodes once with the given SSH_CONCURRENCY."""
    ids = [f"i-bench{serial:05d}{n:05d}" for n in range(size)]
    started_nodes = farm.start_many((iid, f"{prefix}.{4 + n}") for n, iid in enumerate(ids))
    try:
        nodes = [Node(role="master" if n == 0 else "slave",
                      group="master" if n == 0 else "m5.large", instance_type="m5.large",
                      instance_id=node.instance_id, instance_state="running",
                      private_ip=node.address, state="running")
                 for n, node in enumerate(started_nodes)]
        with tempfile.TemporaryDirectory(prefix="dd-bench-state-") as state:
            config = make_config(Path(state), key_file, public, size, concurrency, wait)
            with ssh_gateway_for(config) as gateway:
                provisioner = Provisioner(config, gateway, lambda types: dict.fromkeys(types, 2))
                busy0, total0 = cpu_times()
                cpu0 = time.process_time()
                began = time.monotonic()
                outcomes = provisioner.bootstrap(nodes)
                seconds = time.monotonic() - began
                client_cpu = time.process_time() - cpu0
                busy1, total1 = cpu_times()
                failed = {i: o.error for i, o in outcomes.items() if not o.ok}
                if failed:
                    raise SystemExit(f"bootstrap failed on {len(failed)} node(s): "
                                     f"{next(iter(failed.values()))}")
                return Run(size, concurrency, seconds, gateway.sessions_opened,
                           (busy1 - busy0) / max(1, total1 - total0), client_cpu,
                           statistics.median(o.seconds for o in outcomes.values()))
    finally:
        for iid in ids:
            farm.stop(iid)


def table(runs: list[Run], sizes: list[int], levels: list[int]) -> str:
    def median(size: int, level: int) -> float:
        return statistics.median(r.seconds for r in runs
                                 if r.size == size and r.concurrency == level)

    base = min(sizes)
    lines = ["| nodes | SSH_CONCURRENCY | wall time (s) | speedup vs 1 | t(N)/t(" f"{base})"
             " | SSH sessions | one node (s) | client CPU (s) | machine CPU busy |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size in sizes:
        for level in levels:
            mine = [r for r in runs if r.size == size and r.concurrency == level]
            wall = median(size, level)
            speedup = median(size, 1) / wall if 1 in levels else float("nan")
            ratio = wall / median(base, level)
            sessions = statistics.median(r.sessions for r in mine)
            node = statistics.median(r.node_seconds for r in mine)
            busy = statistics.median(r.cpu_busy for r in mine)
            client = statistics.median(r.client_cpu for r in mine)
            lines.append(f"| {size} | {level} | {wall:.2f} | {speedup:.1f}× | {ratio:.2f}× | "
                         f"{sessions:g} | {node:.2f} | {client:.2f} | {busy:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 30])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="add POST_INIT `sleep SECONDS` to every node: models the time a "
                             "real bootstrap spends waiting (apt downloads), not computing")
    args = parser.parse_args(argv)
    ok, reason = NodeFarm.available()
    if not ok:
        print(f"cannot run real SSH nodes here: {reason}", file=sys.stderr)
        return 2
    sizes, levels = sorted(set(args.sizes)), sorted(set(args.concurrency))
    private, public = generate_ed25519_key("disposabledisco-bench")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="dd-bench-") as tmp:
        key_file = Path(tmp) / "id_ed25519"
        key_file.touch(mode=0o600)
        key_file.write_text(private)
        prefix = free_subnet(max(sizes))
        serial = 0
        with NodeFarm(authorized_key=public, workdir=Path(tmp) / "nodes") as farm:
            # rounds interleave the settings, so load from other processes hits all alike
            for _ in range(args.repeat):
                for size in sizes:
                    for level in levels:
                        serial += 1
                        run = measure(farm, prefix, key_file, public, size, level, serial,
                                      args.wait)
                        runs.append(run)
                        print(f"  {size:3d} nodes, concurrency {level:2d}: {run.seconds:6.2f} s"
                              f" ({run.sessions} sessions, CPU {run.cpu_busy:.0%})",
                              file=sys.stderr, flush=True)
    print(table(runs, sizes, levels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
