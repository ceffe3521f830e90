"""STATE_DIR: one folder per cluster *and* region/endpoint, owned by the caller, no links.

The lock, the token book and pinned host keys live there; a folder shared between two
clusters, or a link planted in it, would make one run block, or write through, another.
"""

from __future__ import annotations

import pytest

from disposabledisco.config import parse_config
from disposabledisco.lock import LockHeld, cluster_lock

BASE = {"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "TAG_KEY": "disco-same"}
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
    assert config(tmp_path).region == "us-east-1"
    (tmp_path / "aws-config").write_text("[profile lab]\nregion = ap-south-1\n"
                                         "[default]\nregion = sa-east-1\n")
    assert config(tmp_path).region == "sa-east-1"
    assert config(tmp_path, AWS_PROFILE="lab").region == "ap-south-1"
    clean_env.setenv("AWS_PROFILE", "lab")
    assert config(tmp_path).region == "ap-south-1"
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    assert config(tmp_path).region == "eu-north-1"
    clean_env.setenv("AWS_REGION", "eu-south-1")
    assert config(tmp_path).region == "eu-south-1"
    assert config(tmp_path, REGION="us-west-2").region == "us-west-2"
    assert config(tmp_path).state_dir.name == "disco-same@eu-south-1"


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

