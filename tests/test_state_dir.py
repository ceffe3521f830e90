"""STATE_DIR: one folder per cluster *and* region/endpoint, owned by the caller, no links.

The lock, the token book and pinned host keys live there; a folder shared between two
clusters, or a link planted in it, would make one run block, or write through, another.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest

from disposabledisco import statefiles
from disposabledisco.cli import main
from disposabledisco.config import load_config, parse_config
from disposabledisco.hostkeys import HostKey, HostKeyStore
from disposabledisco.joins import JoinBook
from disposabledisco.lock import LockHeld, cluster_lock
from disposabledisco.statefiles import StateFileError
from disposabledisco.tokens import TokenBook

BASE = {"AMI": "ami-0abcdef1234567890", "KEY_NAME": "k", "TAG_KEY": "disco-same"}
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
ENV_KEYS = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No region, profile or endpoint from the caller's environment or ~/.aws."""
    for name in ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    return monkeypatch


def config(tmp_path, **values):
    return parse_config({**BASE, "STATE_DIR": str(tmp_path / "state"), **values})


# --------------------------------------------------------------------------- per region


def test_same_tag_key_in_two_regions_gets_two_folders_and_two_locks(tmp_path, clean_env):
    east = config(tmp_path, REGION="us-east-1")
    west = config(tmp_path, REGION="eu-west-1")
    assert east.state_dir != west.state_dir
    assert east.state_dir.parent == west.state_dir.parent == tmp_path / "state"
    assert east.state_dir.name == "disco-same@us-east-1"
    with cluster_lock(east.state_dir):
        with cluster_lock(west.state_dir):  # would raise LockHeld if they shared one
            pass
        with pytest.raises(LockHeld), cluster_lock(config(tmp_path, REGION="us-east-1").state_dir):
            pass


def test_region_comes_from_the_environment_then_the_profile_then_us_east_1(tmp_path,
                                                                            clean_env):
    assert config(tmp_path).region == "us-east-1" and config(tmp_path).region_is_fallback
    (tmp_path / "aws-config").write_text("[profile lab]\nregion = ap-south-1\n"
                                         "[default]\nregion = sa-east-1\n")
    assert config(tmp_path).region == "sa-east-1"
    assert not config(tmp_path).region_is_fallback
    assert config(tmp_path, AWS_PROFILE="lab").region == "ap-south-1"
    clean_env.setenv("AWS_PROFILE", "lab")
    assert config(tmp_path).region == "ap-south-1"
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    assert config(tmp_path).region == "eu-north-1"
    clean_env.setenv("AWS_REGION", "eu-south-1")
    assert config(tmp_path).region == "eu-south-1"
    assert config(tmp_path, REGION="us-west-2").region == "us-west-2"
    assert not config(tmp_path, REGION="us-east-1").region_is_fallback
    assert config(tmp_path).state_dir.name == "disco-same@eu-south-1"


def test_a_profile_region_costs_one_boto3_session_per_config(tmp_path, clean_env):
    """A pass reads config.region about 15 times (state folder, EC2 client, messages):
    each read must not build a boto3 session and parse ~/.aws/config again."""
    (tmp_path / "aws-config").write_text("[default]\nregion = sa-east-1\n")
    sessions = []

    class Counting(boto3.session.Session):
        def __init__(self, *args, **kwargs):
            sessions.append(kwargs.get("profile_name"))
            super().__init__(*args, **kwargs)

    clean_env.setattr(boto3.session, "Session", Counting)
    c = config(tmp_path)
    for _ in range(5):
        assert c.region == "sa-east-1" and c.state_dir.name == "disco-same@sa-east-1"
    assert sessions == [None]
    assert config(tmp_path, REGION="eu-west-1").region == "eu-west-1" and sessions == [None]


def test_an_endpoint_gets_its_own_folder(tmp_path, clean_env):
    aws = config(tmp_path, REGION="us-east-1").state_dir
    local = config(tmp_path, REGION="us-east-1", ENDPOINT_URL="http://127.0.0.1:5000")
    other = config(tmp_path, REGION="us-east-1", ENDPOINT_URL="http://127.0.0.1:5001")
    assert len({aws, local.state_dir, other.state_dir}) == 3
    assert local.endpoint_url == "http://127.0.0.1:5000"
    assert local.state_dir.name.startswith("disco-same@us-east-1+")
    clean_env.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:5000")
    from_env = config(tmp_path, REGION="us-east-1")
    assert from_env.endpoint_url == "http://127.0.0.1:5000"
    assert from_env.state_dir == local.state_dir
    clean_env.delenv("AWS_ENDPOINT_URL_EC2")
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5001")
    assert config(tmp_path, REGION="us-east-1").state_dir == other.state_dir
    clean_env.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert config(tmp_path, REGION="us-east-1").state_dir == aws


def test_state_dir_name_stays_short_for_the_longest_tag_key(tmp_path, clean_env):
    c = config(tmp_path, TAG_KEY="x/" * 64, REGION="us-gov-west-1",
               ENDPOINT_URL="http://127.0.0.1:5000")
    assert len(c.state_dir.name) < 200 and "/" not in c.state_dir.name


def test_a_run_in_another_region_is_not_blocked_by_the_lock(ec2_env, tmp_path):
    """The real CLI: while the us-east-1 cluster's lock is held, the same TAG_KEY in
    eu-west-1 runs (whatever EC2 answers there), and us-east-1 itself exits 75."""
    def write(name, region):
        path = tmp_path / name
        path.write_text(json.dumps({**BASE, "AMI": ec2_env.image_id,
                                    "KEY_NAME": ec2_env.key_name, "REGION": region,
                                    "STATE_DIR": str(tmp_path / "state"), "MGMT_KEY": "",
                                    "DISCO_INSTALL": "none"}))
        return path

    east, west = write("east.json", ec2_env.region), write("west.json", "eu-west-1")
    assert ec2_env.region != "eu-west-1"
    command = [sys.executable, "-m", "disposabledisco", "up", "--ec2-only"]
    with cluster_lock(load_config(east).state_dir):
        other = subprocess.run([*command, str(west)], capture_output=True, text=True,
                               timeout=120)
        same = subprocess.run([*command, str(east)], capture_output=True, text=True,
                              timeout=120)
    assert other.returncode != 75 and "holds the lock" not in other.stderr, other.stderr
    assert same.returncode == 75 and "holds the lock" in same.stderr


def test_validate_leaves_a_state_folder_a_concurrent_run_filled_to_it(tmp_path, clean_env,
                                                                       monkeypatch):
    """load_config tries to create a missing STATE_DIR and removes it again; when another
    run (another region's `up`) made its cluster folder inside meanwhile, the folder is
    theirs: no traceback, and it stays."""
    path = tmp_path / "config.json"
    state = tmp_path / "state"
    path.write_text(json.dumps({**BASE, "REGION": "us-east-1", "STATE_DIR": str(state)}))
    real_mkdir = os.mkdir

    def mkdir_then_the_other_run(folder, mode=0o777):
        real_mkdir(folder, mode)
        if Path(folder) == state:
            real_mkdir(state / "disco-same@eu-west-1", 0o700)

    monkeypatch.setattr(os, "mkdir", mkdir_then_the_other_run)
    assert load_config(path).state_dir == state / "disco-same@us-east-1"
    assert os.listdir(state) == ["disco-same@eu-west-1"]


# --------------------------------------------------------------------------- planted files


@pytest.fixture
def shared(tmp_path):
    """A STATE_DIR anyone may write to (like /tmp), with a file an attacker wants hit."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return folder, victim


def untouched(victim: Path) -> bool:
    return victim.read_text() == "precious\n" and victim.stat().st_nlink == 1


def test_a_planted_lock_link_is_refused_and_the_victim_untouched(tmp_path, shared, clean_env):
    folder, victim = shared
    c = config(tmp_path, STATE_DIR=str(folder), REGION="us-east-1")
    statefiles.ensure_dir(c.state_dir)
    (c.state_dir / "lock").symlink_to(victim)
    with pytest.raises(StateFileError) as info, cluster_lock(c.state_dir):
        pass
    assert str(c.state_dir / "lock") in str(info.value) and "symbolic link" in str(info.value)
    assert "STATE_DIR" in str(info.value) and untouched(victim)


def test_a_planted_lock_link_through_the_cli_exits_2(tmp_path, shared, ec2_env, capsys):
    folder, victim = shared
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "STATE_DIR": str(folder)}))
    state = load_config(path).state_dir
    statefiles.ensure_dir(state)
    (state / "lock").symlink_to(victim)
    calls: list[str] = []
    ec2_env.endpoint.set_http_hook(calls.append)
    try:
        assert main(["up", str(path), "--ec2-only"]) == 2
    finally:
        ec2_env.endpoint.set_http_hook(None)
    (line,) = capsys.readouterr().err.splitlines()
    assert "STATE_DIR" in line and "lock is a symbolic link" in line
    assert untouched(victim) and calls == []


def test_a_hard_linked_lock_is_refused(tmp_path, shared, clean_env):
    folder, victim = shared
    c = config(tmp_path, STATE_DIR=str(folder), REGION="us-east-1")
    statefiles.ensure_dir(c.state_dir)
    os.link(victim, c.state_dir / "lock")
    with pytest.raises(StateFileError, match="hard links"), cluster_lock(c.state_dir):
        pass
    assert victim.read_text() == "precious\n"


def test_planted_token_book_links_and_fifos_are_refused(tmp_path, shared):
    folder, victim = shared
    state = statefiles.ensure_dir(folder / "cluster")
    (state / "tokens.json").symlink_to(victim)
    with pytest.raises(StateFileError, match="tokens.json is a symbolic link"):
        TokenBook(state).token_for("k" * 40, NOW)
    assert untouched(victim)
    (state / "tokens.json").unlink()
    os.mkfifo(state / "tokens.json")
    with pytest.raises(StateFileError, match="tokens.json is not a regular file"):
        TokenBook(state).token_for("k" * 40, NOW)  # and does not wait for a writer


@pytest.mark.parametrize("size", [0, 10, 64 * 1024 + 3, 300_000])
def test_a_state_file_is_read_up_to_its_limit_without_allocating_the_limit(tmp_path, size):
    """Every pass reads the join book: a 16 MiB limit must not cost 16 MiB each time."""
    path = statefiles.ensure_dir(tmp_path / "cluster") / "book.json"
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    path.write_bytes(data)
    tracemalloc.start()
    try:
        got = statefiles.read_bytes(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == data and peak < 3 * size + 256 * 1024
    assert statefiles.read_bytes(path, limit=70_000) == data[:70_000]


def test_a_planted_join_book_link_is_refused_not_followed(tmp_path, shared):
    folder, victim = shared
    state = statefiles.ensure_dir(folder / "cluster")
    (state / "joins.json").symlink_to(victim)
    with pytest.raises(StateFileError, match="joins.json is a symbolic link"):
        JoinBook(state).read()
    with pytest.raises(StateFileError, match="joins.json is a symbolic link"):
        JoinBook(state).record({"i-a": "i-m#k1"}, live=["i-a"])
    assert untouched(victim)


def test_old_fixed_temporary_names_are_not_written_through(tmp_path, shared):
    folder, victim = shared
    state = statefiles.ensure_dir(folder / "cluster")
    (state / "tokens.tmp").symlink_to(victim)  # the name the book used to write first
    token = TokenBook(state).token_for("k" * 40, NOW)
    assert untouched(victim) and token in (state / "tokens.json").read_text()
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == ["tokens.tmp"]


KEY = HostKey.from_line("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZ0F4dIlTGe2Oj7Z4Z6yWnq1l1vX1k0"
                        "Jm8JpVYx1r2M")


def test_planted_pin_links_are_refused_and_never_written_through(tmp_path, shared):
    folder, victim = shared
    store = HostKeyStore(statefiles.ensure_dir(folder / "cluster"))
    statefiles.ensure_dir(store.directory)
    store.path("i-0123456789abcdef0").symlink_to(victim)
    with pytest.raises(StateFileError, match="symbolic link"):
        store.get("i-0123456789abcdef0")
    with pytest.raises(StateFileError, match="symbolic link"):
        store.pin("i-0123456789abcdef0", KEY)
    assert untouched(victim)
    assert store.pin("i-0123456789abcdef0", KEY, replace=True) == KEY  # replaces the link
    assert untouched(victim) and store.get("i-0123456789abcdef0") == KEY
    assert not store.path("i-0123456789abcdef0").is_symlink()


def test_a_symlinked_hostkeys_folder_is_refused(tmp_path, shared):
    folder, _ = shared
    store = HostKeyStore(statefiles.ensure_dir(folder / "cluster"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    store.directory.symlink_to(elsewhere)
    with pytest.raises(StateFileError, match="hostkeys is a symbolic link"):
        store.pin("i-0123456789abcdef0", KEY)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_state_dir_others_can_write_is_refused(tmp_path, mode):
    state = tmp_path / "cluster"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(StateFileError) as info, cluster_lock(state):
        pass
    message = str(info.value)
    assert f"{state} is writable by other users (mode {mode:o})" in message
    assert f"chmod 700 {state}" in message and "STATE_DIR" in message
    assert not (state / "lock").exists()


def test_a_symlinked_state_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "cluster").symlink_to(real)
    with pytest.raises(StateFileError, match="cluster is a symbolic link"), \
            cluster_lock(tmp_path / "cluster"):
        pass
    assert not (real / "lock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_state_dir_owned_by_someone_else_is_refused(tmp_path):
    state = tmp_path / "cluster"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(StateFileError, match="owned by uid 65534, not by this user"), \
            cluster_lock(state):
        pass


def test_folders_it_creates_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        state = statefiles.ensure_dir(tmp_path / "new" / "deeper" / "cluster")
    finally:
        os.umask(old)
    for folder in (state, state.parent, state.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_write_new_is_first_writer_wins(tmp_path):
    path = statefiles.ensure_dir(tmp_path / "s") / "f"
    assert statefiles.write_new(path, b"one") is True
    assert statefiles.write_new(path, b"two") is False
    assert statefiles.read_bytes(path) == b"one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert statefiles.remove(path) is True and statefiles.remove(path) is False
    assert statefiles.read_bytes(path) is None
