"""`disposabledisco sandbox`: a whole spot cluster on this machine, no AWS account needed.

It starts the local EC2 endpoint (moto on 127.0.0.1) with the spot market model, boots a
real, isolated SSH node for every instance the market launches (at the instance's own
loopback address), writes a ready config, and keeps running until interrupted. The
config uses `DISCO_INSTALL: "none"`: everything but installing and starting Disco
(trust, cookie, names, host table file) is done for real. With a Disco source bundle
(`--disco-source`) it is `DISCO_INSTALL: "source"` instead: the master builds real Disco
from the bundle and the demo runs real jobs on the cluster.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..deps import SANDBOX, require

require(SANDBOX)  # one line naming what to install, before any third-party import below

from ..bootstrap import template  # noqa: E402
from .endpoint import DUMMY_KEY_ID, DUMMY_SECRET, LocalEc2  # noqa: E402
from .loopback import endpoint_answers, free_subnet  # noqa: E402
from .market import SpotMarket  # noqa: E402
from .nodes import NodeFarm, generate_ed25519_key, loopback_ends  # noqa: E402

# Debian packages the sandbox nodes get (from this machine's own installed set: nodes are
# offline overlays of it, so only installed packages can be "installed" there).
SANDBOX_PACKAGES = ("python3", "python3-venv", "python-is-python3", "erlang-nox",
                    "openssh-client", "ca-certificates", "curl")
#: config keys that name this run's endpoint, network and key: a restart must replace them
WIRING_KEYS = ("AMI", "KEY_NAME", "SECURITY_GROUPS", "SUBNET_ID", "REGION", "ENDPOINT_URL",
               "AWS_ACCESS", "AWS_SECRET", "SSH_KEY_FILE", "MGMT_KEY")

#: the disco demo's cluster: 1 master + 2 slaves
DISCO_DEMO_SLAVES = 2
#: seconds the demo's word count may take (13-53 s seen here, losing a slave included)
DEMO_JOB_TIMEOUT = 300
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog")
#: eight input files (eight map tasks, more than the master's slots: the slaves work too)
DEMO_TEXTS = ["\n".join(" ".join(_WORDS[(i * 5 + j * 3 + k) % len(_WORDS)]
                                  for j in range(i % 7 + 1))
                        for i in range(60)) + "\n" for k in range(8)]
#: the word count (templates/word_count.py: a map task takes ~3 s, so a slave can be lost
#: while the job runs)
DEMO_JOB_PY = template("word_count.py")


class SandboxError(Exception):
    """The sandbox cannot run on this machine (not root, no sshd, …)."""


@dataclass
class SandboxOptions:
    directory: Path
    slaves: int = 3
    port: int = 0
    instance_type: str = "m5.large"
    spot_price: float = 0.03
    max_bid: float = 0.10
    fulfil_delay: float = 3.0
    interruption_rate: float = 0.0
    price_volatility: float = 0.0
    capacity: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    network: str = "127.42.0.0/16"  # instances get .4, .5, … of its first free /24
    #: a Disco source bundle: the config installs real Disco from it (DISCO_INSTALL source)
    disco_source: Path | None = None


class Sandbox:
    """The running sandbox: endpoint, market and node farm, stopped together."""

    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.directory = options.directory.resolve()
        self.market: SpotMarket | None = None
        self.endpoint: LocalEc2 | None = None
        self.farm: NodeFarm | None = None
        self.config_path = self.directory / "sandbox.json"
        #: what the sandbox last wrote, to tell the user's edits from its own values
        self.record_path = self.directory / ".sandbox-written.json"
        self.subnet = ""
        self.kept_edits: dict[str, Any] = {}
        self.replaced_edits: list[str] = []

    def start(self) -> Path:
        """Start everything and write the config; returns its path."""
        available, reason = NodeFarm.available()
        if not available:
            raise SandboxError(f"the sandbox needs real SSH nodes, which this machine cannot "
                               f"run: {reason}")
        options = self.options
        previous, written = _read_json(self.config_path), _read_json(self.record_path)
        url = previous.get("ENDPOINT_URL") if previous else None
        if isinstance(url, str) and endpoint_answers(url):
            raise SandboxError(f"a sandbox already runs with {self.config_path} (its endpoint "
                               f"{url} answers): stop it first, or pass another --dir")
        try:
            subnet = free_subnet(options.network, ends=loopback_ends())
        except LookupError as error:
            raise SandboxError(str(error)) from None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file = self.directory / "id_ed25519"
        private, public = generate_ed25519_key("disposabledisco-sandbox")
        _write_private(key_file, private)
        self.market = SpotMarket(seed=options.seed, fulfil_delay=options.fulfil_delay,
                                 default_price=options.spot_price,
                                 interruption_rate=options.interruption_rate,
                                 price_volatility=options.price_volatility)
        for instance_type, count in options.capacity.items():
            self.market.set_capacity(instance_type, count)
        self.farm = NodeFarm(authorized_key=public, workdir=self.directory / "nodes")
        self.market.on_launch(self.farm.on_launch)
        self.market.on_terminate(self.farm.on_terminate)
        self.endpoint = LocalEc2(port=options.port, market=self.market).start()
        vpc = ipaddress.IPv4Network(options.network)
        network = self.endpoint.setup_loopback_network(str(vpc), str(subnet),
                                                       public_key=public)
        self.subnet = str(subnet)
        self.market.background(0.5)
        fresh = sandbox_config(self.endpoint, network, key_file, public, options)
        config, self.kept_edits, self.replaced_edits = keep_user_edits(fresh, previous, written)
        _write_private(self.config_path, json.dumps(config, indent=2) + "\n")
        # the record is the sandbox's own values: kept edits stay edits at the next restart
        _write_private(self.record_path, json.dumps(fresh, indent=2) + "\n")
        return self.config_path

    def stop(self) -> None:
        """Stop ticking, the endpoint and every node (their writes vanish with them)."""
        if self.market is not None:
            self.market.stop()
        if self.endpoint is not None:
            self.endpoint.stop()
        if self.farm is not None:
            self.farm.close()

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sandbox_config(endpoint: LocalEc2, network: dict[str, str], key_file: Path, public: str,
                   options: SandboxOptions) -> dict[str, Any]:
    """A complete config for the sandbox endpoint and its nodes."""
    disco: dict[str, Any] = {"DISCO_INSTALL": "none"}
    if options.disco_source is not None:
        disco = {"DISCO_INSTALL": "source", "DISCO_SOURCE": str(options.disco_source.resolve())}
    return {
        "AMI": network["image_id"], "KEY_NAME": network["key_name"],
        "INSTANCE_TYPE": options.instance_type, "NUM_SLAVES": options.slaves,
        "MAX_BID": f"{options.max_bid:g}", "TAG_KEY": "sandbox",
        "SECURITY_GROUPS": [network["security_group_id"]], "SUBNET_ID": network["subnet_id"],
        "REGION": endpoint.region, "ENDPOINT_URL": endpoint.url,
        "AWS_ACCESS": DUMMY_KEY_ID, "AWS_SECRET": DUMMY_SECRET,
        "SSH_USER": "ubuntu", "SSH_KEY_FILE": str(key_file), "SSH_ADDRESS": "private_ip",
        "MGMT_KEY": public, "STATE_DIR": str(key_file.parent / "state"),
        "BASE_PACKAGES": list(SANDBOX_PACKAGES), **disco,
        "SPOT_OPEN_TIMEOUT_MINUTES": 2, "UNRESPONSIVE_MINUTES": 3,
    }


def keep_user_edits(fresh: dict[str, Any], previous: dict[str, Any] | None,
                    written: dict[str, Any] | None,
                    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Merge a restart's fresh config with the user's edits of the previous one.

    An edit is a key whose value in the previous file differs from what the sandbox wrote
    last (from the fresh config when that record is gone). Edits are kept, except of the
    keys that wire the config to this run's endpoint, network and key (WIRING_KEYS), which
    are replaced. Returns (config, kept edits, replaced keys) so the banner can say both.
    """
    if previous is None:
        return fresh, {}, []
    baseline = written if written is not None else fresh
    missing = object()
    edited = sorted(key for key in set(previous) | set(baseline)
                    if previous.get(key, missing) != baseline.get(key, missing))
    config = dict(fresh)
    kept: dict[str, Any] = {}
    for key in edited:
        if key in WIRING_KEYS:
            continue
        if key in previous:
            config[key] = kept[key] = previous[key]
        else:  # the user removed it
            config.pop(key, None)
            kept[key] = None
    return config, kept, [key for key in edited if key in WIRING_KEYS]


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; a damaged one stops the sandbox (never
    overwritten silently)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SandboxError(f"cannot read {path}: {error.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise SandboxError(f"{path} is not valid JSON ({error}): fix it or remove it, "
                           "then start the sandbox again") from None
    if not isinstance(value, dict):
        raise SandboxError(f"{path} is not a JSON object: fix it or remove it, then start "
                           "the sandbox again")
    return value


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def banner(sandbox: Sandbox) -> list[str]:
    """What was started and where: endpoint, network, config, and edits kept or replaced."""
    lines = [f"sandbox EC2 endpoint: {sandbox.endpoint.url if sandbox.endpoint else '-'}",
             f"instance network: {sandbox.subnet} (instances get .4, .5, …; the first free "
             f"/24 of {sandbox.options.network})",
             f"config written to {sandbox.config_path}"]
    if sandbox.kept_edits:
        edits = ", ".join(f"{key}={json.dumps(value)}" if value is not None else f"{key} removed"
                          for key, value in sandbox.kept_edits.items())
        lines.append(f"kept your edits of {sandbox.config_path.name}: {edits} (remove the "
                     "file to start from the defaults)")
    if sandbox.replaced_edits:
        lines.append(f"replaced your edits of {', '.join(sandbox.replaced_edits)}: they must "
                     "name this run's endpoint, network and key")
    return lines


def usage_text(sandbox: Sandbox) -> str:
    """The banner of a sandbox that keeps running, with what to type next."""
    config = str(sandbox.config_path)
    return "\n".join([
        "sandbox running: an SSH node for every instance the endpoint launches",
        *banner(sandbox),
        "",
        "in another terminal:",
        f"  python create_cluster.py {config} --wait      # converge a real cluster",
        f"  disposabledisco status {config}",
        f"  disposabledisco doctor {config}",
        f"  disposabledisco ssh {config}                  # log in to the master",
        f"  disposabledisco exec {config} --role master -- uptime   # a command on nodes",
        f"  edit NUM_SLAVES in {config} and run create_cluster.py again to scale",
        f"  disposabledisco down {config} --yes",
        "",
        "press Ctrl-C here to stop the sandbox (every node and its changes vanish)",
    ])


def _say(line: str) -> None:
    """Print at once: the demo's lines interleave with its child commands' output."""
    print(line, flush=True)


def _cli(argv: list[str], title: str, say: Callable[[str], None]) -> tuple[int, str]:
    """One step: the real CLI in a child process, exactly as a user would type it; its
    stdout is shown as it comes and returned (the disco demo reads the client line), its
    stderr goes to ours."""
    say(f"\n$ disposabledisco {' '.join(argv)}    # {title}")
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-m", "disposabledisco.cli", *argv],
                          stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            say(line.rstrip("\n"))
            lines.append(line)
    return child.returncode, "".join(lines)


def demo(options: SandboxOptions, say: Callable[[str], None] = _say) -> int:
    """The whole story in one command: converge, inspect, lose a slave, heal, tear down.

    Every step is the real CLI in a child process, exactly as a user would type it. With
    a Disco source bundle, real Disco is built and a word count runs while a slave is lost.
    """
    if options.disco_source is not None:
        options = dataclasses.replace(options, slaves=DISCO_DEMO_SLAVES)
    with Sandbox(options) as sandbox:
        for line in banner(sandbox):
            say(line)
        config = str(sandbox.config_path)
        up = ["up", config, "--wait", "--timeout", "600"]
        if options.disco_source is not None:
            code, out = _cli([*up[:-1], "1800"], "build Disco on the master from the bundle, "
                             f"converge 1 master + {DISCO_DEMO_SLAVES} slaves", say)
            if code == 0:
                code = _disco_story(sandbox, out, say)
            steps: list[tuple[str, list[str], Callable[[], None] | None]] = []
        else:
            code, steps = 0, [
                ("converge the cluster", up, None),
                ("what exists", ["status", config], None),
                ("check it end to end", ["doctor", config], None),
                ("a spot slave is interrupted; heal", up,
                 lambda: _interrupt_one_slave(sandbox, say)),
            ]
        steps.append(("tear it down", ["down", config, "--yes"], None))
        for title, argv, before in steps:
            if code != 0:
                break
            if before is not None:
                before()
            code = _cli(argv, title, say)[0]
        if code != 0:
            say(f"step failed with exit code {code}; logs are in {sandbox.directory}")
            return code
        say("\nsandbox demo finished: the cluster converged, healed and was taken down")
    return 0


def disco_client(up_output: str) -> list[str]:
    """The `run Disco:` command `up` printed, up to and including its `--` (the example
    command after it is replaced by ours); ValueError when `up` printed none."""
    lines = [line for line in up_output.splitlines() if line.strip().startswith("run Disco:")]
    if not lines:
        raise ValueError("up printed no 'run Disco:' line")
    argv = shlex.split(lines[-1].split("run Disco:", 1)[1])
    if argv[:1] != ["disposabledisco"] or "--" not in argv:
        raise ValueError(f"unexpected client line: {lines[-1].strip()}")
    return argv[:argv.index("--") + 1]


def _disco_story(sandbox: Sandbox, up_output: str, say: Callable[[str], None]) -> int:
    """Word count through the printed client while a slave is interrupted, then heal."""
    config = str(sandbox.config_path)
    try:
        client = disco_client(up_output)
    except ValueError as error:
        say(f"cannot follow up's client instructions: {error}")
        return 1

    def on_master(script: str) -> subprocess.Popen[str]:
        argv = [*client[1:-1], "--json", "--", "bash", "-c", script]
        return subprocess.Popen([sys.executable, "-m", "disposabledisco.cli", *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    script = word_count_script()
    say(f"\n$ {shlex.join(client)} bash -c '<push {len(DEMO_TEXTS)} files with ddfs chunk, "
        "run a word count>'    # a real Disco job, through the client line up printed")
    started = time.monotonic()
    job = on_master(script)
    victim = ""
    while job.poll() is None and not victim:  # wait for Disco to list the job, then strike
        jobs = on_master("disco jobs")
        listed = jobs.communicate(timeout=120)[0]
        if job.poll() is None and _master_stdout(listed).strip():
            victim = _interrupt_one_slave(sandbox, say, while_="while the word count runs")
        time.sleep(1)
    try:
        out, err = job.communicate(timeout=DEMO_JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        job.kill()
        job.communicate()
        say(f"the word count did not finish within {DEMO_JOB_TIMEOUT} s"
            + (f" after slave {victim} was interrupted" if victim else "")
            + f"; see `disco events` on the master and the logs in {sandbox.directory}")
        return 1
    seconds = time.monotonic() - started
    try:
        (node,) = json.loads(out)["nodes"]
        stdout, exit_code = node["stdout"], node["exit_code"]
    except (ValueError, KeyError, TypeError):
        say(f"the client gave no answer: {(out + err).strip()[-2000:]}")
        return 1
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if exit_code != 0 or len(results) != 1:
        say(f"the word count failed (exit {exit_code}):\n{stdout}{node['stderr']}")
        return 1
    counts = json.loads(results[0].removeprefix("RESULT "))
    expected = demo_counts()
    say("word count: " + ", ".join(f"{word} {counts[word]}" for word in sorted(counts)))
    if counts != expected:
        say("WRONG: a local count of the same input gives "
            + ", ".join(f"{word} {expected[word]}" for word in sorted(expected)))
        return 1
    say(f"counts checked: equal to a local count of the input ({sum(expected.values())} words, "
        f"{seconds:.0f} s)")
    if victim:
        say(f"the job completed although slave {victim} was interrupted while it ran")
    else:
        say("(the job finished before a slave could be interrupted: nothing was lost)")
    code = _cli(["up", config, "--wait", "--timeout", "600"],
                "heal: a new slave replaces the interrupted one", say)[0]
    if code == 0:
        code = _cli(["status", config], "what exists now", say)[0]
    return code


def demo_counts() -> dict[str, int]:
    """What the word count must give: a local count of DEMO_TEXTS."""
    return dict(collections.Counter(" ".join(DEMO_TEXTS).split()))


def word_count_script(tag: str = "data:demo") -> str:
    """Bash for the master, as the Disco user: push DEMO_TEXTS into DDFS under `tag` with
    `ddfs chunk`, run DEMO_JOB_PY over it; prints `RESULT {json counts}`."""
    files = "".join(f"cat > in{k}.txt <<'EOF'\n{text}EOF\n" for k, text in enumerate(DEMO_TEXTS))
    return (f"set -euo pipefail\ncd \"$(mktemp -d)\"\n{files}"
            f"cat > job.py <<'EOF'\n{DEMO_JOB_PY}EOF\n"
            f"ddfs chunk {tag} {' '.join(f'./in{k}.txt' for k in range(len(DEMO_TEXTS)))}"
            f" >/dev/null\npython3 -W ignore job.py tag://{tag}\n")


def _master_stdout(answer: str) -> str:
    """The master's stdout from an `exec --json` answer ('' when unreadable)."""
    try:
        return str(json.loads(answer)["nodes"][0]["stdout"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def _interrupt_one_slave(sandbox: Sandbox, say: Callable[[str], None], while_: str = "") -> str:
    """Let the spot market interrupt the first running slave; its instance id ('' if none)."""
    client = sandbox.endpoint.client()
    reservations = client.describe_instances(Filters=[
        {"Name": "tag:sandbox", "Values": ["slave"]},
        {"Name": "instance-state-name", "Values": ["running"]}])["Reservations"]
    victims = sorted((i["InstanceId"], i.get("PrivateIpAddress", "?"))
                     for r in reservations for i in r["Instances"])
    if victims:
        victim, address = victims[0]
        say(f"\n(the spot market interrupts slave {victim} at {address}"
            f"{' ' + while_ if while_ else ''})")
        sandbox.market.interrupt(victim)
        return victim
    return ""


def serve(options: SandboxOptions, say: Callable[[str], None] = _say,
          stop: threading.Event | None = None) -> int:
    """Run the sandbox in the foreground until SIGINT/SIGTERM (or `stop` is set)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: stop.set())
    with Sandbox(options) as sandbox:
        say(usage_text(sandbox))
        stop.wait()
        say("stopping the sandbox")
    return 0
