"""Pins from the folder layout before per-region state folders are carried over once."""

from __future__ import annotations

import os

import pytest

from disposabledisco import statefiles
from disposabledisco.config import parse_config
from disposabledisco.hostkeys import HostKeyStore
from disposabledisco.upgrade import carry_over_pins
from tests.test_hostkeys_unit import KEYS

BASE = {"AMI": "ami-12345678", "KEY_NAME": "disco-test", "TAG_KEY": "disco-old",
        "REGION": "eu-west-1"}


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
        monkeypatch.delenv(name, raising=False)
    return parse_config({**BASE, "STATE_DIR": str(tmp_path / "state")})


def test_old_pins_are_carried_once_and_the_old_folder_is_left_alone(config) -> None:
    old = HostKeyStore(config.legacy_state_dir)
    assert config.legacy_state_dir.name == "disco-old" != config.state_dir.name
    statefiles.ensure_dir(config.legacy_state_dir)
    old.pin("i-0aaa", KEYS["ed25519"])
    old.pin("i-0bbb", KEYS["rsa"])
    assert carry_over_pins(config) == 2
    new = HostKeyStore(config.state_dir)
    assert new.get("i-0aaa") == KEYS["ed25519"] and new.get("i-0bbb") == KEYS["rsa"]
    assert old.get("i-0aaa") == KEYS["ed25519"]  # the old folder is not touched
    old.forget("i-0aaa")
    new.forget("i-0bbb")  # the operator forgot a pin in the new folder: it stays forgotten
    assert carry_over_pins(config) == 0 and new.get("i-0bbb") is None


def test_nothing_to_carry_creates_nothing(config) -> None:
    assert carry_over_pins(config) == 0
    assert not os.path.lexists(config.state_dir)


def test_temporaries_and_damaged_pins_are_skipped(config) -> None:
    statefiles.ensure_dir(config.legacy_state_dir / "hostkeys")
    folder = config.legacy_state_dir / "hostkeys"
    (folder / ".i-0ccc.1234.tmp").write_text(KEYS["ecdsa"].line() + "\n")
    (folder / "i-0ddd").write_text("not a key\n")
    HostKeyStore(config.legacy_state_dir).pin("i-0eee", KEYS["ecdsa"])
    assert carry_over_pins(config) == 1
    assert sorted(os.listdir(config.state_dir / "hostkeys")) == ["i-0eee"]


def test_an_old_folder_others_can_write_is_refused(config) -> None:
    HostKeyStore(config.legacy_state_dir).pin("i-0aaa", KEYS["ed25519"])
    os.chmod(config.legacy_state_dir, 0o777)
    with pytest.raises(statefiles.StateFileError, match="disco-old"):
        carry_over_pins(config)
    assert not os.path.lexists(config.state_dir)
