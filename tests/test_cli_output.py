"""What the CLI prints is true for the command that printed it: verdict lines, `--wait`'s
budget, `status` (live by default, history with --all, what it costs), help texts, JSON
errors, plurals. The real CLI against the local EC2 endpoint (--ec2-only: no SSH)."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disposabledisco import cli as cli_module
from disposabledisco.cli import COMMAND_HELP
from disposabledisco.config import load_config
from tests.cli_capture import cli

REPO = Path(__file__).resolve().parents[1]
RUN_AGAIN = "run again (or use --wait)"


# ------------------------------------------------------------------------- verdicts
def test_progressing_line_only_where_true(write_config) -> None:
    path = str(write_config(NUM_SLAVES=1))
    code, out, _ = cli("up", path, "--ec2-only", "--dry-run")
    assert code == 10 and RUN_AGAIN not in out and "progressing" not in out
    assert out.rstrip().endswith("nothing was changed: run `up` without --dry-run to do this")

    code, out, _ = cli("up", path, "--ec2-only")
    assert code == 10
    assert out.rstrip().splitlines()[-1] == f"progressing: {RUN_AGAIN} until converged"

    code, out, _ = cli("down", path, "--dry-run")
    assert RUN_AGAIN not in out and "run `down` without --dry-run" in out
    code, out, err = cli("down", path, "--yes")
    assert RUN_AGAIN not in out and "progressing" not in out, out
    assert (code, out.rstrip().splitlines()[-1]) in (
        (0, "down: done; no spot request is open and no instance of the cluster is left"),
        (10, "down: requests cancelled and instances told to terminate; some are still "
             "shutting down (run `down` again to check)"))


def test_wait_uses_the_whole_timeout_and_reports_the_real_elapsed_time(write_config) -> None:
    """--ec2-only never converges (nodes wait for bootstrap): the wait must last the whole
    budget, say so once with the measured time, and never tell to "run again" per pass."""
    path = str(write_config(NUM_SLAVES=1))
    started = time.monotonic()
    code, out, err = cli("up", path, "--ec2-only", "--wait", "--timeout", "4")
    took = time.monotonic() - started
    assert code == 10
    assert 4 <= took < 12, took
    assert RUN_AGAIN not in out
    said = re.findall(r"not converged after (\d+\.\d) s \(--timeout 4\)", out)
    assert len(said) == 1 and 4 <= float(said[0]) <= took + 0.05, out  # .1f rounds
    waiting = [ln for ln in err.splitlines() if ln.startswith("waiting ")]
    assert waiting and all(re.match(r"waiting \d+ s of 4 s: ", ln) for ln in waiting), err
    assert len(waiting) == len({ln.split(": ", 1)[1] for ln in waiting})  # only changes


# ------------------------------------------------------------------------- status
def market_cluster(write_config, spot_market, slaves: int) -> str:
    """A cluster of 1 + ``slaves`` spot nodes fulfilled by the simulated market (which,
    like EC2, keeps ended requests visible for a while)."""
    spot_market.fulfil_delay = 0
    path = str(write_config(NUM_SLAVES=slaves))
    for _ in range(4):
        cli("up", path, "--ec2-only")
        spot_market.tick(1)
    return path


def test_status_shows_live_nodes_and_history_only_with_all(write_config, spot_market,
                                                           calls) -> None:
    path = market_cluster(write_config, spot_market, 2)
    code, out, _ = cli("status", path)
    rows = [ln for ln in out.splitlines() if ln.startswith(("master", "slave"))]
    assert len(rows) == 3 and "ended" not in out and "not shown" not in out
    assert cli("down", path, "--yes")[0] in (0, 10)

    calls.clear()
    code, out, _ = cli("status", path)
    print("status EC2 calls, nothing live:", calls)
    assert "DescribeSpotPriceHistory" not in calls  # no live spot node: no price to show
    assert [ln for ln in out.splitlines() if ln.startswith(("master", "slave"))] == []
    assert "3 ended requests or instances not shown (not billed): --all lists them" in out
    assert "cost: nothing is billed now (no instance is running)" in out
    code, out, _ = cli("status", path, "--all")
    rows = [ln for ln in out.splitlines() if ln.startswith(("master", "slave"))]
    assert len(rows) >= 3 and all("ended: no instance, not billed" in r for r in rows), out
    assert not [r for r in rows if "running" in r] and "not shown" not in out


def test_status_costs_at_the_current_spot_price(write_config, spot_market, calls) -> None:
    spot_market.set_price("m5.large", 0.0312)
    path = market_cluster(write_config, spot_market, 3)
    calls.clear()
    code, out, _ = cli("status", path)
    print("status EC2 calls:", calls)
    assert calls.count("DescribeSpotPriceHistory") == 1, calls  # one call for every type
    rows = [ln for ln in out.splitlines() if ln.startswith(("master", "slave"))]
    assert len(rows) == 4 and all("0.0312/h (bid 0.10)" in r for r in rows), out
    assert "cost: 4 billed nodes, 0.1248 USD/hour at current spot prices" in out
    assert "at most 0.40 USD/hour for the spot nodes (your bids)" in out
    code, out, _ = cli("status", path, "--json")
    report = json.loads(out)
    assert report["cost"]["billed_nodes"] == 4
    assert report["cost"]["usd_per_hour_now"] == pytest.approx(0.1248)
    assert {n["spot_price_now"] for n in report["nodes"] if n["billed"]} == {0.0312}


# ------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", sorted(COMMAND_HELP))
def test_every_command_help_repeats_its_line_and_exit_codes(command: str) -> None:
    code, out, _ = cli(command, "--help")
    line, codes = COMMAND_HELP[command]
    flat = " ".join(out.split())
    assert code == 0
    assert out.startswith(f"usage: disposabledisco {command}")
    assert line[1:] in flat and f"exit codes: {codes}" in flat


@pytest.mark.parametrize("command", ["status", "down", "doctor", "up"])
def test_json_and_dry_run_are_documented(command: str) -> None:
    flat = " ".join(cli(command, "--help")[1].split())
    assert re.search(r"--json print .+ as JSON on stdout", flat), flat
    if command in ("down", "up"):
        assert re.search(r"--dry-run print .*change nothing", flat), flat


def test_defaults_are_shown() -> None:
    flat = " ".join(cli("up", "--help")[1].split())
    assert "give up after SECONDS (default: 1800)" in flat
    flat = " ".join(cli("exec", "--help")[1].split())
    assert "(default: all)" in flat
    flat = " ".join(cli("sandbox", "--help")[1].split())
    assert "--seed SEED seed of the simulated market (default: 0)" in flat


@pytest.mark.parametrize("script, usage", [("create_config.py", "usage: create_config.py"),
                                           ("create_cluster.py", "usage: create_cluster.py")])
def test_scripts_name_themselves_in_help_and_errors(script: str, usage: str) -> None:
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(usage), done.stdout
    assert "disposabledisco init" not in done.stdout.split("\n")[0]
    done = subprocess.run([sys.executable, script, "--bogus", "x.json"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(f"{script}: unrecognized")
    assert len(done.stderr.splitlines()) == 1


# ------------------------------------------------------------------------- errors
def test_config_errors_name_the_file_once_and_json_gets_an_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"AMI": "ami-1", "TAG_KEY": "x", "KEY_NAME": "k"}))
    code, out, err = cli("up", str(path), "--json")
    assert code == 2
    assert err and all(line.count(str(path)) == 1 for line in err.splitlines()), err
    report = json.loads(out)
    assert report["ok"] is False and report["exit_code"] == 2
    assert report["errors"] == err.splitlines()
    code, out, err = cli("status", str(path))
    assert code == 2 and out == ""
    missing = tmp_path / "none.json"
    code, _, err = cli("validate", str(missing))
    assert code == 2 and err.startswith(f"{missing}: the config file does not exist; "), err


def test_forget_host_key_needs_no_ec2_endpoint(write_config, calls) -> None:
    """forget-host-key only removes a pin: a config whose sandbox endpoint is gone must
    not stop it (nor must it probe the endpoint or call EC2)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    path = str(write_config(ENDPOINT_URL=closed))
    assert cli("status", path)[0] == 1  # the stale endpoint is said for an EC2 command
    code, out, err = cli("forget-host-key", path, "i-0123456789abcdef0")
    assert (code, err) == (0, ""), err
    assert out.startswith("no host key is pinned for i-0123456789abcdef0") and calls == []


@pytest.mark.parametrize(("argv", "says"), [
    (["exec", "missing.json"], "exec needs the command after `--`"),
    (["exec", "missing.json", "--"], "exec needs the command after `--`"),
    (["ssh", "missing.json", "master", "--"], "nothing after `--`"),
])
def test_a_missing_remote_command_is_refused_before_the_config_is_read(argv, says) -> None:
    code, out, err = cli(*argv)
    assert (code, out) == (2, "") and says in err and "missing.json" not in err, err


def test_validate_says_node_in_plain_english(write_config) -> None:
    path = str(write_config(NUM_SLAVES=0))
    assert cli("validate", path)[1].startswith(f"{path}: valid (1 node, tag key")
    path = str(write_config(NUM_SLAVES=3))
    assert cli("validate", path)[1].startswith(f"{path}: valid (4 nodes, tag key")


def test_region_fallback_is_said(write_config, monkeypatch, capsys, tmp_path) -> None:
    path = write_config(ENDPOINT_URL=None, REGION=None)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_EC2", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "aws-config").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    cli_module._region_note(load_config(path))
    err = capsys.readouterr().err
    assert "REGION is not set" in err and "us-east-1 is used (the fallback)" in err
    (tmp_path / "aws-config").write_text("[default]\nregion = sa-east-1\n")
    cli_module._region_note(load_config(path))
    assert capsys.readouterr().err == ""  # the profile names one
    (tmp_path / "aws-config").write_text("")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    cli_module._region_note(load_config(path))
    assert capsys.readouterr().err == ""


def test_bundle_failure_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out_file = tmp_path / "disco.tar.gz"
    code, out, err = cli("bundle", str(out_file), "--base-url", f"file://{tmp_path}/none")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("disposabledisco: bundle: "), err
    assert str(tmp_path / "none") in err
    assert not out_file.exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_waiting_line_updates_in_place_on_a_terminal_and_only_changes_elsewhere() -> None:
    tty, log = _Terminal(), io.StringIO()
    for stream in (tty, log):
        line = cli_module.StatusLine(stream)
        for elapsed in (1, 2):
            line.show(f"waiting {elapsed} s of 9 s: slave i-1 open")
        line.show("waiting 3 s of 9 s: slave i-1 pending")
        line.clear()
    assert tty.getvalue().count("\n") == 0 and tty.getvalue().count("\r\033[K") == 4
    assert tty.getvalue().endswith("pending\r\033[K")
    assert log.getvalue() == ("waiting 1 s of 9 s: slave i-1 open\n"
                              "waiting 3 s of 9 s: slave i-1 pending\n")
