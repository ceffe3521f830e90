"""`init` writes a config that means the same on every machine and says what is still to do:
a relative "$schema" that `init --schema` satisfies, warnings for an empty MGMT_KEY and the
placeholders; `--json` gets a JSON error object even for a usage error found before parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from disposabledisco.config import (
    PLACEHOLDER_AMI,
    PLACEHOLDER_KEY_NAME,
    load_config,
    load_schema,
)
from tests.cli_capture import cli

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEexampleEXAMPLEexampleEXAMPLEexampl you@host"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A HOME with no ~/.ssh, so init finds no public key unless a test writes one."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


def test_schema_ref_is_relative_and_init_schema_satisfies_it(home, tmp_path) -> None:
    code, text, _ = cli("init")
    assert code == 0
    config = json.loads(text)
    ref = config["$schema"]
    assert not Path(ref).is_absolute() and "://" not in ref  # no machine's path or URI
    assert str(Path(__file__).resolve().parents[1]) not in text
    code, schema_text, err = cli("init", "--schema")
    assert code == 0 and err == ""
    assert json.loads(schema_text) == load_schema()
    # as an editor does: resolve "$schema" next to the config, validate the config with it
    (tmp_path / "config.json").write_text(text)
    (tmp_path / ref).write_text(schema_text)
    Draft202012Validator(json.loads((tmp_path / ref).read_text())).validate(config)
    _, _, err = cli("init")
    assert f"init --schema > {Path(ref).name}" in err


def test_empty_mgmt_key_is_warned_on_stderr(home) -> None:
    code, text, err = cli("init")
    assert code == 0 and json.loads(text)["MGMT_KEY"] == ""
    assert "warning: MGMT_KEY is empty" in err and "ssh-keygen" in err
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    code, text, err = cli("init")
    assert code == 0 and json.loads(text)["MGMT_KEY"] == KEY
    assert "MGMT_KEY" not in err


def test_placeholders_are_warned_until_changed(home, tmp_path) -> None:
    _, text, _ = cli("init")
    config = json.loads(text)
    assert config["KEY_NAME"] == PLACEHOLDER_KEY_NAME and config["AMI"] == PLACEHOLDER_AMI
    path = tmp_path / "config.json"
    path.write_text(text)
    code, out, err = cli("validate", str(path))
    assert code == 0 and out.startswith(f"{path}: valid")
    assert f'KEY_NAME is still the placeholder "{PLACEHOLDER_KEY_NAME}"' in err
    assert f"AMI is still the placeholder {PLACEHOLDER_AMI}" in err
    path.write_text(json.dumps({**config, "KEY_NAME": "mine"}))
    warnings = load_config(path).warnings
    assert not any("KEY_NAME" in w for w in warnings)
    assert any("AMI is still the placeholder" in w for w in warnings)


# no `--` at all (refused before parsing), or nothing after it
@pytest.mark.parametrize("tail", [[], ["--"]])
def test_exec_json_usage_error_is_a_json_object(home, tmp_path, tail) -> None:
    path = tmp_path / "config.json"
    path.write_text(cli("init")[1])
    code, out, err = cli("exec", str(path), "--json", *tail)
    assert code == 2
    report = json.loads(out)
    assert report == {"ok": False, "exit_code": 2, "errors": err.splitlines()[-1:]}
    assert "exec needs the command after `--`" in err


def test_exec_usage_error_without_json_keeps_stdout_empty() -> None:
    code, out, err = cli("exec", "c.json")
    assert code == 2 and out == "" and "exec needs the command after `--`" in err
