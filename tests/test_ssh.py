"""The SSH gateway and host key logic, against real local sshd nodes where it matters."""

from __future__ import annotations

import ast
import base64
import hashlib
import threading
import time
from pathlib import Path

import pytest

from disposabledisco import hostkeys
from disposabledisco.hostkeys import (
    HostKey,
    HostKeyChanged,
    HostKeyNotInConsole,
    HostKeyPending,
    HostKeyStore,
    HostKeyVerifier,
    parse_console_output,
)
from disposabledisco.sandbox.nodes import NodeFarm, generate_ed25519_key
from disposabledisco.ssh import (
    AuthenticationFailed,
    CommandFailed,
    CommandTimeout,
    GivenUp,
    HostKeyMismatch,
    HostKeyUnverified,
    SshError,
    SshGateway,
    SshSettings,
    Target,
    Unreachable,
    fault_of,
)
from tests.node_fixtures import free_addresses, next_instance_id

PACKAGE = Path(__file__).resolve().parent.parent / "disposabledisco"


def key_of(public_line: str) -> HostKey:
    return HostKey.from_line(public_line)


def target(node) -> Target:  # noqa: ANN001 - a sandbox Node
    return Target(node.instance_id, node.address, node.hostname)


def free_address(subnet: str = "127.10.7") -> str:
    """An address of `subnet` that no node of any farm here has and nothing listens on."""
    addresses = free_addresses(1, subnet)
    if not addresses:
        raise RuntimeError(f"no free address left in {subnet}.0/24")
    return addresses[0]


def console_text(*, fingerprints: list[str] = (), keys: list[str] = ()) -> str:  # type: ignore[assignment]
    """Console output shaped like cloud-init's on Ubuntu."""
    lines = ["[   10.1] cloud-init[800]: Cloud-init v. 23.1 running 'modules:final'",
             "<14>Mar  1 10:00:00 ec2: ", "<14>Mar  1 10:00:00 ec2: " + "#" * 50,
             "-----BEGIN SSH HOST KEY FINGERPRINTS-----"]
    lines += [f"<14>Mar  1 10:00:00 ec2: 256 {fp} root@ip-10-0-0-4 (ED25519)"
              for fp in fingerprints]
    lines += ["-----END SSH HOST KEY FINGERPRINTS-----", "#" * 50,
              "-----BEGIN SSH HOST KEY KEYS-----"]
    lines += [f"{k} root@ip-10-0-0-4" for k in keys]
    lines += ["-----END SSH HOST KEY KEYS-----", "ubuntu login:"]
    return "\r\n".join(lines)


# ---------------------------------------------------------------- pure host key logic
def test_only_the_gateway_imports_paramiko() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom)}
        if path.name != "ssh.py":
            assert "paramiko" not in names, path
        source = path.read_text()
        assert "AutoAddPolicy" not in source and "WarningPolicy" not in source, path
        assert "StrictHostKeyChecking=no" not in source, path


def test_host_key_fingerprint_matches_openssh() -> None:
    _, public = generate_ed25519_key()
    key = key_of(public)
    blob = base64.b64decode(public.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert key.fingerprint == expected
    assert key.keytype == "ssh-ed25519"
    assert HostKey.from_blob(blob) == key
    assert key.line() == public
    with pytest.raises(ValueError):
        HostKey.from_line("ssh-rsa " + public.split()[1])  # type does not match the blob


def test_parse_console_output() -> None:
    _, a = generate_ed25519_key()
    _, b = generate_ed25519_key()
    text = console_text(fingerprints=[key_of(a).fingerprint, "aa:" * 15 + "bb"], keys=[b])
    found = parse_console_output(text)
    assert found.accepts(key_of(a)) and found.accepts(key_of(b))
    _, c = generate_ed25519_key()
    assert not found.accepts(key_of(c))
    assert "aa:" * 15 + "bb" in found.fingerprints
    assert parse_console_output(None).empty
    assert parse_console_output("booting...\n").empty
    # a block still being written does not count
    half = "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 " + key_of(c).fingerprint
    assert parse_console_output(half).empty
    # bytes are fine, fingerprints outside the blocks are ignored
    outside = f"256 {key_of(c).fingerprint} mallory\n".encode()
    assert parse_console_output(outside + text.encode()).accepts(key_of(a))
    assert not parse_console_output(outside + text.encode()).accepts(key_of(c))


def test_pin_store(tmp_path: Path) -> None:
    store = HostKeyStore(tmp_path)
    _, a = generate_ed25519_key()
    _, b = generate_ed25519_key()
    assert store.get("i-1") is None
    assert store.pin("i-1", key_of(a)) == key_of(a)
    assert store.pin("i-1", key_of(b)) == key_of(a)  # first writer wins
    assert (tmp_path / "hostkeys" / "i-1").read_text() == a + "\n"
    store.pin("i-2", key_of(b))
    assert store.pinned(["i-1", "i-2", "i-3"]) == {"i-1": key_of(a), "i-2": key_of(b)}
    text = store.known_hosts({"i-1": ["node1", "10.0.0.4"], "i-2": ["node2"],
                              "i-3": ["node3"]})
    assert text.splitlines() == sorted([f"node1,10.0.0.4 {a}", f"node2 {b}"])
    assert store.forget("i-1") and not store.forget("i-1")
    assert store.get("i-1") is None
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_verifier_policies(tmp_path: Path) -> None:
    _, a = generate_ed25519_key()
    _, b = generate_ed25519_key()
    pin = HostKeyVerifier("pin", HostKeyStore(tmp_path / "p"))
    assert pin.verify("i-1", "10.0.0.4", key_of(a)) == "new"
    assert pin.verify("i-1", "10.0.0.4", key_of(a)) == "pinned"
    with pytest.raises(HostKeyChanged) as err:
        pin.verify("i-1", "10.0.0.4", key_of(b))
    assert "i-1" in str(err.value) and "forget" in str(err.value)
    assert str(tmp_path / "p" / "hostkeys" / "i-1") in str(err.value)
    # the same address under a new instance id is a new host
    assert pin.verify("i-2", "10.0.0.4", key_of(b)) == "new"

    console: dict[str, str | None] = {"i-1": None}
    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path / "c"), console.get)
    with pytest.raises(HostKeyPending) as pending:
        verifier.verify("i-1", "10.0.0.4", key_of(a))
    assert pending.value.retryable
    console["i-1"] = console_text(fingerprints=[key_of(b).fingerprint])
    with pytest.raises(HostKeyNotInConsole):
        verifier.verify("i-1", "10.0.0.4", key_of(a))
    console["i-1"] = console_text(fingerprints=[key_of(a).fingerprint])
    assert verifier.verify("i-1", "10.0.0.4", key_of(a)) == "console"
    console["i-1"] = None  # pinned now: no console lookup needed
    assert verifier.verify("i-1", "10.0.0.4", key_of(a)) == "pinned"

    insecure = HostKeyVerifier("insecure", HostKeyStore(tmp_path / "i"))
    assert insecure.verify("i-1", "10.0.0.4", key_of(a)) == "insecure"
    assert insecure.verify("i-1", "10.0.0.4", key_of(b)) == "insecure"
    assert insecure.store.get("i-1") == key_of(b)  # latest key kept for known_hosts

    with pytest.raises(ValueError, match="HOST_KEY_POLICY"):
        HostKeyVerifier("yolo", HostKeyStore(tmp_path))
    with pytest.raises(ValueError, match="console output"):
        HostKeyVerifier("console", HostKeyStore(tmp_path))


def test_console_lookup_failure_is_retryable(tmp_path: Path) -> None:
    def broken(instance_id: str) -> str:
        raise RuntimeError("UnauthorizedOperation: not allowed")

    verifier = HostKeyVerifier("console", HostKeyStore(tmp_path), broken)
    _, a = generate_ed25519_key()
    with pytest.raises(HostKeyPending, match="UnauthorizedOperation"):
        verifier.verify("i-1", "10.0.0.4", key_of(a))
    assert hostkeys.HostKeyPending.retryable


# ---------------------------------------------------------------- against real nodes
nodes = pytest.mark.nodes


@nodes
def test_connect_and_run(node_farm: NodeFarm, start_nodes, ssh_gateway_factory) -> None:
    (node,) = start_nodes(1)
    gateway: SshGateway = ssh_gateway_factory()
    with gateway.connect(target(node)) as session:
        assert session.run("hostname").stdout.strip() == node.hostname
        assert session.run("id -u", sudo=True).stdout.strip() == "0"
        assert session.run("echo a; echo b >&2; exit 4", check=False).status == 4
        with pytest.raises(CommandFailed) as failed:
            session.run("echo first >&2; echo 'it broke' >&2; exit 3")
        assert failed.value.status == 3
        message = str(failed.value)
        assert message.startswith(f"{node.instance_id} ({node.address}):")
        assert "status 3" in message and "it broke" in message and "\n" not in message
        assert session.run("cd && pwd").stdout.strip() == "/home/ubuntu"
    assert gateway.sessions_opened == 1
    assert gateway.commands_run == 5
    log = gateway.log_path(node.instance_id).read_text()
    assert "$ hostname" in log and "exit 3" in log and "it broke" in log


@nodes
def test_script_via_stdin_runs_exactly_as_written(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    (node,) = start_nodes(1)
    gateway = ssh_gateway_factory()
    script = (
        "set -eu\n"
        "x='single \"double\" $HOME `not run` $(not run either) \\n'\n"
        "printf '%s\\n' \"$x\"\n"
        "printf '[%s]\\n' \"$@\"\n"
        "echo \"user=$(id -un)\"\n"
    )
    args = ["two words", "it's", "$HOME", "`id`"]
    with gateway.connect(target(node)) as session:
        out = session.script(script, *args).stdout
        assert out.splitlines() == [
            "single \"double\" $HOME `not run` $(not run either) \\n",
            "[two words]", "[it's]", "[$HOME]", "[`id`]", "user=ubuntu"]
        assert session.script(script, sudo=True).stdout.splitlines()[-1] == "user=root"
        # stdin given as str to run() works the same
        assert session.run("cat", stdin="a'b\"c$d").stdout == "a'b\"c$d"
        big = b"x" * (3 * 1024 * 1024)
        assert session.run("wc -c", stdin=big).stdout.strip() == str(len(big))
    log = gateway.log_path(node.instance_id).read_text()
    assert "bash -s --" in log and "printf '[%s]" not in log  # the script is not logged


@nodes
def test_write_file_is_atomic_with_modes_and_owners(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    (node,) = start_nodes(1)
    iid = node.instance_id
    gateway = ssh_gateway_factory()

    def stat(path: str) -> str:
        return node_farm.exec(iid, ["stat", "-c", "%a %U %G", path]).stdout.decode().strip()

    def cat(path: str) -> bytes:
        return node_farm.exec(iid, ["cat", path]).stdout

    with gateway.connect(target(node)) as session:
        session.write_file("/home/ubuntu/plain.txt", b"one\n", 0o600)
        assert cat("/home/ubuntu/plain.txt") == b"one\n"
        assert stat("/home/ubuntu/plain.txt") == "600 ubuntu ubuntu"
        session.write_file("/home/ubuntu/plain.txt", "two\n", 0o640)  # replaces
        assert cat("/home/ubuntu/plain.txt") == b"two\n"
        assert stat("/home/ubuntu/plain.txt") == "640 ubuntu ubuntu"

        session.write_file("/etc/disposabledisco.conf", b"root file\n", 0o644, sudo=True)
        assert stat("/etc/disposabledisco.conf") == "644 root root"
        session.write_file("/etc/hosts", b"127.0.0.1 localhost\n", 0o644, sudo=True)
        assert cat("/etc/hosts") == b"127.0.0.1 localhost\n"
        session.write_file("/etc/owned by ubuntu", b"\x00\xffbinary", 0o400, owner="ubuntu")
        assert stat("/etc/owned by ubuntu") == "400 ubuntu ubuntu"
        assert cat("/etc/owned by ubuntu") == b"\x00\xffbinary"
        session.write_file("/etc/grouped", b"g", 0o640, owner="root:ubuntu")
        assert stat("/etc/grouped") == "640 root ubuntu"

        # a destination that cannot be written fails clearly and leaves no temp file
        with pytest.raises(CommandFailed) as failed:
            session.write_file("/etc/nope.conf", b"x", 0o644)
        assert str(failed.value) == (f"{node.instance_id} ({node.address}): cannot write "
                                     "/etc/nope.conf: permission denied")
        with pytest.raises(CommandFailed):
            session.write_file("/no/such/dir/file", b"x", 0o644, sudo=True)
    leftovers = node_farm.exec(iid, ["sh", "-c", "ls -A /etc /home/ubuntu | grep ddtmp || true"])
    assert leftovers.stdout == b""


@nodes
def test_atomic_replace_is_never_seen_partial(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    (node,) = start_nodes(1)
    gateway = ssh_gateway_factory()
    a, b = b"A" * 200_000, b"B" * 200_000
    with gateway.connect(target(node)) as session:
        session.write_file("/etc/flip", a, 0o644, sudo=True)
        reader = node_farm.exec  # a reader loop inside the node while we rewrite
        stop = threading.Event()
        seen: set[int] = set()

        def read_loop() -> None:
            while not stop.is_set():
                data = reader(node.instance_id, ["cat", "/etc/flip"]).stdout
                seen.add(len(set(data)) if data else 0)
                if len(data) != 200_000 or len(set(data)) != 1:
                    seen.add(-1)

        thread = threading.Thread(target=read_loop)
        thread.start()
        try:
            for i in range(6):
                session.write_file("/etc/flip", b if i % 2 == 0 else a, 0o644, sudo=True)
        finally:
            stop.set()
            thread.join()
    assert -1 not in seen


@nodes
def test_read_file_and_secrets_stay_out_of_the_log(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    (node,) = start_nodes(1)
    gateway = ssh_gateway_factory()
    cookie = "COOKIE" + "x7Qz" * 8
    with gateway.connect(target(node)) as session:
        session.write_file("/root/.erlang.cookie", cookie, 0o400, sudo=True)
        assert session.read_file("/root/.erlang.cookie", sudo=True, secret=True) == \
            cookie.encode()
        with pytest.raises(CommandFailed):
            session.read_file("/root/.erlang.cookie")  # not readable as ubuntu
        session.write_file("/home/ubuntu/mine", b"data", 0o600)
        assert session.read_file("/home/ubuntu/mine") == b"data"
        assert session.run("cat /root/.erlang.cookie", sudo=True, secret=True).stdout == cookie
        # files read through sudo are not copied into the log either
        session.write_file("/etc/plain.txt", b"public-content-xyz", 0o600, sudo=True)
        assert session.read_file("/etc/plain.txt", sudo=True) == b"public-content-xyz"
        # binary stdin goes through sudo untouched
        blob = bytes(range(256)) * 64
        assert session.run("cat", stdin=blob, sudo=True).raw_stdout == blob
        # a registered secret is redacted wherever it would show
        gateway.redact(cookie)
        session.run(f"echo {cookie} >&2")
        with pytest.raises(CommandFailed) as failed:
            session.run(f"echo {cookie} >&2; exit 1")
        assert cookie not in str(failed.value)
    log = gateway.log_path(node.instance_id).read_text()
    assert cookie not in log and "public-content-xyz" not in log
    assert "output withheld" in log and "***" in log
    assert cookie not in "\n".join(gateway.tail(node.instance_id, 100))


@nodes
def test_pinned_key_recorded_then_changed_key_refused(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory, tmp_path: Path
) -> None:
    (node,) = start_nodes(1)
    gateway = ssh_gateway_factory(deadline_seconds=10)
    with gateway.connect(target(node)):
        pass
    store = HostKeyStore(tmp_path / "state")
    assert store.get(node.instance_id) == key_of(node_farm.host_public_key(node.instance_id))
    with gateway.connect(target(node)) as session:  # same key: fine
        session.run("true")

    node_farm.replace_host_key(node.instance_id)
    started = time.monotonic()
    with pytest.raises(HostKeyMismatch) as err:
        gateway.connect(target(node))
    assert time.monotonic() - started < 5  # refused at once, not retried to the deadline
    message = str(err.value)
    assert message.startswith(f"{node.instance_id} ({node.address}): host key changed")
    assert str(store.path(node.instance_id)) in message and "\n" not in message
    assert "REFUSED" in "\n".join(gateway.tail(node.instance_id, 5))

    store.forget(node.instance_id)  # the instance was really rebuilt
    with gateway.connect(target(node)):
        pass
    assert store.get(node.instance_id) == key_of(node_farm.host_public_key(node.instance_id))


@nodes
def test_address_reused_by_a_new_instance_is_fine(
    node_farm: NodeFarm, ssh_gateway_factory, tmp_path: Path
) -> None:
    address = free_address()
    gateway = ssh_gateway_factory()
    old = node_farm.start(next_instance_id(), address)
    old_key = node_farm.host_public_key(old.instance_id)
    with gateway.connect(target(old)):
        pass
    node_farm.stop(old.instance_id)
    new = node_farm.start(next_instance_id(), address)
    try:
        assert node_farm.host_public_key(new.instance_id) != old_key
        with gateway.connect(target(new)) as session:
            assert session.run("hostname").stdout.strip() == new.hostname
        # but the old instance id at that address is refused (its key is pinned)
        with pytest.raises(HostKeyMismatch):
            gateway.connect(Target(old.instance_id, address))
    finally:
        node_farm.stop(new.instance_id)
    store = HostKeyStore(tmp_path / "state")
    assert store.get(old.instance_id) == key_of(old_key)


@nodes
def test_console_policy_waits_for_the_fingerprint(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory, tmp_path: Path
) -> None:
    a, b = start_nodes(2)
    calls: dict[str, int] = {}

    def console_output(instance_id: str) -> str | None:
        calls[instance_id] = calls.get(instance_id, 0) + 1
        if instance_id == b.instance_id:
            return None  # never shows keys
        if calls[instance_id] < 3:
            return "booting...\n"  # not yet
        fp = key_of(node_farm.host_public_key(instance_id)).fingerprint
        return console_text(fingerprints=[fp])

    gateway = ssh_gateway_factory("console", console_output, deadline_seconds=2.5,
                                  backoff_initial=0.05)
    with gateway.connect(target(a)) as session:
        assert session.run("true").ok
    assert calls[a.instance_id] == 3
    started = time.monotonic()
    with pytest.raises(HostKeyUnverified) as err:
        gateway.connect(target(b))
    assert 2.0 < time.monotonic() - started < 5
    assert calls[b.instance_id] > 2
    assert b.instance_id in str(err.value) and "console output" in str(err.value)

    # the farm can play EC2's console for its nodes
    farm_console = ssh_gateway_factory("console", node_farm.console_output,
                                       state_dir=tmp_path / "other-state")
    with farm_console.connect(target(b)) as session:
        assert session.run("true").ok
    assert node_farm.console_output("i-none") == ""

    # a console that names another key is a refusal, at once
    _, other = generate_ed25519_key()

    def lying(instance_id: str) -> str:
        return console_text(keys=[other])

    liar = ssh_gateway_factory("console", lying)
    with pytest.raises(HostKeyMismatch, match="not among the host keys"):
        liar.connect(target(b))


@nodes
def test_connect_retries_until_sshd_is_up(node_farm: NodeFarm, ssh_gateway_factory) -> None:
    address = free_address()
    iid = next_instance_id()
    gateway = ssh_gateway_factory(deadline_seconds=15, backoff_initial=0.1, backoff_max=0.5)
    boot = threading.Timer(0.8, node_farm.start, args=(iid, address))
    started = time.monotonic()
    boot.start()
    try:
        with gateway.connect(Target(iid, address)) as session:
            assert session.run("true").ok
        took = time.monotonic() - started
        assert 0.8 <= took < 5
        assert gateway.connect_attempts > 1
        assert "connection refused" in "\n".join(gateway.tail(iid, 50))
    finally:
        boot.join()
        node_farm.stop(iid)


@nodes
def test_connect_retries_until_the_key_is_installed(
    node_farm: NodeFarm, ssh_gateway_factory, client_key
) -> None:
    address = free_address()
    iid = next_instance_id()
    _, someone_else = generate_ed25519_key()
    node_farm.start(iid, address, authorized_key=someone_else)
    try:
        gateway = ssh_gateway_factory(deadline_seconds=15, backoff_initial=0.1,
                                      backoff_max=0.5)
        install = threading.Timer(0.8, node_farm.exec, args=(iid, [
            "sh", "-c", f"echo '{client_key.public}' >> /home/ubuntu/.ssh/authorized_keys"]))
        install.start()
        with gateway.connect(Target(iid, address)) as session:
            assert session.run("true").ok
        install.join()
        assert "authentication as ubuntu failed" in "\n".join(gateway.tail(iid, 50))
        # and when it never comes, the error says so
        node_farm.exec(iid, ["sh", "-c", ": > /home/ubuntu/.ssh/authorized_keys"])
        with pytest.raises(AuthenticationFailed, match="authentication as ubuntu failed"):
            gateway.connect(Target(iid, address), deadline_seconds=1)
        # a key that is never accepted gives up after auth_retry_seconds, not the deadline
        impatient = ssh_gateway_factory(deadline_seconds=60, auth_retry_seconds=1,
                                        backoff_initial=0.1, backoff_max=0.3)
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="still refused after 1 s"):
            impatient.connect(Target(iid, address))
        assert time.monotonic() - started < 5
    finally:
        node_farm.stop(iid)


@nodes
def test_dead_node_fails_by_its_own_deadline_in_parallel(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    live = start_nodes(4)
    dead = Target(next_instance_id(), free_address("127.10.9"), "dead")
    deadline = 3.0
    gateway = ssh_gateway_factory(deadline_seconds=deadline, concurrency=8)

    def work(session) -> str:  # noqa: ANN001
        session.run("sleep 1")
        return session.run("hostname").stdout.strip()

    started = time.monotonic()
    outcomes = gateway.run_parallel([*map(target, live), dead], work)
    took = time.monotonic() - started
    assert list(outcomes) == [n.instance_id for n in live] + [dead.instance_id]
    for node in live:
        assert outcomes[node.instance_id].ok, outcomes[node.instance_id].error
        assert outcomes[node.instance_id].value == node.hostname
    bad = outcomes[dead.instance_id]
    assert not bad.ok and bad.value is None
    assert bad.error.startswith(f"{dead.instance_id} ({dead.address}):")
    assert "connection refused" in bad.error and "\n" not in bad.error
    assert isinstance(bad.exception, Unreachable)
    assert bad.log_tail and "FAILED" in bad.log_tail[-1]
    # the deadline, not the sum of 5 targets' time
    assert deadline <= took < deadline + 2.5, took
    assert gateway.sessions_opened == 4


@nodes
def test_run_parallel_cuts_off_a_slow_node(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    fast, slow = start_nodes(2)
    gateway = ssh_gateway_factory()

    def work(session) -> str:  # noqa: ANN001
        if session.target.instance_id == slow.instance_id:
            session.run("sleep 60")
        return "done"

    started = time.monotonic()
    outcomes = gateway.run_parallel([target(fast), target(slow)], work, timeout=2)
    assert time.monotonic() - started < 5
    assert outcomes[fast.instance_id].ok
    assert not outcomes[slow.instance_id].ok
    assert "per-node deadline" in outcomes[slow.instance_id].error
    # a plain command timeout
    with gateway.connect(target(fast)) as session, pytest.raises(CommandTimeout):
        session.run("sleep 10", timeout=0.5)


@nodes
def test_killed_sshd_is_reported_not_hung(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    (node,) = start_nodes(1)
    gateway = ssh_gateway_factory(deadline_seconds=1.5)
    session = gateway.connect(target(node))
    node_farm.kill_sshd(node.instance_id)
    with pytest.raises(Unreachable):
        gateway.connect(target(node))
    with pytest.raises(SshError):
        session.run("true", timeout=5)
    session.close()
    node_farm.restart_sshd(node.instance_id)
    with pytest.raises(GivenUp):  # given up for the rest of this pass
        gateway.connect(target(node))
    gateway.begin_pass()
    with gateway.connect(target(node)) as again:
        assert again.run("true").ok


@nodes
def test_many_nodes_in_parallel(node_farm: NodeFarm, start_nodes, ssh_gateway_factory) -> None:
    many = start_nodes(20)
    gateway = ssh_gateway_factory(concurrency=16)
    started = time.monotonic()
    outcomes = gateway.run_parallel(map(target, many),
                                    lambda s: s.run("hostname").stdout.strip())
    took = time.monotonic() - started
    print(f"\n20 nodes, connect + 1 command each, 16 threads: {took:.2f} s")
    assert all(o.ok for o in outcomes.values())
    assert {o.value for o in outcomes.values()} == {n.hostname for n in many}
    assert gateway.sessions_opened == 20 and gateway.commands_run == 20


# ---------------------------------------------------------------- an unprivileged owner's files
@nodes
def test_an_unprivileged_owners_files_are_written_and_read_as_that_owner(
    node_farm: NodeFarm, start_nodes, ssh_gateway_factory
) -> None:
    """A folder someone else can write (the Disco user's DISCO_ROOT): root never follows
    what is planted there; links, hard links, FIFOs and folders are refused by name."""
    (node,) = start_nodes(1)
    iid = node.instance_id
    gateway = ssh_gateway_factory(command_timeout=30.0)

    def sh(command: str) -> str:
        return node_farm.exec(iid, ["sh", "-c", command]).stdout.decode()

    sh("useradd -m alice && install -d -o alice -m 0755 /srv/alice && "
       "printf 'root only\\n' > /etc/victim && chmod 0600 /etc/victim")
    victim = sh("stat -c '%i %U %a %s' /etc/victim; sha256sum /etc/victim")
    path = "/srv/alice/table.json"
    with gateway.connect(target(node)) as session:
        session.write_file(path, b'{"hosts": []}\n', 0o644, owner="alice", as_owner=True)
        assert sh(f"stat -c '%a %U %h %F' {path}") == "644 alice 1 regular file\n"
        assert session.read_file(path, as_user="alice") == b'{"hosts": []}\n'
        plants = {"runuser -u alice -- ln -s /etc/victim": "symbolic link",
                  "ln /etc/victim": "regular file (links/owner: 2|root)",  # root: the
                  "runuser -u alice -- mkfifo": "fifo",  # kernel stops alice making it
                  "runuser -u alice -- mkdir": "directory"}
        for plant, found in plants.items():
            sh(f"rm -rf {path} && {plant} {path}")
            started = time.monotonic()
            for attempt in (lambda: session.write_file(path, b"x", 0o644, owner="alice",
                                                       as_owner=True),
                            lambda: session.read_file(path, as_user="alice")):
                with pytest.raises(CommandFailed) as refused:
                    attempt()
                assert f"refusing {path} on " in str(refused.value)
                assert f"found {found}" in str(refused.value) and iid in str(refused.value)
                assert fault_of(refused.value) == "tamper"  # kept, never replaced for it
            assert time.monotonic() - started < 20  # a FIFO is never waited on
            assert sh("stat -c '%i %U %a %s' /etc/victim; sha256sum /etc/victim") == victim
        with pytest.raises(ValueError):
            session.write_file(path, b"x", owner="root", as_owner=True)


def test_node_logs_are_never_written_through_a_link(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (logs / "i-0abc.log").symlink_to(victim)
    gateway = SshGateway(SshSettings(log_dir=logs),
                         HostKeyVerifier("insecure", HostKeyStore(tmp_path / "pins")))
    gateway._log(Target("i-0abc", "10.0.0.1"), ["a line"])
    assert victim.read_text() == "keep\n"
    assert gateway.tail("i-0abc")[-1].endswith(" a line")  # kept in memory
    fresh = SshGateway(SshSettings(log_dir=logs), gateway.verifier)
    assert fresh.tail("i-0abc") == []  # the planted link is not read either
