"""Shared pytest configuration: fixture modules are registered as plugins here."""

pytest_plugins = ["tests.ec2_fixtures", "tests.node_fixtures", "tests.e2e_fixtures",
                  "tests.fault_fixtures"]
