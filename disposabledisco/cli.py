"""Command line: `disposabledisco init|validate|up|status|down|doctor`.

Exit codes are the contract for cron and scripts: 0 converged, 10 progressing (run
again), 1 an action failed, 2 invalid config or usage (nothing changed), 75 another run
holds this cluster's lock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .bootstrap import BootstrapError
from .config import Config, ConfigError, load_config
from .ec2 import AwsError, Ec2Gateway
from .lock import LockHeld, cluster_lock
from .reconcile import (
    EXIT_CONVERGED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_LOCKED,
    EXIT_PROGRESSING,
    NodeWorker,
    PassReport,
    desired_state,
    observe,
    run_pass,
)
from .report import (
    access_hint,
    foreign_json,
    foreign_warning,
    node_json,
    pass_json,
    render_pass,
    status_table,
)

DEFAULT_WAIT_TIMEOUT = 1800


class UsageError(Exception):
    """A command-line mistake: exit 2, nothing changed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disposabledisco",
        description="Keep a disposable Disco cluster on EC2 spot instances converged to a "
                    "JSON config.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("init", help="print a complete default config (create_config.py)")
    validate = commands.add_parser("validate", help="check a config and exit")
    validate.add_argument("config")
    up = commands.add_parser("up", help="one reconcile pass (create_cluster.py)")
    up.add_argument("config")
    up.add_argument("--wait", action="store_true", help="repeat passes until converged")
    up.add_argument("--timeout", type=float, default=None,
                    help=f"with --wait: give up after SECONDS (default {DEFAULT_WAIT_TIMEOUT})")
    up.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    up.add_argument("--json", action="store_true", help="machine-readable report")
    up.add_argument("--ec2-only", action="store_true",
                    help="converge EC2 only (bids, tags, scaling, cleanup); no SSH to nodes")
    status = commands.add_parser("status", help="what exists now")
    status.add_argument("config")
    status.add_argument("--json", action="store_true")
    down = commands.add_parser("down", help="cancel every request, then terminate everything")
    down.add_argument("config")
    down.add_argument("--yes", action="store_true", help="do not ask")
    down.add_argument("--dry-run", action="store_true")
    down.add_argument("--json", action="store_true")
    doctor = commands.add_parser("doctor", help="check a live cluster end to end")
    doctor.add_argument("config")
    doctor.add_argument("--json", action="store_true")
    sandbox = commands.add_parser(
        "sandbox", help="run a local EC2 endpoint with a spot market and real SSH nodes "
                        "(Linux, root), and write a ready config")
    sandbox.add_argument("--dir", default="sandbox", help="where the config, key and state go")
    sandbox.add_argument("--slaves", type=int, default=3, help="NUM_SLAVES of the config")
    sandbox.add_argument("--port", type=int, default=0, help="endpoint port (default: any)")
    sandbox.add_argument("--interruption-rate", type=float, default=0.0, metavar="P",
                         help="chance per running spot instance per minute to be interrupted")
    sandbox.add_argument("--price-volatility", type=float, default=0.0, metavar="V",
                         help="size of the spot price's random steps (0.1 = ±10%%)")
    sandbox.add_argument("--spot-price", type=float, default=0.03, metavar="USD",
                         help="starting spot price per hour (the config bids 0.10)")
    sandbox.add_argument("--capacity", action="append", default=[], metavar="TYPE=N",
                         help="at most N spot instances of TYPE (0 = an outage); repeatable")
    sandbox.add_argument("--fulfil-delay", type=float, default=3.0, metavar="SECONDS")
    sandbox.add_argument("--seed", type=int, default=0)
    sandbox.add_argument("--network", default="127.42.0.0/16", metavar="CIDR",
                         help="loopback VPC for the instances (inside 127.0.0.0/8)")
    sandbox.add_argument("--demo", action="store_true",
                         help="run the whole story (up --wait, status, doctor, an interruption "
                              "healed, down) against the sandbox, then stop")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    try:
        if args.command == "init":
            from .init import render_default_config
            sys.stdout.write(render_default_config())
            return EXIT_CONVERGED
        if args.command == "sandbox":
            return cmd_sandbox(args)
        config = load_config(args.config)
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.command == "validate":
            print(f"{args.config}: valid ({1 + config.desired_slaves} nodes, tag key "
                  f"{config.tag_key!r})")
            return EXIT_CONVERGED
        if getattr(args, "timeout", None) is not None and not args.wait:
            raise UsageError("--timeout only goes with --wait: add --wait or drop --timeout")
        desired_state(config)  # reads a local DISCO_TARBALL: fail before any EC2 call
        return COMMANDS[args.command](config, args)
    except BootstrapError as error:
        print(f"{args.config}: {error}; fix DISCO_TARBALL or the file", file=sys.stderr)
        return EXIT_INVALID
    except ConfigError as error:
        for problem in error.problems:
            print(f"{getattr(args, 'config', 'config')}: {problem}", file=sys.stderr)
        return EXIT_INVALID
    except UsageError as error:
        print(f"disposabledisco: {error}", file=sys.stderr)
        return EXIT_INVALID
    except LockHeld as error:
        print(f"disposabledisco: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except AwsError as error:
        print(f"disposabledisco: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("disposabledisco: interrupted; run again to continue", file=sys.stderr)
        return 130


def node_worker(config: Config, ec2: Ec2Gateway) -> NodeWorker:
    """The SSH side of a pass: bootstrap, join, membership."""
    from .provision import make_provisioner
    return make_provisioner(config, ec2)


def _emit(args: argparse.Namespace, report: PassReport, config: Config,
          show_access: bool = True) -> None:
    """Print one pass, plus at most one stderr line about what is not ours."""
    warning = foreign_warning(config, report.cluster)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(pass_json(report), indent=2, sort_keys=True), flush=True)
        return
    print(render_pass(report))
    hint = access_hint(config, report.cluster) if show_access else None
    if hint and not report.dry_run:
        print(hint)
    print(flush=True)


def cmd_up(config: Config, args: argparse.Namespace) -> int:
    ec2 = Ec2Gateway(config)
    if args.dry_run:
        report = run_pass(config, ec2, None, dry_run=True)
        _emit(args, report, config)
        return report.exit_code
    timeout = args.timeout if args.timeout is not None else DEFAULT_WAIT_TIMEOUT
    deadline = time.monotonic() + timeout
    delay = 1.0
    with cluster_lock(config.state_dir):
        workers = None if args.ec2_only else node_worker(config, ec2)
        while True:
            report = run_pass(config, ec2, workers)
            _emit(args, report, config, show_access=report.converged or not args.wait)
            code = report.exit_code
            if not args.wait or code == EXIT_CONVERGED or _permanent(report):
                return code
            if time.monotonic() + delay > deadline:
                print(f"disposabledisco: not converged after {timeout:g} s; run again to "
                      "continue", file=sys.stderr)
                return code
            time.sleep(delay)
            delay = min(delay * 1.5, 15.0)


def _permanent(report: PassReport) -> bool:
    """A failure that another pass will not fix by itself (EC2 refused a create)."""
    if report.plan.problems:
        return True
    return any(not r.ok and r.action.mutates_ec2 for r in report.results)


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    cluster = observe(config, Ec2Gateway(config))
    if args.json:
        print(json.dumps({"nodes": [node_json(n) for n in cluster.nodes],
                          "foreign": [foreign_json(f) for f in cluster.foreign]}, indent=2,
                         sort_keys=True))
    else:
        print(status_table(config, cluster))
    live = [n for n in cluster.nodes if n.is_live]
    ready = len(live) == 1 + config.desired_slaves and all(n.state == "ready" for n in live)
    return EXIT_CONVERGED if ready else EXIT_PROGRESSING


def cmd_down(config: Config, args: argparse.Namespace) -> int:
    ec2 = Ec2Gateway(config)
    if args.dry_run:
        report = run_pass(config, ec2, None, dry_run=True, down=True)
        _emit(args, report, config)
        return report.exit_code
    with cluster_lock(config.state_dir):
        preview = run_pass(config, ec2, None, dry_run=True, down=True)
        if not preview.plan.actions:
            print("nothing to take down")
            return EXIT_CONVERGED
        if not args.yes:
            _confirm(config, preview)
        report = run_pass(config, ec2, None, down=True)
        _emit(args, report, config, show_access=False)
        if report.failed:
            return EXIT_FAILED
        check = run_pass(config, ec2, None, dry_run=True, down=True)
        return EXIT_CONVERGED if not check.plan.actions else EXIT_PROGRESSING


def _confirm(config: Config, preview: PassReport) -> None:
    if not sys.stdin.isatty():
        raise UsageError("down asks before it destroys anything: add --yes to run it "
                         "without a terminal")
    print(render_pass(preview))
    answer = input(f"Take down cluster {config.tag_key!r}? Type 'yes': ").strip().lower()
    if answer != "yes":
        raise UsageError("down cancelled; nothing changed")


def cmd_doctor(config: Config, args: argparse.Namespace) -> int:
    from .doctor import doctor_cluster
    report = doctor_cluster(config, Ec2Gateway(config))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.to_text())
    return EXIT_CONVERGED if report.ok else EXIT_FAILED


def cmd_sandbox(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .sandbox.run import SandboxError, SandboxOptions, demo, serve
    capacity: dict[str, int] = {}
    for item in args.capacity:
        instance_type, _, count = item.partition("=")
        if not count.isdigit():
            raise UsageError(f"--capacity {item!r} must look like m5.large=2")
        capacity[instance_type] = int(count)
    import ipaddress
    try:
        network = ipaddress.IPv4Network(args.network)
    except ValueError:
        network = None
    if network is None or not network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) \
            or network.prefixlen > 24:
        raise UsageError(f"--network {args.network!r} must be a /24 or larger inside "
                         "127.0.0.0/8, e.g. 127.42.0.0/16")
    if not 0 <= args.interruption_rate <= 1:
        raise UsageError("--interruption-rate is a chance per minute: give 0 to 1")
    options = SandboxOptions(Path(args.dir), slaves=args.slaves, port=args.port,
                             spot_price=args.spot_price, fulfil_delay=args.fulfil_delay,
                             interruption_rate=args.interruption_rate,
                             price_volatility=args.price_volatility, capacity=capacity,
                             seed=args.seed, network=str(network))
    try:
        return demo(options) if args.demo else serve(options)
    except SandboxError as error:
        print(f"disposabledisco: {error}", file=sys.stderr)
        return EXIT_FAILED


COMMANDS: dict[str, Any] = {"up": cmd_up, "status": cmd_status, "down": cmd_down,
                            "doctor": cmd_doctor}




if __name__ == "__main__":
    raise SystemExit(main())
