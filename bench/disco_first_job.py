"""Time to the first correct Disco job: Disco built from source against a prebuilt tree.

Two runs on the sandbox (local EC2 endpoint + real sshd nodes, each its own network
namespace), each from an empty account: `up --wait` (the real CLI, in this process) for
1 master + 2 slaves, then the word count of `sandbox --demo` through the `run Disco:` line
that `up` printed (a child process, as a user types it) until the counts are right.

(a) `DISCO_INSTALL: "source"`, `DISCO_SOURCE` = the bundle: the master builds Disco.
(b) `DISCO_INSTALL: "tarball"`, `DISCO_TARBALL` = an installed tree built once beforehand
    with the product's build step (`disco_source.build_script()`, as the tests run it),
    outside the timing; that build's wall time is reported as the build time.

Counts the EC2 API calls (a wrapper on botocore's call) and SSH sessions (the gateway's
counter) of the `up --wait`. Sandbox nodes are overlays of this machine: apt installs
nothing, so apt's download time on real EC2 is not in these figures.

    sudo python bench/disco_first_job.py [BUNDLE]     # default: ../shared/vendor bundle
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import botocore.client  # noqa: E402

from disposabledisco import cli, ssh  # noqa: E402
from disposabledisco.disco_source import bundle_sha256  # noqa: E402
from disposabledisco.sandbox.run import (  # noqa: E402
    Sandbox,
    SandboxOptions,
    demo_counts,
    disco_client,
    word_count_script,
)
from tests.disco_bundle import find_bundle, run_build, write_build_script  # noqa: E402

CALLS: Counter = Counter()
SESSIONS: Counter = Counter()


def _count_calls() -> None:
    """Count every botocore API call and every SSH session opened in this process."""
    call = botocore.client.BaseClient._make_api_call
    count = ssh.SshGateway._count

    def counted_call(self, operation_name, api_params):  # type: ignore[no-untyped-def]
        CALLS[operation_name] += 1
        return call(self, operation_name, api_params)

    def counted_count(self, name):  # type: ignore[no-untyped-def]
        if name == "_sessions_opened":
            SESSIONS["sessions"] += 1
        return count(self, name)

    botocore.client.BaseClient._make_api_call = counted_call  # type: ignore[method-assign]
    ssh.SshGateway._count = counted_count  # type: ignore[method-assign]


@dataclass
class Result:
    label: str
    up_seconds: float
    job_seconds: float
    ec2_calls: int
    ssh_sessions: int

    @property
    def total(self) -> float:
        return self.up_seconds + self.job_seconds


def build_tree(bundle: Path, workdir: Path) -> tuple[Path, float]:
    """The installed tree of `bundle`, built by the product's build step; (tarball, s)."""
    out = workdir / "out"
    done = run_build(write_build_script(workdir), bundle, out)
    if done.returncode != 0:
        raise SystemExit(f"the build failed:\n{done.stderr[-3000:]}")
    return out / f"disco-installed-{bundle_sha256(bundle)}.tar.gz", done.seconds


def first_job(label: str, workdir: Path, network: str, disco: dict[str, str],
              bundle: Path) -> Result:
    """Empty account → `up --wait` → first correct word count; the cluster taken down."""
    options = SandboxOptions(workdir, slaves=2, network=network, disco_source=bundle)
    with Sandbox(options) as sandbox:
        config = sandbox.config_path
        values = json.loads(config.read_text())
        values.pop("DISCO_SOURCE")
        values.update(disco)
        config.write_text(json.dumps(values, indent=2))
        CALLS.clear()
        SESSIONS.clear()
        printed = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(printed):
            code = cli.main(["up", str(config), "--wait", "--timeout", "1800"])
        up_seconds = time.monotonic() - started
        calls, sessions = sum(CALLS.values()), SESSIONS["sessions"]
        if code != 0:
            raise SystemExit(f"{label}: up --wait exited {code}:\n{printed.getvalue()}")
        client = disco_client(printed.getvalue())
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "disposabledisco.cli", *client[1:-1],
                               "--json", "--", "bash", "-c", word_count_script()],
                              capture_output=True, text=True, timeout=900, check=False)
        job_seconds = time.monotonic() - started
        (node,) = json.loads(done.stdout)["nodes"]
        results = [line for line in node["stdout"].splitlines() if line.startswith("RESULT ")]
        if len(results) != 1 or json.loads(results[0][7:]) != demo_counts():
            raise SystemExit(f"{label}: wrong or no counts:\n{node['stdout']}{node['stderr']}")
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["down", str(config), "--yes"])
    return Result(label, up_seconds, job_seconds, calls, sessions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path,
                        default=find_bundle())
    parser.add_argument("--network", default="127.214.0.0/22")
    args = parser.parse_args()
    if args.bundle is None or not args.bundle.is_file():
        raise SystemExit("give a Disco source bundle (none in a shared/vendor folder beside "
                         "this checkout or above it, and DISCO_SOURCE unset)")
    _count_calls()
    with tempfile.TemporaryDirectory(prefix="dd-bench-disco-") as tmp:
        work = Path(tmp)
        tree, build_seconds = build_tree(args.bundle, work / "build")
        print(f"build of the installed tree (outside the timing): {build_seconds:.1f} s",
              flush=True)
        runs = [
            first_job("source (master builds)", work / "a", args.network,
                      {"DISCO_INSTALL": "source", "DISCO_SOURCE": str(args.bundle.resolve())},
                      args.bundle),
            first_job("tarball (prebuilt tree)", work / "b", args.network,
                      {"DISCO_INSTALL": "tarball", "DISCO_TARBALL": str(tree)}, args.bundle),
        ]
    print("\n| DISCO_INSTALL | up --wait (s) | first job (s) | empty → first correct result (s)"
          " | EC2 calls | SSH sessions |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run.label} | {run.up_seconds:.1f} | {run.job_seconds:.1f} | {run.total:.1f} "
              f"| {run.ec2_calls} | {run.ssh_sessions} |")
    print(f"\nbuild of the installed tree, same script on this machine: {build_seconds:.1f} s; "
          f"difference of the two up --wait: {runs[0].up_seconds - runs[1].up_seconds:.1f} s")


if __name__ == "__main__":
    main()
