"""Shared pytest configuration: fixture modules are registered as plugins here.

Tiers, by marker: `nodes` (real sshd nodes, root), `disco` (real Disco built from the
bundle) and `slow` (everything else that starts a process or a local EC2 endpoint). The
fast suite, the one mutation testing runs over, is `pytest -m "not nodes and not disco and
not slow"`; README's test command runs every tier.
"""

import pytest

pytest_plugins = ["tests.ec2_fixtures", "tests.offline_aws", "tests.node_fixtures",
                  "tests.e2e_fixtures", "tests.fault_fixtures"]

#: fixtures that start the local EC2 endpoint (a moto server) or a whole fault lab
_ENDPOINT_FIXTURES = {"local_ec2", "ec2_env", "spot_market", "fault_lab", "e2e"}
#: modules that run the product in child processes or scratch clones throughout
_SLOW_MODULES = {"test_quickstart", "test_sandbox_cli", "test_fuzz_inputs"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in _SLOW_MODULES or _ENDPOINT_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
