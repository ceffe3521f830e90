"""Command line: `disposabledisco init|validate|up|status|down|doctor`, and to use the
cluster `ssh|exec|put|get|tunnel|forget-host-key` (logic in `remote`), plus `bundle` and
`sandbox`.

Exit codes are the contract for cron and scripts: 0 converged, 10 progressing (run
again), 1 an action failed, 2 invalid config or usage (nothing changed), 75 another run
holds this cluster's lock.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__, remote
from .bootstrap import BootstrapError
from .cluster import Cluster, Node
from .config import Config, ConfigError, default_config, load_config, plural, schema_text
from .ec2 import AwsError, Ec2Gateway
from .lock import LockHeld, cluster_lock
from .pricing import on_demand_prices
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
    DOWN_VERDICTS,
    access_hint,
    billed,
    cost_json,
    dry_run_verdict,
    foreign_json,
    foreign_warning,
    node_json,
    parked_pools,
    pass_json,
    render_pass,
    status_table,
    tunnel_text,
    up_verdict,
    waiting_text,
)
from .sandbox.loopback import sandbox_not_running
from .ssh import SshError
from .upgrade import carry_over_pins

DEFAULT_WAIT_TIMEOUT = 1800
EXIT_INTERRUPTED = 130

PASS_CODES = ("0 converged, 10 progressing (run again), 1 an action failed, 2 invalid "
              "config or usage (nothing changed), 75 another run holds the cluster's lock")
#: one line per command (its --help repeats it), the arguments, and what its exit codes mean
COMMAND_HELP: dict[str, tuple[str, str]] = {
    "init": ("print a complete default config (same as create_config.py)",
             "0 printed"),
    "validate": ("check a config and exit; no EC2 call", "0 valid, 2 invalid"),
    "up": ("one reconcile pass: converge the cluster to the config (same as "
           "create_cluster.py)", PASS_CODES),
    "status": ("what the cluster has now and what it costs per hour",
               "0 every wanted node is ready, 10 not yet, 1 an EC2 call failed, "
               "2 invalid config or usage"),
    "down": ("cancel every spot request, then terminate every instance of the cluster",
             "0 nothing is left, 10 still shutting down (run again), 1 an action failed, "
             "2 invalid config, usage or cancelled at the prompt, 75 locked"),
    "doctor": ("check a live cluster end to end (SSH, names, Erlang, Disco)",
               "0 every check passed, 1 a check failed, 2 invalid config or usage"),
    "ssh": ("log in to a node (default: the master) with its pinned host key, or run one "
            "command there", "ssh's own exit status (255: ssh failed), 2 invalid config, "
                             "usage or unknown node"),
    "exec": ("run a command on every node of a role in parallel, each output line "
             "prefixed by the node",
             "0 every node exited 0, 1 a node failed or was not reached, 2 invalid config "
             "or usage"),
    "put": ("copy a local file to every node of a role (atomic: temporary name, rename)",
            "0 copied to every node, 1 a node failed, 2 invalid config or usage"),
    "get": ("fetch a file from every node of a role into LOCALDIR/<node>/",
            "0 fetched from every node, 1 a node failed, 2 invalid config or usage"),
    "tunnel": ("hold an SSH tunnel to the master's Disco web UI open in the foreground",
               "ssh's own exit status once the tunnel ends (255: ssh failed), 2 invalid "
               "config or usage"),
    "forget-host-key": ("forget an instance's pinned SSH host key (after it was really "
                        "rebuilt)", "0 forgotten or none was pinned, 2 invalid config or "
                                    "instance id"),
    "bundle": ("assemble a Disco source bundle (DISCO_SOURCE) from upstream at the pinned "
               "commits and print its sha256", "0 written, 1 a fetch or check failed"),
    "sandbox": ("run a local EC2 endpoint with a spot market and real SSH nodes (Linux, "
                "root), and write a ready config", "0 stopped cleanly, 1 failed, "
                                                   "2 usage"),
}
#: commands whose words after `--` are a remote command, not options
REMOTE_COMMANDS = ("ssh", "exec")
ENTRY_POINTS = {"create_config.py": "init", "create_cluster.py": "up"}


class UsageError(Exception):
    """A command-line mistake: exit 2, nothing changed."""


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (which command, what is wrong, where help is), exit 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_INVALID, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default shown (unless its help names it, or it is a plain switch);
    descriptions and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or any(action.default is d for d in (None, False, argparse.SUPPRESS))
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _command_parser(commands: Any, name: str) -> argparse.ArgumentParser:
    line, codes = COMMAND_HELP[name]
    return commands.add_parser(name, help=line, **_texts(name, line, codes))


def _texts(name: str, line: str, codes: str) -> dict[str, Any]:
    return {"description": line[0].upper() + line[1:] + ".",
            "epilog": f"exit codes: {codes}", "formatter_class": _Formatter}


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the cluster's JSON config file")


def _json_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def _role_args(parser: argparse.ArgumentParser, as_user: bool = True) -> None:
    parser.add_argument("--role", choices=remote.ROLES, default="all",
                        help="which nodes: the master, the slaves or all of them")
    if as_user:
        parser.add_argument("--as", dest="as_user", choices=["disco"], default=None,
                            help="act as the config's DISCO_USER instead of SSH_USER")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on a node after SECONDS (default: no limit)")


def _args_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schema", action="store_true",
                   help="print the config's JSON Schema instead, to save as "
                        "disposabledisco.schema.json next to the config for your editor")


def _args_validate(p: argparse.ArgumentParser) -> None:
    _config_arg(p)


def _args_up(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--wait", action="store_true",
                   help="repeat passes until converged (or --timeout)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help=f"with --wait: give up after SECONDS (default: {DEFAULT_WAIT_TIMEOUT})")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    _json_arg(p, "the pass report (with --wait: the last pass)")
    p.add_argument("--ec2-only", action="store_true",
                   help="converge EC2 only (bids, tags, scaling, cleanup); no SSH to nodes")


def _args_status(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--all", action="store_true",
                   help="also list ended requests and terminated instances (history; they "
                        "cost nothing)")
    _json_arg(p, "every node (live and ended) with its state, address and prices, and the "
                 "cost against on-demand")


def _args_down(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be cancelled and terminated, change nothing")
    _json_arg(p, "the pass report")


def _args_doctor(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--no-job", action="store_true",
                   help="skip the tiny word count over DDFS (the slowest check)")
    _json_arg(p, "every check with its status, detail and fix")


def _args_ssh(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("node", metavar="NODE", nargs="?", default="master",
                   help="instance id, short name (ip-10-0-0-4), address or master")
    p.usage = "%(prog)s [-h] CONFIG [NODE] [-- COMMAND...]"


def _args_exec(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    _role_args(p)
    _json_arg(p, "per-node exit code, stdout and stderr")
    p.usage = ("%(prog)s [-h] CONFIG [--role {master,slaves,all}] [--as disco] "
               "[--timeout SECONDS] [--json] -- COMMAND...")


def _args_put(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("local", metavar="LOCAL", help="the local file to copy")
    p.add_argument("remote", metavar="REMOTE",
                   help="its path on the nodes (relative: from the user's home; ending in "
                        "/: a folder, the file keeps its name)")
    _role_args(p)
    _json_arg(p, "per-node results")


def _args_get(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("remote", metavar="REMOTE",
                   help="the file on the nodes (relative: from the user's home)")
    p.add_argument("local_dir", metavar="LOCALDIR",
                   help="each node's copy goes to LOCALDIR/<node>/<file name>")
    _role_args(p)
    _json_arg(p, "per-node results")


def _args_tunnel(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--port", type=int, default=None, metavar="PORT",
                   help="local port (default: the config's DISCO_PORT)")


def _args_forget(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("instance_id", metavar="INSTANCE_ID", help="e.g. i-0123456789abcdef0")


def _args_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="where to write the .tar.gz bundle")
    from .disco_source import DEFAULT_BASE_URL
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, metavar="URL",
                   help="fetch each pinned repository from URL/<owner>/<name>")


def _args_sandbox(sandbox: argparse.ArgumentParser) -> None:
    sandbox.add_argument("--dir", default="sandbox", help="where the config, key and state go")
    sandbox.add_argument("--slaves", type=int, default=3, help="NUM_SLAVES of the config")
    sandbox.add_argument("--port", type=int, default=0, help="endpoint port (0: any free one)")
    sandbox.add_argument("--interruption-rate", type=float, default=0.0, metavar="P",
                         help="chance per running spot instance per minute to be interrupted")
    sandbox.add_argument("--price-volatility", type=float, default=0.0, metavar="V",
                         help="size of the spot price's random steps (0.1 = ±10%%)")
    sandbox.add_argument("--spot-price", type=float, default=0.03, metavar="USD",
                         help="starting spot price per hour (the config bids 0.10)")
    sandbox.add_argument("--capacity", action="append", default=[], metavar="TYPE=N",
                         help="at most N spot instances of TYPE (0 = an outage); repeatable")
    sandbox.add_argument("--fulfil-delay", type=float, default=3.0, metavar="SECONDS",
                         help="simulated seconds before a spot request is fulfilled")
    sandbox.add_argument("--seed", type=int, default=0, help="seed of the simulated market")
    sandbox.add_argument("--network", default="127.42.0.0/16", metavar="CIDR",
                         help="loopback VPC for the instances (inside 127.0.0.0/8)")
    sandbox.add_argument("--demo", action="store_true",
                         help="run the whole story (up --wait, status, doctor, an interruption "
                              "healed, down) against the sandbox, then stop")
    sandbox.add_argument("--disco-source", type=_disco_bundle, default=None, metavar="PATH",
                         help="a Disco source bundle: the config installs real Disco from it "
                              "(DISCO_INSTALL source); with --demo: 1 master + 2 slaves, a "
                              "word count through the printed client line, checked, while a "
                              "slave is interrupted")


def _disco_bundle(value: str) -> Any:
    """--disco-source must name a file (a Path): refused before any EC2 call or node start."""
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a file: give the path of a Disco source bundle "
            "(disposabledisco bundle OUT makes one)")
    return path


ARGUMENTS: dict[str, Any] = {
    "init": _args_init, "validate": _args_validate, "up": _args_up, "status": _args_status,
    "down": _args_down, "doctor": _args_doctor, "ssh": _args_ssh, "exec": _args_exec,
    "put": _args_put, "get": _args_get, "tunnel": _args_tunnel,
    "forget-host-key": _args_forget, "bundle": _args_bundle, "sandbox": _args_sandbox,
}


def build_parser(entry: str | None = None) -> argparse.ArgumentParser:
    """The `disposabledisco` parser, or with ``entry`` (create_config.py,
    create_cluster.py) the parser of that script's one command under its own name."""
    if entry is not None:
        command = ENTRY_POINTS[entry]
        line, codes = COMMAND_HELP[command]
        parser = _Parser(prog=entry, **_texts(command, line, codes))
        ARGUMENTS[command](parser)
        parser.set_defaults(command=command)
        return parser
    parser = _Parser(
        prog="disposabledisco", formatter_class=_Formatter,
        description="Keep a disposable Disco cluster on EC2 spot instances converged to a "
                    "JSON config, and use it.",
        epilog="`disposabledisco COMMAND --help` describes each command, its arguments, "
               "defaults and exit codes.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)
    for name, add_arguments in ARGUMENTS.items():
        add_arguments(_command_parser(commands, name))
    return parser


def _split_remote(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """For ssh/exec: the words before the first `--` and the remote command after it
    (None without `--`). A missing remote command is refused here, before parsing and
    before the config is read."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in REMOTE_COMMANDS:
        return argv, None
    given = "--" in argv
    cut = argv.index("--") if given else len(argv)
    before, after = argv[:cut], argv[cut + 1:]
    if not after and not {"-h", "--help"} & set(before):
        if command == "exec":
            raise UsageError("exec needs the command after `--`, e.g. disposabledisco exec "
                             "CONFIG -- uname -a")
        if given:
            raise UsageError("nothing after `--`: give the command to run, or drop the `--`")
    return before, after if given else None


def main(argv: Sequence[str] | None = None, entry: str | None = None) -> int:
    """Entry point; returns the exit code. ``entry`` names a script that runs one command
    (create_config.py, create_cluster.py) so its usage and help carry its own name."""
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        words, remote_words = _split_remote(words) if entry is None else (words, None)
    except UsageError as error:  # before parsing: --json is only a word yet
        return _fail(argparse.Namespace(json="--json" in words), f"disposabledisco: {error}",
                     EXIT_INVALID)
    parser = build_parser(entry)
    try:
        args = parser.parse_args(words)
    except SystemExit as stop:
        return int(stop.code or 0)
    args.remote_command = remote_words
    try:
        return _run(args)
    except BootstrapError as error:
        return _fail(args, f"{args.config}: {error}; fix DISCO_TARBALL or the file",
                     EXIT_INVALID)
    except ConfigError as error:
        return _fail(args, [_config_line(getattr(args, "config", None), p)
                            for p in error.problems], EXIT_INVALID)
    except (UsageError, remote.RemoteError) as error:
        return _fail(args, f"disposabledisco: {error}", EXIT_INVALID)
    except LockHeld as error:
        return _fail(args, f"disposabledisco: {error}", EXIT_LOCKED)
    except (AwsError, SshError) as error:
        return _fail(args, f"disposabledisco: {error}", EXIT_FAILED)
    except KeyboardInterrupt:
        print("\ndisposabledisco: interrupted; run again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _config_line(path: str | None, problem: str) -> str:
    """A config problem as `FILE: sentence`, the file named once in front (problems that
    start with it, or say "config file FILE", are not given it twice)."""
    if path is None or problem.startswith(f"{path}: "):
        return problem
    return f"{path}: {problem.replace(f'config file {path} ', 'the config file ', 1)}"


def _fail(args: argparse.Namespace, lines: str | list[str], code: int) -> int:
    """Errors on stderr; with --json also one JSON object on stdout (so a script that
    reads stdout always gets JSON)."""
    lines = [lines] if isinstance(lines, str) else lines
    for line in lines:
        print(line, file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_code": code, "errors": lines}, indent=2))
    return code


def _run(args: argparse.Namespace) -> int:
    if args.command == "init":
        from .init import init_notes, render_default_config
        if args.schema:  # saved next to a config, where its relative "$schema" finds it
            sys.stdout.write(schema_text())
            return EXIT_CONVERGED
        fresh = default_config()
        sys.stdout.write(render_default_config(fresh))
        for note in init_notes(fresh):
            print(note, file=sys.stderr)
        return EXIT_CONVERGED
    if args.command == "sandbox":
        return cmd_sandbox(args)
    if args.command == "bundle":
        return cmd_bundle(args)
    config = load_config(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.command == "validate":
        print(f"{args.config}: valid ({plural(1 + config.desired_slaves, 'node')}, "
              f"tag key {config.tag_key!r})")
        return EXIT_CONVERGED
    if args.command == "up" and args.timeout is not None and not args.wait:
        raise UsageError("--timeout only goes with --wait: add --wait or drop --timeout")
    if carried := carry_over_pins(config):
        print(f"carried {plural(carried, 'pinned host key')} over from "
              f"{config.legacy_state_dir} to {config.state_dir}", file=sys.stderr)
    if args.command == "forget-host-key":  # only touches a pin: no EC2 call to prepare
        return cmd_forget(config, args)
    desired_state(config)  # reads a local DISCO_TARBALL: fail before any EC2 call
    stale = sandbox_not_running(args.config, config.endpoint_url)
    if stale:  # a stale sandbox.json: say so now, not after botocore's long retries
        return _fail(args, f"disposabledisco: {stale}", EXIT_FAILED)
    _region_note(config)
    return COMMANDS[args.command](config, args)


def _region_note(config: Config) -> None:
    """Say so when no region was set anywhere and the EC2 calls go to us-east-1 only
    because that is the fallback (a cluster in another region would look empty)."""
    if config.region_is_fallback and not config.endpoint_url:
        print(f"note: REGION is not set and neither AWS_REGION, AWS_DEFAULT_REGION nor the "
              f"AWS profile names a region, so {config.region} is used (the fallback); set "
              "REGION to choose", file=sys.stderr)


def node_worker(config: Config, ec2: Ec2Gateway) -> NodeWorker:
    """The SSH side of a pass: bootstrap, join, membership."""
    from .provision import make_provisioner
    return make_provisioner(config, ec2)


def _emit(args: argparse.Namespace, report: PassReport, config: Config,
          verdict: str | None) -> None:
    """Print one pass (the verdict line only when given), plus at most one stderr line
    about what is not ours."""
    warning = foreign_warning(config, report.cluster)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(pass_json(report), indent=2, sort_keys=True), flush=True)
        return
    text = render_pass(report, verdict)
    if text:
        print(text, flush=True)


def _hint(config: Config, report: PassReport) -> None:
    """How to use the cluster, once its master runs (never for --json or a dry run)."""
    remote.write_known_hosts(config, remote.reachable(config, report.cluster))
    hint = access_hint(config, report.cluster, disco=report.converged)
    if hint:
        print(hint, flush=True)


def cmd_up(config: Config, args: argparse.Namespace) -> int:
    ec2 = Ec2Gateway(config)
    if args.dry_run:
        report = run_pass(config, ec2, None, dry_run=True)
        _emit(args, report, config, dry_run_verdict(report, "up"))
        return report.exit_code
    timeout = args.timeout if args.timeout is not None else DEFAULT_WAIT_TIMEOUT
    started = time.monotonic()
    deadline = started + timeout
    delay = 1.0
    status = StatusLine(sys.stderr)
    with cluster_lock(config.state_dir):
        workers = None if args.ec2_only else node_worker(config, ec2)
        while True:
            report = run_pass(config, ec2, workers)
            code = report.exit_code
            final = (not args.wait or code == EXIT_CONVERGED or _permanent(report)
                     or _parked_only(report) or time.monotonic() >= deadline)
            status.clear()
            if not final:
                if not args.json and any(not r.skipped for r in report.results):
                    # what this pass did; the status line says what is awaited
                    print(render_pass(report, None, waiting=False), flush=True)
                status.show(f"waiting {time.monotonic() - started:.0f} s of {timeout:g} s: "
                            f"{waiting_text(report) or 'next pass'}")
                time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
                delay = min(delay * 1.5, 15.0)
                continue
            elapsed = time.monotonic() - started
            _emit(args, report, config, up_verdict(report, args.wait, elapsed, timeout))
            if not args.json and code != EXIT_FAILED:
                _hint(config, report)
            if args.json and args.wait and code == EXIT_PROGRESSING:
                print(f"disposabledisco: not converged after {elapsed:.1f} s (--timeout "
                      f"{timeout:g}); run again to continue", file=sys.stderr)
            return code


class StatusLine:
    """One line that updates in place on a terminal; plain lines (only when the text
    changes) otherwise, so a log file is not flooded."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def show(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\033[K" + text[:width])
            self.stream.flush()
            return
        core = text.split(": ", 1)[-1]
        if core != self.last:
            self.stream.write(text + "\n")
            self.stream.flush()
        self.last = core

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _permanent(report: PassReport) -> bool:
    """A failure that another pass will not fix by itself: EC2 refused a create, or a node
    failed for the config's fault, a changed host key or something planted on it."""
    if report.plan.problems:
        return True
    return any(not r.ok and (r.action.mutates_ec2 or r.needs_the_operator)
               for r in report.results)


def _parked_only(report: PassReport) -> bool:
    """Nothing to do or await but parked capacity pools (minutes away): `--wait` stops
    instead of polling EC2 until then; the report says when to run again."""
    return bool(report.plan.notes) and not report.did_something and not waiting_text(report)


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    ec2 = Ec2Gateway(config)
    cluster = observe(config, ec2)
    prices = spot_prices(ec2, cluster)
    parked = parked_pools(config)
    on_demand = on_demand_prices(config, {n.instance_type for n in cluster.nodes if billed(n)})
    if args.json:
        print(json.dumps({"nodes": [node_json(n, prices, on_demand) for n in cluster.nodes],
                          "foreign": [foreign_json(f) for f in cluster.foreign],
                          "cost": cost_json(config, cluster, prices, on_demand=on_demand),
                          "parked": [p.to_json() for p in parked]},
                         indent=2, sort_keys=True))
    else:
        print(status_table(config, cluster, prices, show_all=args.all, on_demand=on_demand,
                           parked=parked))
    live = [n for n in cluster.nodes if n.is_live]
    ready = len(live) == 1 + config.desired_slaves and all(n.state == "ready" for n in live)
    return EXIT_CONVERGED if ready else EXIT_PROGRESSING


def spot_prices(ec2: Ec2Gateway, cluster: Cluster) -> dict[str, float]:
    """The current spot price per instance type of the live spot nodes (no EC2 call when
    there is none); empty when EC2 will not say (the table then shows the bid as the most
    a node may cost)."""
    types = {n.instance_type for n in cluster.nodes if n.is_live and n.market == "spot"}
    try:
        return ec2.spot_prices(types)
    except AwsError as error:
        print(f"note: current spot prices unknown ({error})", file=sys.stderr)
        return {}


def cmd_down(config: Config, args: argparse.Namespace) -> int:
    ec2 = Ec2Gateway(config)
    if args.dry_run:
        report = run_pass(config, ec2, None, dry_run=True, down=True)
        _emit(args, report, config, dry_run_verdict(report, "down"))
        return report.exit_code
    with cluster_lock(config.state_dir):
        preview = run_pass(config, ec2, None, dry_run=True, down=True)
        if not preview.plan.actions:
            if args.json:
                _emit(args, preview, config, None)
            else:
                print("nothing to take down")
            return EXIT_CONVERGED
        if not args.yes:
            _confirm(config, preview)
        report = run_pass(config, ec2, None, down=True)
        if report.failed:
            code = EXIT_FAILED
        else:
            check = run_pass(config, ec2, None, dry_run=True, down=True)
            code = EXIT_CONVERGED if not check.plan.actions else EXIT_PROGRESSING
        _emit(args, report, config, DOWN_VERDICTS[code])
        return code


def _confirm(config: Config, preview: PassReport) -> None:
    if not sys.stdin.isatty():
        raise UsageError("down asks before it destroys anything: add --yes to run it "
                         "without a terminal")
    print(render_pass(preview, None))
    answer = input(f"Take down cluster {config.tag_key!r}? Type 'yes': ").strip().lower()
    if answer != "yes":
        raise UsageError("down cancelled; nothing changed")


def cmd_doctor(config: Config, args: argparse.Namespace) -> int:
    from .doctor import doctor_cluster
    report = doctor_cluster(config, Ec2Gateway(config), job=not args.no_job)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.to_text())
    return EXIT_CONVERGED if report.ok else EXIT_FAILED


def cmd_sandbox(args: argparse.Namespace) -> int:

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
                             seed=args.seed, network=str(network),
                             disco_source=args.disco_source)
    try:
        return demo(options) if args.demo else serve(options)
    except SandboxError as error:
        print(f"disposabledisco: {error}", file=sys.stderr)
        return EXIT_FAILED


def _cluster(config: Config) -> tuple[Ec2Gateway, Cluster]:
    ec2 = Ec2Gateway(config)
    return ec2, observe(config, ec2)


def cmd_ssh(config: Config, args: argparse.Namespace) -> int:
    ec2, cluster = _cluster(config)
    node = remote.find_node(config, cluster, args.node)
    return _exec_ssh(config, ec2, cluster, node,
                     remote.ssh_argv(config, node, args.remote_command or ()))


def _exec_ssh(config: Config, ec2: Ec2Gateway, cluster: Cluster, node: Node,
              argv: list[str]) -> int:
    """Replace this process with the system ssh, the node's key pinned beforehand."""
    remote.ensure_pinned(config, ec2, node)
    remote.write_known_hosts(config, remote.reachable(config, cluster))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        raise UsageError(f"cannot run {argv[0]} ({error.strerror}): install the OpenSSH "
                         "client (apt-get install openssh-client)") from error
    return EXIT_FAILED  # not reached: execvp only returns by raising


def cmd_tunnel(config: Config, args: argparse.Namespace) -> int:
    ec2, cluster = _cluster(config)
    node = remote.select_role(config, cluster, "master")[0]
    port = args.port or config["DISCO_PORT"]
    print(tunnel_text(config, node, port), flush=True)
    return _exec_ssh(config, ec2, cluster, node, remote.tunnel_argv(config, node, port))


def _as_user(config: Config, args: argparse.Namespace) -> str | None:
    return config["DISCO_USER"] if args.as_user else None


def cmd_exec(config: Config, args: argparse.Namespace) -> int:
    ec2, cluster = _cluster(config)
    nodes = remote.select_role(config, cluster, args.role)
    show = None if args.json else (lambda run: remote.print_run(run, sys.stdout, sys.stderr))
    runs = remote.run_everywhere(config, ec2, nodes, args.remote_command,
                                 _as_user(config, args), args.timeout, show)
    return _finish(args, runs, "exited 0")


def _finish(args: argparse.Namespace, runs: list[remote.NodeRun], what: str,
            file_verb: str | None = None) -> int:
    """The summary (or the JSON of every node); for put/get (``file_verb``) first one line
    per node: the file it wrote, or why not."""
    ok = all(r.exit_code == 0 for r in runs)
    if file_verb is not None and not args.json:
        for run in runs:
            if run.exit_code == 0:
                print(f"{run.node}: {file_verb}{run.stdout}")
            remote.print_run(dataclasses.replace(run, stdout=""), sys.stdout, sys.stderr)
    line = remote.summary(runs, what)
    if args.json:
        print(json.dumps({"ok": ok, "summary": line, "nodes": [r.to_json() for r in runs]},
                         indent=2))
    else:
        print(line)
    return EXIT_CONVERGED if ok else EXIT_FAILED


def cmd_put(config: Config, args: argparse.Namespace) -> int:
    local = Path(args.local)
    if not local.is_file():
        raise UsageError(f"LOCAL {args.local} is not a file: give the path of a file to copy")
    ec2, cluster = _cluster(config)
    nodes = remote.select_role(config, cluster, args.role)
    runs = remote.put(config, ec2, nodes, local, args.remote, _as_user(config, args),
                      args.timeout)
    return _finish(args, runs, "copied", "wrote ")


def cmd_get(config: Config, args: argparse.Namespace) -> int:
    ec2, cluster = _cluster(config)
    nodes = remote.select_role(config, cluster, args.role)
    runs = remote.get(config, ec2, nodes, args.remote, Path(args.local_dir),
                      _as_user(config, args), args.timeout)
    return _finish(args, runs, "fetched", "")


def cmd_forget(config: Config, args: argparse.Namespace) -> int:
    existed, path = remote.forget_host_key(config, args.instance_id)
    if not existed:
        print(f"no host key is pinned for {args.instance_id} ({path} does not exist); "
              "nothing changed")
        return EXIT_CONVERGED
    print(f"forgot the pinned host key of {args.instance_id} (removed {path}); "
          f"{remote.after_forget(config, args.instance_id)}")
    return EXIT_CONVERGED


def cmd_bundle(args: argparse.Namespace) -> int:

    from .disco_source import BundleError, assemble_bundle
    try:
        digest = assemble_bundle(Path(args.out), args.base_url)
    except (BundleError, OSError) as error:
        print(f"disposabledisco: bundle: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{digest}  {args.out}")
    return EXIT_CONVERGED


COMMANDS: dict[str, Any] = {"up": cmd_up, "status": cmd_status, "down": cmd_down,
                            "doctor": cmd_doctor, "ssh": cmd_ssh, "exec": cmd_exec,
                            "put": cmd_put, "get": cmd_get, "tunnel": cmd_tunnel}


if __name__ == "__main__":
    raise SystemExit(main())
