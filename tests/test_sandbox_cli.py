"""The sandbox on a shared machine: a free /24, a stale or running sandbox.json, restarts
that keep the user's edits.

Units for the loopback survey and the edit merge; the real `disposabledisco sandbox`
command (root: real SSH nodes) for the banner, the refusal to start twice and a restart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from disposabledisco.sandbox.loopback import (
    free_subnet,
    sandbox_not_running,
    sockets_in_use,
    subnet_in_use,
)
from disposabledisco.sandbox.nodes import NodeFarm, generate_ed25519_key
from disposabledisco.sandbox.run import WIRING_KEYS, Sandbox, SandboxOptions, keep_user_edits
from tests.cli_capture import cli_process as cli
from tests.disco_bundle import source_bundle

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def unused_network() -> str:
    """A /22 in 127.200-239.x that no socket of this machine touches (tests run in parallel
    on shared machines; the sandbox's default 127.42/16 may well be in use)."""
    ends = sockets_in_use()
    rng = random.Random()
    for _ in range(200):
        network = NET(f"127.{rng.randrange(200, 240)}.{rng.randrange(0, 256, 4)}.0/22")
        if not any(address in network for address, _ in ends):
            return str(network)
    raise RuntimeError("no quiet /22 for the test")


@contextlib.contextmanager
def listening(address: str) -> Iterator[int]:
    """A TCP listener on address (any port): the address is in use while it lives."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        sock.listen()
        yield sock.getsockname()[1]


# ------------------------------------------------------------------ the loopback survey
def test_sockets_in_use_reads_ipv4_v4_mapped_and_wildcard_ends(tmp_path: Path):
    header = "  sl  local_address rem_address   st\n"
    # 127.42.0.9:80 listening; on this little- or big-endian host /proc prints native words
    native = int.from_bytes(bytes([127, 42, 0, 9]), sys.byteorder)
    (tmp_path / "tcp").write_text(header + f"   0: {native:08X}:0050 00000000:0000 0A\n")
    v6_words = [0, 0, int.from_bytes(b"\x00\x00\xff\xff", sys.byteorder),
                int.from_bytes(bytes([127, 43, 1, 5]), sys.byteorder)]
    mapped = "".join(f"{w:08X}" for w in v6_words)
    (tmp_path / "tcp6").write_text(
        header + f"   0: {mapped}:0016 {'0' * 32}:0000 0A\n"
        f"   1: {'0' * 32}:0016 {'0' * 32}:0000 0A\n")
    ends = sockets_in_use(tmp_path)  # udp and udp6 are absent: skipped
    assert (IP("127.42.0.9"), 80) in ends
    assert (IP("127.43.1.5"), 22) in ends
    assert (IP("0.0.0.0"), 22) in ends  # the dual-stack wildcard listener
    assert (IP("0.0.0.0"), 0) in ends  # remote end of a listener


def test_an_ended_connection_in_time_wait_uses_no_address(tmp_path: Path):
    """An ssh to a node of a stopped sandbox leaves TIME_WAIT sockets for a minute: the
    restarted sandbox must still get its /24 (and its nodes their old addresses)."""
    header = "  sl  local_address rem_address   st\n"
    client, node = (int.from_bytes(bytes(a), sys.byteorder)
                    for a in ([127, 0, 0, 1], [127, 44, 0, 4]))
    (tmp_path / "tcp").write_text(header + f"   0: {client:08X}:D431 {node:08X}:0016 06\n"
                                  f"   1: {client:08X}:D432 {node:08X}:0016 01\n")
    assert sockets_in_use(tmp_path) == [(IP("127.0.0.1"), 0xD432), (IP("127.44.0.4"), 22)]


def test_this_machines_real_listener_is_seen():
    network = unused_network()
    address = str(NET(network)[9])
    with listening(address) as port:
        assert (IP(address), port) in sockets_in_use()
        assert free_subnet(network) == list(NET(network).subnets(new_prefix=24))[1]
    assert free_subnet(network) == list(NET(network).subnets(new_prefix=24))[0]


def test_free_subnet_skips_used_and_taken_24s_in_order():
    network = unused_network()
    subnets = list(NET(network).subnets(new_prefix=24))
    ends = [(subnets[0][200], 5000)]
    assert free_subnet(network, ends=ends) == subnets[1]
    assert free_subnet(network, taken={str(subnets[1])}, ends=ends) == subnets[2]
    # a /24 network is its own only subnet
    assert free_subnet(str(subnets[3]), ends=[]) == subnets[3]
    with pytest.raises(LookupError, match=rf"every /24 of {subnets[3]} already has .* "
                                          "pass another --network"):
        free_subnet(str(subnets[3]), ends=[(subnets[3][4], 22)])


def test_an_sshd_answering_in_a_24_makes_it_used_unless_port_22_is_a_wildcard():
    network = unused_network()
    subnet = next(NET(network).subnets(new_prefix=24))
    if os.geteuid() != 0:
        pytest.skip("binding port 22 needs root")
    try:
        sock = socket.create_server((str(subnet[4]), 22))
    except OSError as error:  # e.g. this machine's sshd listens on 0.0.0.0:22
        pytest.skip(f"cannot listen on {subnet[4]}:22: {error}")
    with sock:
        assert subnet_in_use(subnet, ends=[])  # only the probe sees it
        assert not subnet_in_use(subnet, ends=[(IP("0.0.0.0"), 22)])


# ------------------------------------------------------------------ stale configs
def test_a_local_endpoint_that_does_not_answer_is_a_sandbox_not_running(tmp_path: Path):
    with listening("127.0.0.1") as port:
        assert sandbox_not_running(tmp_path / "sandbox.json", f"http://127.0.0.1:{port}") \
            is None
    # the port is closed now
    message = sandbox_not_running(tmp_path / "sandbox.json", f"http://127.0.0.1:{port}")
    assert message == (
        f"{tmp_path / 'sandbox.json'}: nothing answers at the EC2 endpoint "
        f"http://127.0.0.1:{port}: the sandbox is not running; start it with "
        f"`python -m disposabledisco sandbox --dir {tmp_path}` (it rewrites this config) "
        "and run again")


def test_the_default_sandbox_folder_needs_no_dir_option(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    message = sandbox_not_running("sandbox/sandbox.json", "http://localhost:9")
    assert message is not None
    assert "start it with `python -m disposabledisco sandbox` (it rewrites" in message


def test_aws_and_configs_without_endpoint_are_never_probed():
    # not loopback: None at once, without a connection attempt (no network in tests)
    assert sandbox_not_running("c.json", "https://ec2.eu-west-1.amazonaws.com") is None
    assert sandbox_not_running("c.json", None) is None


# ------------------------------------------------------------------ restarts keep edits
FRESH = {"ENDPOINT_URL": "http://127.0.0.1:2", "AMI": "ami-2", "NUM_SLAVES": 3,
         "MAX_BID": "0.1", "STATE_DIR": "/s/state"}
WRITTEN = {"ENDPOINT_URL": "http://127.0.0.1:1", "AMI": "ami-1", "NUM_SLAVES": 3,
           "MAX_BID": "0.1", "STATE_DIR": "/s/state"}


def test_a_restart_keeps_edits_replaces_wiring_and_says_both():
    previous = {**WRITTEN, "NUM_SLAVES": 5, "ENDPOINT_URL": "http://127.0.0.1:9",
                "SPOT_FALLBACK": "on-demand"}
    del previous["MAX_BID"]
    config, kept, replaced = keep_user_edits(FRESH, previous, WRITTEN)
    assert config == {"ENDPOINT_URL": "http://127.0.0.1:2", "AMI": "ami-2", "NUM_SLAVES": 5,
                      "STATE_DIR": "/s/state", "SPOT_FALLBACK": "on-demand"}
    assert kept == {"MAX_BID": None, "NUM_SLAVES": 5, "SPOT_FALLBACK": "on-demand"}
    assert replaced == ["ENDPOINT_URL"]


def test_an_unedited_config_is_simply_the_fresh_one():
    assert keep_user_edits(FRESH, dict(WRITTEN), WRITTEN) == (FRESH, {}, [])
    assert keep_user_edits(FRESH, None, None) == (FRESH, {}, [])


def test_without_a_record_every_difference_from_the_fresh_config_is_kept_and_reported():
    config, kept, replaced = keep_user_edits(FRESH, {**WRITTEN, "NUM_SLAVES": 5}, None)
    assert config["NUM_SLAVES"] == 5 and kept == {"NUM_SLAVES": 5}
    assert config["ENDPOINT_URL"] == FRESH["ENDPOINT_URL"]
    assert replaced == ["AMI", "ENDPOINT_URL"]
    assert set(replaced) <= set(WIRING_KEYS)


# ------------------------------------------------------------------ the real command
needs_nodes = pytest.mark.skipif(not NodeFarm.available()[0],
                                 reason=f"the sandbox needs real SSH nodes: "
                                        f"{NodeFarm.available()[1]}")


class Running:
    """`disposabledisco sandbox` in the background; its banner is read up to the config."""

    def __init__(self, directory: Path, network: str, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "disposabledisco", "sandbox", "--dir", str(directory),
             "--network", network, "--slaves", "1", *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.banner: list[str] = []
        deadline = time.monotonic() + 60
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"sandbox ended: {self.process.stderr.read()}")
            self.banner.append(line.rstrip("\n"))
            if line.startswith("press Ctrl-C"):
                return
        raise AssertionError(f"no banner in 60 s: {self.banner}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.communicate(timeout=60)
        assert self.process.returncode == 0


@needs_nodes
def test_the_sandbox_banner_names_its_free_24_refuses_a_second_start_and_keeps_edits(
        tmp_path: Path):
    network = unused_network()
    first, second = list(NET(network).subnets(new_prefix=24))[:2]
    config = tmp_path / "sandbox.json"
    with listening(str(first[7])):  # someone else uses the first /24
        sandbox = Running(tmp_path, network)
    try:
        assert f"instance network: {second} (instances get .4, .5, …; the first free /24 " \
               f"of {network})" in sandbox.banner
        assert f"config written to {config}" in sandbox.banner
        written = config.read_text()
        url = json.loads(written)["ENDPOINT_URL"]
        assert f"sandbox EC2 endpoint: {url}" in sandbox.banner

        again = cli("sandbox", "--dir", str(tmp_path), "--network", network)
        assert again.returncode == 1
        assert again.stderr == (f"disposabledisco: a sandbox already runs with {config} (its "
                                f"endpoint {url} answers): stop it first, or pass another "
                                "--dir\n")
        assert config.read_text() == written
    finally:
        sandbox.stop()

    edited = {**json.loads(written), "NUM_SLAVES": 2}
    config.write_text(json.dumps(edited))
    restarted = Running(tmp_path, network)
    try:
        assert ("kept your edits of sandbox.json: NUM_SLAVES=2 (remove the file to start "
                "from the defaults)") in restarted.banner
        now = json.loads(config.read_text())
        assert now["NUM_SLAVES"] == 2
        assert now["ENDPOINT_URL"] != url and f"sandbox EC2 endpoint: {now['ENDPOINT_URL']}" \
            in restarted.banner
        assert f"instance network: {first} (" in "\n".join(restarted.banner)  # free again
    finally:
        restarted.stop()


@needs_nodes
def test_a_node_of_another_farm_makes_its_24_used(tmp_path: Path):
    """Nodes live in their own network namespaces (no socket in ours): their route counts."""
    network = unused_network()
    first, second = list(NET(network).subnets(new_prefix=24))[:2]
    _, public = generate_ed25519_key("other-farm")
    with NodeFarm(authorized_key=public, workdir=tmp_path / "other") as other:
        other.start("i-0other", str(first[100]))  # beyond the sshd probe: the route counts
        sandbox = Sandbox(SandboxOptions(tmp_path / "sandbox", network=network))
        try:
            sandbox.start()
            assert sandbox.subnet == str(second)
        finally:
            sandbox.stop()


@needs_nodes
def test_a_damaged_sandbox_json_is_not_overwritten(tmp_path: Path):
    config = tmp_path / "sandbox.json"
    config.write_text('{"NUM_SLAVES": 2,')
    result = cli("sandbox", "--dir", str(tmp_path), "--network", unused_network())
    assert result.returncode == 1
    assert result.stderr.startswith(f"disposabledisco: {config} is not valid JSON (")
    assert result.stderr.endswith("): fix it or remove it, then start the sandbox again\n")
    assert config.read_text() == '{"NUM_SLAVES": 2,'


def test_a_stale_sandbox_config_says_the_sandbox_is_not_running(tmp_path: Path):
    with listening("127.0.0.1") as port:
        pass  # a port that was just free: nothing answers there now
    config = tmp_path / "sandbox.json"
    values = json.loads((Path(__file__).parent / "configs" / "minimal.json").read_text())
    values.update(ENDPOINT_URL=f"http://127.0.0.1:{port}", REGION="us-east-1",
                  AWS_ACCESS="testing", AWS_SECRET="testing", STATE_DIR=str(tmp_path / "state"))
    config.write_text(json.dumps(values))
    config.chmod(0o600)
    started = time.monotonic()
    result = cli("status", str(config), timeout=12)  # botocore alone retries for longer
    assert time.monotonic() - started < 10
    assert "Traceback" not in result.stderr
    assert result.returncode != 0
    assert "the sandbox is not running; start it with `python -m disposabledisco sandbox " \
           f"--dir {tmp_path}`" in result.stderr


def test_a_disco_source_that_is_not_a_file_is_refused_before_anything_starts(tmp_path: Path):
    done = cli("sandbox", "--demo", "--dir", str(tmp_path / "sb"),
               "--disco-source", str(tmp_path))
    assert done.returncode == 2
    assert f"--disco-source: '{tmp_path}' is not a file" in done.stderr
    assert not (tmp_path / "sb").exists()  # no key, config or node was made


def vendor_bundle() -> Path:
    """The Disco source bundle (tests/disco_bundle.py); skip when it or root is missing."""
    if os.geteuid() != 0:
        pytest.skip("the Disco demo builds and runs Disco on real SSH nodes: needs root")
    return source_bundle()


@pytest.mark.nodes
@pytest.mark.disco
@needs_nodes
def test_the_disco_demo_counts_words_right_while_a_slave_is_lost(tmp_path: Path):
    """The whole real-Disco story in one command (about 80 s here): built from the bundle,
    converged, a word count checked against a local count, a slave interrupted while the
    job ran, healed, down."""
    bundle = vendor_bundle()
    done = cli("sandbox", "--demo", "--dir", str(tmp_path), "--network", unused_network(),
               "--disco-source", str(bundle), timeout=900)
    out = done.stdout
    said = out + done.stderr
    if done.returncode == 1 and "the word count did not finish within" in said:
        # the known Disco hang after a host leaves mid-job (docs/disco-cluster.md): the
        # demo must still end in one line naming the interrupted slave, never hang itself
        assert "after slave i-" in said and "was interrupted" in said, said
        pytest.xfail("the word count hung after the slave was interrupted (known Disco hang)")
    assert done.returncode == 0, said
    assert json.loads((tmp_path / "sandbox.json").read_text())["DISCO_INSTALL"] == "source"
    # the job went through the printed client line, verbatim up to its `--`
    client = f"disposabledisco exec {tmp_path / 'sandbox.json'} --role master --as disco --"
    assert f"run Disco: {client} disco jobs" in out
    assert f"\n$ {client} bash -c '<push 8 files" in out
    counts = ", ".join(f"{word} 234" for word in
                       sorted(("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog")))
    assert f"word count: {counts}\n" in out
    assert "counts checked: equal to a local count of the input (1872 words" in out
    interrupted = [line for line in out.splitlines()
                   if line.startswith("(the spot market interrupts slave i-")]
    assert len(interrupted) == 1 and interrupted[0].endswith("while the word count runs)"), out
    victim = interrupted[0].split()[5]
    assert f"the job completed although slave {victim} was interrupted while it ran" in out
    heal = out.index("# heal: a new slave replaces")
    assert "[ok] join i-" in out[heal:] and "converged after" in out[heal:]
    # taken down last (the demo says finished only when `down` exited 0)
    down = out.index(f"\n$ disposabledisco down {tmp_path / 'sandbox.json'} --yes")
    assert heal < down < out.index("\nsandbox demo finished")
