"""Bad input through the real CLI: one clear sentence, exit 2, and not one EC2 call.

EC2 refusals (unknown AMI or key pair) become one line with the AWS code, exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moto import settings as moto_settings

from disposabledisco.cli import main

GOOD = {"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "TAG_KEY": "ddbad", "NUM_SLAVES": 1}

BAD_CONFIGS = [
    ({"NUM_SLAVE": 3}, ["NUM_SLAVE", "did you mean NUM_SLAVES"]),
    ({"TAG_KEY": "aws:cluster"}, ["TAG_KEY", "aws:"]),
    ({"TAG_KEY": None}, ["TAG_KEY is missing", "disco-<something unique>", "init"]),
    ({"TAG_KEY": "Name"}, ["TAG_KEY", "instance name tag"]),
    ({"TAG_KEY": "kubernetes.io/cluster/x"}, ["TAG_KEY", "Kubernetes"]),
    ({"AMI": "ami-xyz"}, ["AMI", "ami-0123456789abcdef0"]),
    ({"NUM_SLAVES": -1}, ["NUM_SLAVES", "0 to 1000"]),
    ({"MAX_BID": "ten cents"}, ["MAX_BID"]),
    ({"MAX_BID": 0}, ["MAX_BID"]),
    ({"ADDITIONAL_PACKAGES": ["vim; rm -rf /"]}, ["ADDITIONAL_PACKAGES[0]"]),
    ({"PIP_REQUIREMENTS": ["--index-url http://example.invalid"]}, ["PIP_REQUIREMENTS[0]"]),
    ({"SSH_PORT": 70000}, ["SSH_PORT", "65535"]),
    ({"MASTER_MARKET": "cheap"}, ["MASTER_MARKET", "on-demand"]),
    ({"HOST_KEY_POLICY": "yolo"}, ["HOST_KEY_POLICY", "pin"]),
    ({"SSH_ADDRESS": "ipv6"}, ["SSH_ADDRESS", "private_ip"]),
    ({"INSTANCE_TYPE": "large"}, ["INSTANCE_TYPE"]),
    ({"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large"}], "NUM_SLAVES": None},
     ["SLAVE_GROUPS[0]", "COUNT"]),
    ({"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 1},
                       {"INSTANCE_TYPE": "m5.large", "COUNT": 2}], "NUM_SLAVES": None},
     ["SLAVE_GROUPS", "m5.large"]),
    ({"DISCO_INSTALL": "tarball"}, ["DISCO_TARBALL"]),
    ({"AWS_ACCESS": "AKIAEXAMPLE"}, ["AWS_SECRET"]),
    ({"DISCO_SETTINGS": {"FOO": "1"}}, ["DISCO_SETTINGS"]),
    ({"KEY_NAME": None}, ["KEY_NAME"]),
    ({"DISCO_ROOT": "/opt"}, ["DISCO_ROOT", "system folder"]),
    ({"DISCO_USER": "root"}, ["DISCO_USER", "root itself"]),
    ({"DISCO_USER": "ubuntu"}, ["DISCO_USER", "SSH_USER"]),
    ({"DISCO_TARBALL_SHA256": "abc"}, ["DISCO_TARBALL_SHA256", "64 hex digits"]),
]


def write(tmp_path, values) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    return str(path)


@pytest.mark.parametrize(("change", "words"), BAD_CONFIGS,
                         ids=[next(iter(c)) for c, _ in BAD_CONFIGS])
@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_bad_config_exits_2_naming_the_field_with_no_ec2_call(tmp_path, capsys, no_ec2_calls,
                                                              change,
                                                              words, command):
    path = write(tmp_path, {**GOOD, **change})
    extra = ["--yes"] if command == "down" else []
    assert main([command, path, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for word in words:
        assert word in captured.err, captured.err
    assert no_ec2_calls == []


@pytest.mark.parametrize(("content", "words"), [
    ('{"AMI": "ami-0123456789abcdef0",\n  "KEY_NAME": "k",,}', ["line 2"]),
    ('["AMI", "KEY_NAME"]', ["object"]),
    (None, ["does not exist", "init"]),
])
def test_unreadable_config_files(tmp_path, capsys, no_ec2_calls, content, words):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    assert main(["up", str(path)]) == 2
    err = capsys.readouterr().err
    assert all(w.lower() in err.lower() for w in words), err
    assert no_ec2_calls == []


def test_secret_values_never_appear_in_errors(tmp_path, capsys):
    path = write(tmp_path, {**GOOD, "AWS_SECRET": "s3cr3t-VALUE", "AWS_ACCESS": 5})
    assert main(["up", path]) == 2
    err = capsys.readouterr().err
    assert "s3cr3t-VALUE" not in err and "AWS_ACCESS" in err


@pytest.mark.parametrize("argv", [
    ["up", "CONFIG", "--timeout", "5"],
    ["launch", "CONFIG"],
    ["up"],
    ["up", "CONFIG", "--wait", "--timeout", "soon"],
])
def test_usage_errors_exit_2(tmp_path, capsys, no_ec2_calls, argv):
    path = write(tmp_path, GOOD)
    assert main([path if a == "CONFIG" else a for a in argv]) == 2
    assert capsys.readouterr().err.strip()
    assert no_ec2_calls == []


@pytest.fixture
def ec2_validates(monkeypatch):
    """Make the local endpoint check AMIs and key pairs, as EC2 does."""
    monkeypatch.setattr(moto_settings, "ENABLE_AMI_VALIDATION", True)
    monkeypatch.setattr(moto_settings, "ENABLE_KEYPAIR_VALIDATION", True)


@pytest.mark.parametrize(("change", "code", "hint"), [
    ({"AMI": "ami-0123456789abcdef0"}, "InvalidAMIID.NotFound", "set AMI"),
    ({"KEY_NAME": "no-such-key"}, "InvalidKeyPair.NotFound", "KEY_NAME"),
])
def test_ec2_refusal_is_one_clear_line_exit_1(ec2_env, ec2_validates, tmp_path, capsys, change,
                                              code, hint):
    values = {"AMI": ec2_env.image_id, "KEY_NAME": ec2_env.key_name, "TAG_KEY": "ddbad",
              "SUBNET_ID": ec2_env.subnet_id, "NUM_SLAVES": 2,
              "STATE_DIR": str(tmp_path / "state"), **change}
    assert main(["up", write(tmp_path, values), "--ec2-only", "--wait"]) == 1
    out = capsys.readouterr().out
    failures = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failures) == 2  # master and slaves: each bid reports its own refusal
    assert all(code in line and hint in line for line in failures), out
    assert "Traceback" not in out


def test_missing_local_tarball_is_a_config_error_before_any_ec2_call(tmp_path, capsys,
                                                                     no_ec2_calls):
    path = write(tmp_path, {**GOOD, "DISCO_INSTALL": "tarball",
                            "DISCO_TARBALL": str(tmp_path / "disco.tar.gz")})
    assert main(["up", path]) == 2
    err = capsys.readouterr().err
    assert "DISCO_TARBALL" in err and "disco.tar.gz" in err
    assert no_ec2_calls == []


def _fifo(path):
    os.mkfifo(path)


HOSTILE_FILES = [
    ("fifo", _fifo, ["FIFO", "not a regular file"]),
    ("folder", lambda p: p.mkdir(), ["is a folder"]),
    ("oversized", lambda p: p.write_text(json.dumps({**GOOD, "POST_INIT": "#" * (1 << 20)})),
     ["larger than 1024 KiB"]),
    ("huge integer", lambda p: p.write_text(json.dumps(GOOD)[:-1] + ', "SSH_PORT": '
                                            + "7" * 4301 + "}"),
     ["SSH_PORT is a whole number of 4301 digits"]),
    ("deep nesting", lambda p: p.write_text(json.dumps(GOOD)[:-1] + ', "SLAVE_GROUPS": '
                                            + "[" * 500 + "]" * 500 + "}"),
     ["SLAVE_GROUPS nests lists or objects more than 100 levels"]),
    ("deeper nesting", lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
     ["more than 100 levels"]),
    ("surrogate", lambda p: p.write_text(json.dumps(GOOD)[:-1] + ', "POST_INIT": "\\ud800"}'),
     ["POST_INIT contains a lone surrogate"]),
]


@pytest.mark.parametrize(("make", "words"), [c[1:] for c in HOSTILE_FILES],
                         ids=[c[0] for c in HOSTILE_FILES])
@pytest.mark.parametrize("command", [["validate"], ["up"], ["up", "--dry-run"]])
def test_hostile_config_files_exit_2_in_one_line_with_no_ec2_call(tmp_path, capsys, no_ec2_calls,
                                                                  make, words, command):
    path = tmp_path / "config.json"
    make(path)
    assert main([command[0], str(path), *command[1:]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert all(w in line for w in words), line
    assert no_ec2_calls == []


@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_fifo_and_dev_zero_do_not_hang_the_real_cli(tmp_path, target):
    path = tmp_path / "config.json"
    if target == "fifo":
        os.mkfifo(path)
    else:
        path = Path(target)
    result = subprocess.run([sys.executable, "-m", "disposabledisco", "validate", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not a regular file" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def _file(path):
    path.write_text("not a folder\n")
    return str(path)


def _open_state_dir(tmp_path):
    """A cluster folder others can write to, where STATE_DIR/<cluster> will be."""
    state = tmp_path / "state"
    write(tmp_path, {**GOOD, "STATE_DIR": str(state)})
    from disposabledisco.config import load_config  # noqa: PLC0415
    folder = load_config(tmp_path / "config.json").state_dir
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    return str(state)


def _tarball_fifo(tmp_path):
    os.mkfifo(tmp_path / "disco.tar.gz")
    return str(tmp_path / "disco.tar.gz")


# (id, key, value maker (tmp_path -> value), words in the one line)
LOCAL_PATHS = [
    ("state dir is a file", "STATE_DIR", lambda t: _file(t / "state"), ["is not a folder"]),
    ("state dir under a file", "STATE_DIR", lambda t: _file(t / "state") + "/sub",
     ["is not a folder"]),
    ("state dir not creatable", "STATE_DIR", lambda t: "/proc/disposabledisco-state",
     ["cannot be created in /proc"]),
    ("state dir name too long", "STATE_DIR", lambda t: str(t / ("d" * 300)), ["too long"]),
    ("state dir path too long", "STATE_DIR", lambda t: str(t) + ("/" + "d" * 200) * 20,
     ["too long"]),
    ("state dir unknown user", "STATE_DIR", lambda t: "~nosuchuser-dd/state",
     ['no user "nosuchuser-dd"', "~/..."]),
    ("state dir others can write", "STATE_DIR", _open_state_dir,
     ["writable by other users (mode 777)", "chmod 700"]),
    ("tarball is a folder", "DISCO_TARBALL", lambda t: str(t), ["is a folder, not a tarball"]),
    ("tarball is a fifo", "DISCO_TARBALL", _tarball_fifo, ["FIFO", "not a regular file"]),
    ("tarball unknown user", "DISCO_TARBALL", lambda t: "~nosuchuser-dd/disco.tgz",
     ['no user "nosuchuser-dd"']),
    ("ssh key unknown user", "SSH_KEY_FILE", lambda t: "~nosuchuser-dd/.ssh/id", ["no user"]),
    ("missing profile", "AWS_PROFILE", lambda t: "no-such-profile-dd",
     ["not a profile", "aws configure"]),
]


@pytest.mark.parametrize(("key", "make", "words"), [c[1:] for c in LOCAL_PATHS],
                         ids=[c[0] for c in LOCAL_PATHS])
@pytest.mark.parametrize("command", [["validate"], ["up"], ["up", "--ec2-only"]])
def test_local_paths_exit_2_in_one_line_naming_the_key(tmp_path, capsys, no_ec2_calls, key, make,
                                                       words,
                                                       command, monkeypatch):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    values = {**GOOD, key: make(tmp_path)}
    if key == "DISCO_TARBALL":
        values["DISCO_INSTALL"] = "tarball"
    path = write(tmp_path, values)
    assert main([command[0], path, *command[1:]]) == 2
    captured = capsys.readouterr()
    (line,) = [x for x in captured.err.splitlines() if not x.startswith("warning: ")]
    assert f": {key}" in line and all(w in line for w in words), line
    assert captured.out == "" and no_ec2_calls == []
    assert not Path("/proc/disposabledisco-state").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_local_tarball_exits_2(tmp_path, capsys, no_ec2_calls):
    tarball = tmp_path / "disco.tar.gz"
    tarball.write_bytes(b"x")
    tarball.chmod(0)
    path = write(tmp_path, {**GOOD, "DISCO_INSTALL": "tarball", "DISCO_TARBALL": str(tarball)})
    assert main(["validate", path]) == 2
    assert "DISCO_TARBALL" in capsys.readouterr().err and no_ec2_calls == []


def test_validate_leaves_no_trace_of_a_state_dir_it_checked(tmp_path, capsys):
    path = write(tmp_path, {**GOOD, "STATE_DIR": str(tmp_path / "new" / "state")})
    assert main(["validate", path]) == 0
    assert not (tmp_path / "new").exists()
    assert main(["validate", write(tmp_path, {**GOOD, "STATE_DIR": str(tmp_path)})]) == 0


def test_an_existing_profile_is_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    (tmp_path / "aws-config").write_text("[profile lab]\nregion = eu-west-1\n")
    assert main(["validate", write(tmp_path, {**GOOD, "AWS_PROFILE": "lab"})]) == 0


def test_the_no_call_check_sees_a_call(tmp_path, capsys, no_ec2_calls):
    """The refusals above prove no call only if a call would show: a valid config does call,
    and the call fails the test even where the CLI would catch an AWS error."""
    with pytest.raises(AssertionError, match="EC2 call Describe"):
        main(["status", write(tmp_path, {**GOOD, "STATE_DIR": str(tmp_path / "state")})])
    assert no_ec2_calls and no_ec2_calls[0].startswith("Describe"), no_ec2_calls
