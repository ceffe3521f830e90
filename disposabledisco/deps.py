"""Third-party packages each entry point needs, checked before anything imports them.

A clean virtual environment without them must get one line that says what to install,
not a ModuleNotFoundError traceback from deep inside an import. Only the presence of the
top-level modules is checked (``importlib.util.find_spec`` imports nothing).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib.util import find_spec

#: import name -> the requirement that provides it (as in pyproject.toml)
CORE: Mapping[str, str] = {
    "boto3": "boto3>=1.28",
    "paramiko": "paramiko>=3.0",
    "jsonschema": "jsonschema>=4.18",
}
#: the sandbox serves moto over HTTP: flask and werkzeug come with moto's [server] extra
SANDBOX: Mapping[str, str] = {
    **CORE,
    "moto": "moto[server]>=5.1,<6",
    "flask": "moto[server]>=5.1,<6",
    "werkzeug": "moto[server]>=5.1,<6",
}
#: what the test suite imports on top of the sandbox
TEST: Mapping[str, str] = {
    **SANDBOX,
    "pytest": "pytest>=7",
    "ruff": "ruff",
    "hypothesis": "hypothesis>=6",
}


def missing_requirements(needs: Mapping[str, str]) -> list[str]:
    """The requirements (each once, in order) whose module cannot be found."""
    missing: list[str] = []
    for module, requirement in needs.items():
        if find_spec(module) is None and requirement not in missing:
            missing.append(requirement)
    return missing


def missing_message(missing: list[str]) -> str:
    """One line: what is missing and the pip command that installs it into this Python."""
    quoted = " ".join(f"'{requirement}'" for requirement in missing)
    return (f"disposabledisco: missing Python package(s) {', '.join(missing)}; install with: "
            f"{sys.executable} -m pip install {quoted} (from a checkout: "
            "./scripts/setup-and-run demo)")


def require(needs: Mapping[str, str] = CORE) -> None:
    """Exit with status 1 and one line on stderr when a needed package is missing."""
    missing = missing_requirements(needs)
    if missing:
        raise SystemExit(missing_message(missing))
