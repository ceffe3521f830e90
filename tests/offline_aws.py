"""AWS with no endpoint at all, for tests that prove a command makes no EC2 call.

Starting the local EC2 endpoint costs each test a reset and a network set-up; a test that
must see *no* call needs neither. Here every botocore call is recorded and refused before
it leaves the process, and EC2's URL is a loopback port that accepts and never answers
(so the CLI's stopped-sandbox check passes, and a call that slipped past would hang).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import botocore.client
import pytest


@contextmanager
def offline_aws(patch: pytest.MonkeyPatch, home: Path, attempted: list[str]) -> Iterator[None]:
    """A private HOME and AWS environment under `patch`; calls attempted go to `attempted`."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL",
                 "AWS_SESSION_TOKEN"):
        patch.delenv(name, raising=False)
    patch.setenv("HOME", str(home))
    patch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    patch.setenv("AWS_ACCESS_KEY_ID", "offline")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "offline")
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def refused(self, operation, params):  # noqa: ARG001
        attempted.append(operation)
        raise AssertionError(f"EC2 call {operation} in a test that allows none")

    patch.setattr(botocore.client.BaseClient, "_make_api_call", refused)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        patch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.0.1:{listener.getsockname()[1]}")
        yield


@pytest.fixture
def no_ec2_calls(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[list[str]]:
    """Every EC2 call a test attempted (each refused): assert it stays empty."""
    attempted: list[str] = []
    with offline_aws(monkeypatch, tmp_path_factory.mktemp("offline-home"), attempted):
        yield attempted
