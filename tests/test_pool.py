"""The one-wave pool: sized to the nodes, within the open-file limit, past fd 1023."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from disposabledisco.sandbox.nodes import Node as FarmNode
from disposabledisco.ssh import FD_RESERVE, FDS_PER_NODE, SshGateway, Target

ROOT = Path(__file__).resolve().parents[1]


def pool_size_in_child(soft: int, hard: int, nodes: int) -> tuple[int, int, str]:
    """pool_size(1024, nodes) in a fresh process whose open-file limits start at
    (soft, hard); returns (pool size, soft limit afterwards, what it logged)."""
    code = textwrap.dedent(f"""
        import logging, resource, sys
        logging.basicConfig(stream=sys.stderr, format="%(message)s")
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        from disposabledisco.ssh import pool_size
        print(pool_size(1024, {nodes}), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    size, after = done.stdout.split()
    return int(size), int(after), done.stderr


def test_the_soft_open_file_limit_is_raised_for_one_wave() -> None:
    size, soft, said = pool_size_in_child(256, 8192, 1000)
    assert size == 1000 and soft >= 1000 * FDS_PER_NODE + FD_RESERVE
    assert said == ""


def test_a_low_hard_limit_gives_waves_and_one_warning_naming_ulimit() -> None:
    size, soft, said = pool_size_in_child(256, 1024, 1000)
    assert soft == 1024 and 200 < size <= (1024 - FD_RESERVE) // FDS_PER_NODE
    assert f"lets only {size} of 1000 nodes" in said and "ulimit -n" in said


def test_the_pool_is_no_wider_than_the_nodes_or_the_setting() -> None:
    assert pool_size_in_child(4096, 8192, 3)[0] == 3
    code = "from disposabledisco.ssh import pool_size; print(pool_size(32, 1000))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert done.stdout.strip() == "32"


@contextlib.contextmanager
def high_descriptors() -> Iterator[None]:
    """Hold 1100 descriptors open, so the next sockets and pipes are numbered above 1023
    (where select() refuses them)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.nodes
def test_commands_run_on_descriptors_above_1023(
        start_nodes: Callable[..., list[FarmNode]],
        ssh_gateway_factory: Callable[..., SshGateway]) -> None:
    [node] = start_nodes(1)  # before: the node farm itself still uses select()
    gateway = ssh_gateway_factory()
    with high_descriptors():
        outcomes = gateway.run_parallel([Target(node.instance_id, node.address)],
                                        lambda s: s.run("echo hello").stdout)
    assert outcomes[node.instance_id].ok, outcomes[node.instance_id].error
    assert outcomes[node.instance_id].value == "hello\n"
