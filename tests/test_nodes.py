"""The local node harness: real sshd nodes that are fast, isolated and cleaned up."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from disposabledisco.sandbox import nodes as nodes_module
from disposabledisco.sandbox.nodes import (
    AddressInUse,
    NodeError,
    NodeFarm,
    ec2_hostname,
    port_open,
)
from tests.node_fixtures import free_addresses, next_instance_id

pytestmark = pytest.mark.nodes

REPO = Path(__file__).resolve().parent.parent


def sh(farm: NodeFarm, instance_id: str, script: str, **kwargs: object) -> str:
    return farm.exec(instance_id, ["sh", "-c", script], **kwargs).stdout.decode()  # type: ignore[arg-type]


def ns_pids(farm: NodeFarm, instance_id: str) -> list[int]:
    return [pid for pid, _ in farm._processes(farm.node(instance_id))]


def free_address(subnet: str = "127.10.7") -> str:
    found = free_addresses(1, subnet)
    if not found:
        raise RuntimeError("no free address")
    return found[0]


def machine_links() -> set[str]:
    """Network interfaces of the machine's (the test's) network namespace."""
    return set(os.listdir("/sys/class/net"))


def local_routes() -> str:
    return subprocess.run(["ip", "-o", "route", "show", "table", "local"], check=True,
                          capture_output=True, text=True).stdout


def hub_links(farm: NodeFarm) -> set[str]:
    """Interfaces inside the farm's hub namespace (bridge, uplink end, node veths)."""
    out = subprocess.run(["nsenter", f"--net=/proc/{farm._hub.pid}/ns/net", "ip", "-o",
                          "link"], check=True, capture_output=True, text=True)
    return {line.split(": ")[1].split("@")[0] for line in out.stdout.splitlines()}


def test_ec2_hostname() -> None:
    assert ec2_hostname("127.10.0.4") == "ip-127-10-0-4"


def test_available_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes_module, "_available", None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ok, reason = NodeFarm.available()
    assert not ok and "root" in reason
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    ok, reason = NodeFarm.available(sshd_path="/nonexistent/sshd")
    assert not ok and "openssh-server" in reason


def test_node_starts_fast_and_listens(node_farm: NodeFarm, start_nodes) -> None:
    (node,) = start_nodes(1)
    assert node.startup_seconds < 1.0, node.startup_seconds
    assert port_open(node.address)
    assert node.hostname == ec2_hostname(node.address)
    assert node.startup_seconds in node_farm.startup_times


def test_node_looks_like_an_ec2_ubuntu_image(node_farm: NodeFarm, start_nodes) -> None:
    (node,) = start_nodes(1)
    iid = node.instance_id
    assert sh(node_farm, iid, "hostname").strip() == node.hostname
    assert sh(node_farm, iid, f"getent hosts {node.hostname}").split()[0] == node.address
    # the login user: passwordless sudo, bash, python3, the authorized key
    out = node_farm.exec(iid, ["sh", "-c", "sudo -n id -u; command -v bash; command -v python3"],
                         user="ubuntu").stdout.decode().split()
    assert out[0] == "0"
    assert out[1].endswith("/bash") and out[2].endswith("/python3")
    keys = sh(node_farm, iid, "cat /home/ubuntu/.ssh/authorized_keys")
    assert keys.strip() == node_farm.authorized_key
    # its own host key, none of the machine's
    assert sh(node_farm, iid, "ls /etc/ssh/ | grep host_ | sort").split() == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    pub = sh(node_farm, iid, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[:2]
    assert " ".join(pub) == node_farm.host_public_key(iid)
    # nothing of the machine's /tmp (client keys, other nodes' files) is visible
    assert sh(node_farm, iid, "ls -A /tmp") == ""
    # only the node's own processes (its PID namespace)
    assert len(sh(node_farm, iid, "ps -e -o pid=").split()) < 10


def test_offline_tweaks(node_farm: NodeFarm, start_nodes) -> None:
    (node,) = start_nodes(1)
    iid = node.instance_id
    assert sh(node_farm, iid, "cat /etc/resolv.conf").strip() == "nameserver 127.0.0.1"
    assert sh(node_farm, iid, "ls /var/lib/apt/lists").split() == ["partial"]
    assert 'Acquire::Retries "0";' in sh(node_farm, iid, "cat /etc/apt/apt.conf.d/*")
    assert "retries = 0" in sh(node_farm, iid, "cat /etc/pip.conf")
    assert sh(node_farm, iid, "ls /root/.config/pip 2>/dev/null || true").strip() == ""
    started = time.monotonic()
    done = node_farm.exec(iid, ["apt-get", "install", "-y", "no-such-package-xyz"],
                          check=False)
    assert done.returncode != 0
    assert time.monotonic() - started < 10
    # non-interactive shells do not pay for a slow ~/.bashrc
    assert "return" in sh(node_farm, iid, "cat /root/.bashrc")


def test_nodes_are_isolated_from_the_machine_and_each_other(
    node_farm: NodeFarm, start_nodes
) -> None:
    a, b = start_nodes(2)
    machine_hosts = Path("/etc/hosts").read_bytes()
    b_hosts = sh(node_farm, b.instance_id, "cat /etc/hosts")
    sh(node_farm, a.instance_id,
       "echo '10.9.9.9 injected-by-test' >> /etc/hosts"
       " && mkdir -p /opt/dd-test && echo installed > /opt/dd-test/marker"
       " && echo tmp > /tmp/marker && useradd -m disco-test")
    assert "injected-by-test" in sh(node_farm, a.instance_id, "cat /etc/hosts")
    assert sh(node_farm, a.instance_id, "cat /opt/dd-test/marker").strip() == "installed"
    # the machine is untouched
    assert Path("/etc/hosts").read_bytes() == machine_hosts
    assert not Path("/opt/dd-test").exists()
    assert "disco-test" not in Path("/etc/passwd").read_text()
    # and so is the other node
    assert sh(node_farm, b.instance_id, "cat /etc/hosts") == b_hosts
    assert sh(node_farm, b.instance_id, "ls /opt/dd-test 2>&1 || true").count("No such") == 1
    assert sh(node_farm, b.instance_id, "id disco-test 2>&1 || true").count("no such") == 1
    assert sh(node_farm, b.instance_id, "hostname").strip() == b.hostname
    assert os.uname().nodename not in (a.hostname, b.hostname)


def test_stop_kills_every_process_and_frees_the_address(node_farm: NodeFarm) -> None:
    address = free_address()
    iid = next_instance_id()
    node = node_farm.start(iid, address)
    # a daemon started inside the node must die with it
    sh(node_farm, iid, "setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
    pids = ns_pids(node_farm, iid)
    assert len(pids) >= 4  # init, sshd, init's sleep, the daemon
    namespace = nodes_module._pid_ns(node.init_pid)
    assert node_farm.stop(iid) is True
    assert not node.alive
    assert not any(nodes_module._pid_ns(pid) == namespace for pid in pids)
    assert not port_open(address)
    assert not (node.workdir / "ns").exists()
    assert node_farm.stop(iid) is False
    # the address can be used again at once
    again = node_farm.start(next_instance_id(), address)
    assert port_open(address)
    node_farm.stop(again.instance_id)


def test_kill_and_restart_sshd_keep_the_node(node_farm: NodeFarm, start_nodes) -> None:
    (node,) = start_nodes(1)
    iid = node.instance_id
    sh(node_farm, iid, "echo kept > /root/state")
    killed = node_farm.kill_sshd(iid)
    assert killed
    assert not port_open(node.address)
    assert node.alive
    assert sh(node_farm, iid, "cat /root/state").strip() == "kept"
    node_farm.restart_sshd(iid)
    assert port_open(node.address)
    assert sh(node_farm, iid, "cat /root/state").strip() == "kept"


def test_replace_host_key(node_farm: NodeFarm, start_nodes) -> None:
    (node,) = start_nodes(1)
    old = node_farm.host_public_key(node.instance_id)
    new = node_farm.replace_host_key(node.instance_id)
    assert new != old and new.startswith("ssh-ed25519 ")
    on_disk = sh(node_farm, node.instance_id, "cat /etc/ssh/ssh_host_ed25519_key.pub")
    assert " ".join(on_disk.split()[:2]) == new
    assert port_open(node.address)


def test_start_errors_are_clear(node_farm: NodeFarm, start_nodes) -> None:
    (node,) = start_nodes(1)
    with pytest.raises(NodeError, match="already used by node"):
        node_farm.start(next_instance_id(), node.address)
    with pytest.raises(NodeError, match="loopback"):
        node_farm.start(next_instance_id(), "10.0.0.4")
    with pytest.raises(NodeError, match="safe name"):
        node_farm.start("../etc", "127.10.7.200")
    # the subnet's .1 is the machine's end of the node network; 127.0.0.1 is the machine's
    with pytest.raises(NodeError, match=r"gateway \(\.1\).* of 127\.10\.7\.0/24"):
        node_farm.start(next_instance_id(), "127.10.7.1")
    with pytest.raises(NodeError, match="machine's own loopback"):
        node_farm.start(next_instance_id(), "127.0.0.9")
    # the same launch reported twice is not an error
    assert node_farm.start(node.instance_id, node.address) is node


def test_address_taken_by_another_process(node_farm: NodeFarm) -> None:
    address = free_address()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((address, 22))
        squatter.listen()
        started = time.monotonic()
        with pytest.raises(AddressInUse, match="Address already in use"):
            node_farm.start(next_instance_id(), address)
        assert time.monotonic() - started < 2
    assert all(n.address != address for n in node_farm.nodes.values())


def test_market_callbacks_and_sync(node_farm: NodeFarm) -> None:
    a, b, c = (free_address("127.10.8"), None, None)
    ia, ib, ic, id_ = next_instance_id(), next_instance_id(), "", ""
    try:
        node_farm.on_launch(ia, a)
        node_farm.on_launch(ia, a)  # repeated callback: no-op
        assert port_open(a)
        assert node_farm.node(ia).hostname == ec2_hostname(a)
        node_farm.on_terminate(ia)
        node_farm.on_terminate(ia)  # repeated: no-op
        assert not port_open(a)
        b = a
        c = free_address("127.10.9")
        started, stopped = node_farm.sync([(ia, b, "running"), (ib, c, "pending")])
        assert started == [ia] and stopped == []
        started, stopped = node_farm.sync([(ia, b, "terminated"), (ib, c, "running")])
        assert started == [ib] and stopped == [ia]
        assert not port_open(b) and port_open(c)
        # one instance that cannot start does not keep the others from starting
        ic, id_ = next_instance_id(), next_instance_id()
        taken, free = free_address("127.10.10"), free_address("127.10.11")
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind((taken, 22))
            squatter.listen()
            with pytest.raises(NodeError, match=f"1 of 2 nodes did not start: {ic}"):
                node_farm.sync([(ic, taken, "running"), (id_, free, "running")])
        assert id_ in node_farm.nodes and ic not in node_farm.nodes
        assert node_farm.sync([(ic, taken, "running")]) == ([ic], [])
    finally:
        for iid in (ia, ib, ic, id_):
            node_farm.stop(iid)


def test_fifty_nodes_start_together(node_farm: NodeFarm) -> None:
    addresses = free_addresses(50, "127.10.5")
    started = time.monotonic()
    nodes = node_farm.start_many((next_instance_id(), a) for a in addresses)
    took = time.monotonic() - started
    try:
        assert len(nodes) == 50
        assert all(port_open(n.address) for n in nodes)
        print(f"\n50 nodes started in {took:.2f} s "
              f"(slowest node {max(n.startup_seconds for n in nodes):.2f} s)")
        assert took < 20
    finally:
        stop_started = time.monotonic()
        for node in nodes:
            node_farm.stop(node.instance_id)
        print(f"50 nodes stopped in {time.monotonic() - stop_started:.2f} s")
    assert not any(port_open(n.address) for n in nodes)


def test_nodes_die_with_their_owner_process(client_key, tmp_path: Path) -> None:
    """Even a SIGKILLed test process leaves no sshd behind (parent-death signal)."""
    if not NodeFarm.available()[0]:
        pytest.skip(NodeFarm.available()[1])
    address = free_address("127.10.6")
    code = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(REPO)!r})
        from disposabledisco.sandbox.nodes import NodeFarm
        farm = NodeFarm({client_key.public!r}, workdir={str(tmp_path / "farm")!r})
        # started from a short-lived thread, like an HTTP handler calling on_launch
        t = threading.Thread(target=farm.on_launch, args=("i-orphan", {address!r}))
        t.start(); t.join()
        print(farm.node("i-orphan").init_pid, farm._hub.pid, farm._hub.uplink, flush=True)
        threading.Event().wait()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        init_pid, hub_pid, uplink = child.stdout.readline().split()
        assert port_open(address)
        assert uplink in machine_links() and address in local_routes()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    # the node, the hub and with them the bridge, the veths, the uplink and the routes
    while (port_open(address) or Path(f"/proc/{init_pid}").exists()
           or Path(f"/proc/{hub_pid}").exists() or uplink in machine_links()
           or address in local_routes()):
        assert time.monotonic() < deadline, "the node or its network outlived its owner"
        time.sleep(0.05)


def test_stale_farm_directories_are_reaped() -> None:
    """A farm directory whose owner died is removed by the next farm; live ones stay."""
    import tempfile

    stale = Path(tempfile.mkdtemp(prefix="disposabledisco-nodes-"))
    (stale / "owner").write_text("999999999 1\n")
    (stale / "i-1").mkdir()
    with NodeFarm("ssh-ed25519 AAAA unused") as farm:
        assert not stale.exists()
        assert farm.workdir.exists()
        with NodeFarm("ssh-ed25519 AAAA unused") as other:
            assert farm.workdir.exists() and other.workdir.exists()
    assert not farm.workdir.exists()


# ---------------------------------------------------------------- one network per node
ERL_PING = ("Ping = fun Loop(_, 0) -> pang; Loop(N, K) -> case net_adm:ping(N) of "
            "pong -> pong; pang -> timer:sleep(200), Loop(N, K - 1) end end, "
            "io:format(\"~p~n\", [Ping(list_to_atom(hd(init:get_plain_arguments())), 50)]), "
            "halt().")


def test_each_node_has_its_own_network(node_farm: NodeFarm, start_nodes) -> None:
    """Own loopback, port space and epmd per node, the address on eth0, reachable from
    the machine and from each other: what two Disco hosts need."""
    a, b = start_nodes(2)
    for node in (a, b):
        addresses = sh(node_farm, node.instance_id, "ip -o -4 addr show | awk '{print $2, $4}'")
        assert addresses.split("\n")[:2] == ["lo 127.0.0.1/8", f"eth0 {node.address}/24"]
        # Erlang takes the first name of the address line: the node's own short name
        line = sh(node_farm, node.instance_id, f"grep '^{node.address} ' /etc/hosts")
        assert line.split() == [node.address, node.hostname]
    # a server on 0.0.0.0 of one node answers at that node only, from anywhere
    port = 8989
    sh(node_farm, a.instance_id, f"setsid python3 -m http.server {port} --bind 0.0.0.0"
                                 " </dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + 10
    while not port_open(a.address, port):
        assert time.monotonic() < deadline, "the server in node a never listened"
        time.sleep(0.05)
    assert not port_open(b.address, port) and not port_open("127.0.0.1", port, timeout=0.5)
    probe = ("import socket, sys\nfor port in sys.argv[2:]:\n"
             "    try:\n        socket.create_connection((sys.argv[1], int(port)), 2).close()"
             "; print(port, 'open')\n"
             "    except OSError as e:\n        print(port, type(e).__name__)\n")
    seen = sh(node_farm, b.instance_id, f"python3 -c {shlex.quote(probe)} {a.address} 22 {port}")
    assert seen.split() == ["22", "open", str(port), "open"]
    seen = sh(node_farm, a.instance_id, f"python3 -c {shlex.quote(probe)} {b.address} {port}")
    assert seen.split() == [str(port), "ConnectionRefusedError"]
    # the same Erlang node name on both (one epmd each), and they ping each other
    if shutil.which("erl") is None:
        return
    for node in (a, b):
        sh(node_farm, node.instance_id, f"HOME=/root erl -name same@{node.address} "
                                         "-setcookie ddtest -detached -noshell")
    pinged = sh(node_farm, a.instance_id,
                f"HOME=/root erl -name probe@{a.address} -setcookie ddtest -noshell "
                f"-eval {shlex.quote(ERL_PING)} -extra same@{b.address}", timeout=60)
    assert pinged.strip() == "pong"
    for node in (a, b):
        assert "name same at port" in sh(node_farm, node.instance_id, "epmd -names")


def test_network_of_makes_sockets_the_node_reaches(node_farm: NodeFarm, start_nodes) -> None:
    """A test double made inside network_of() listens in the node's network (at the
    node's own address and its localhost), not on the machine."""
    (node,) = start_nodes(1)
    with node_farm.network_of(node.instance_id):
        inside = socket.create_server((node.address, 0))
        local = socket.create_server(("127.0.0.1", 0))
    outside = socket.create_server(("127.0.0.1", 0))  # back in the machine's network
    with inside, local, outside:
        port, local_port = inside.getsockname()[1], local.getsockname()[1]
        listening = sh(node_farm, node.instance_id, "ss -Hltn | awk '{print $4}'").split()
        assert {f"{node.address}:{port}", f"127.0.0.1:{local_port}"} <= set(listening)
        assert node.address not in nodes_module._listeners(port)
        reach = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)"
        for address, number in ((node.address, port), ("127.0.0.1", local_port)):
            node_farm.exec(node.instance_id, ["python3", "-c", reach, address, str(number)])
        done = node_farm.exec(node.instance_id, ["python3", "-c", reach, "127.0.0.1",
                                                 str(outside.getsockname()[1])], check=False)
        assert done.returncode != 0 and b"ConnectionRefusedError" in done.stderr


def test_stop_and_close_remove_routes_veths_bridge_and_uplink(client_key) -> None:
    addresses = free_addresses(2, "127.10.12")
    with NodeFarm(client_key.public) as farm:
        a, b = farm.start_many((next_instance_id(), address) for address in addresses)
        hub = farm._hub
        assert hub is not None and hub.uplink in machine_links()
        assert hub_links(farm) == {"lo", "ddbr", "ddup", a.link, b.link}
        routes = local_routes()
        for node in (a, b):
            assert f"{node.address} dev {hub.uplink} scope link src " in routes
        farm.stop(a.instance_id)
        assert hub_links(farm) == {"lo", "ddbr", "ddup", b.link}
        assert a.address not in local_routes() and b.address in local_routes()
    assert hub.uplink not in machine_links()
    assert b.address not in local_routes()
    assert hub.proc.poll() is not None and not Path(f"/proc/{hub.pid}").exists()


def test_a_leftover_uplink_is_reaped_by_the_next_farm() -> None:
    """An uplink whose hub is gone (its namespace pinned by something else when the owner
    was killed) is deleted when the next farm starts; a live farm's uplink stays."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    stale = f"ddh{pid_max + 1:x}"  # no process can have this pid
    subprocess.run(["ip", "link", "add", stale, "type", "veth", "peer", "name", "ddtestpeer"],
                   check=True)
    try:
        with NodeFarm("ssh-ed25519 AAAA unused") as live:
            live.start(next_instance_id(), free_address("127.10.14"))
            uplink = live._hub.uplink
            assert stale not in machine_links() and "ddtestpeer" not in machine_links()
            with NodeFarm("ssh-ed25519 AAAA unused"):
                assert uplink in machine_links()
    finally:
        subprocess.run(["ip", "link", "del", stale], check=False, capture_output=True)
