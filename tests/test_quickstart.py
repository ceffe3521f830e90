"""README's two quick-start commands, run as written in a scratch clone of HEAD, and the
one-line message every entry point gives when a Python package is missing.

The clone runs the set-up in its offline mode (DISPOSABLEDISCO_SETUP_OFFLINE=1: no apt, no
pip, this interpreter's packages on the new venv's path), so the commands cannot rot
without a network. Everything else is the real script: the venv, the dependency check,
ruff, pytest's collection of the whole suite and the whole sandbox demo (as root).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from disposabledisco.deps import CORE, SANDBOX, TEST
from disposabledisco.sandbox.nodes import NodeFarm
from tests.test_readme import quick_start

ROOT = Path(__file__).resolve().parents[1]
DEMO, TEST_COMMAND = quick_start()


def git_clone(parent: Path) -> Path:
    """A fresh clone of this repository's HEAD (what a newcomer gets)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone (apt-get install git)")
    target = parent / "disposabledisco"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    return target


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return git_clone(tmp_path_factory.mktemp("quickstart"))


def run_readme(command: str, clone: Path, *args: str, timeout: float = 240,
               python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """README's command line, word for word, plus extra arguments, in the clone."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(DISPOSABLEDISCO_SETUP_OFFLINE="1", PYTHON=python)
    return subprocess.run(" ".join([command, *args]), shell=True, cwd=clone, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_the_test_command_lints_and_collects_the_whole_suite_of_the_clone(clone: Path):
    # a half-made venv (an interrupted earlier run) is made again, not trusted
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "python").symlink_to(clone / "no-such-python")
    result = run_readme(TEST_COMMAND, clone, "--collect-only", "-q")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "All checks passed!" in result.stdout  # ruff ran on the clone
    collected = dict(re.findall(r"^(tests/test_\w+\.py): (\d+)$", result.stdout, re.M))
    modules = sorted(str(p.relative_to(clone)) for p in (clone / "tests").glob("test_*.py"))
    assert sorted(collected) == modules, "every test module of the clone is collected"
    assert int(collected["tests/test_quickstart.py"]) >= 5
    assert (clone / ".venv" / "pyvenv.cfg").exists()


def test_the_demo_command_runs_the_whole_story_in_the_clone(clone: Path):
    venv_before = (clone / ".venv" / "pyvenv.cfg").stat() \
        if (clone / ".venv" / "pyvenv.cfg").exists() else None
    result = run_readme(DEMO, clone, "--slaves", "1", "--fulfil-delay", "0.5")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    available, reason = NodeFarm.available()
    if not available:  # not root: one line that says why, nothing else
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"disposabledisco: the sandbox needs real SSH nodes, which this machine cannot "
            f"run: {reason}")
        return
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"sandbox EC2 endpoint: http://127\.0\.0\.1:\d+", lines[0]), lines[:3]
    assert re.fullmatch(r"instance network: 127\.42\.\d+\.0/24 \(.*", lines[1]), lines[:3]
    assert lines[2] == f"config written to {clone / 'sandbox' / 'sandbox.json'}"
    assert re.search(r"^\(the spot market interrupts slave i-\w+ at 127\.42\.\d+\.\d+\)$",
                     result.stdout, re.M)
    assert lines[-1] == ("sandbox demo finished: the cluster converged, healed and was "
                         "taken down")
    if venv_before is not None:  # set-up is idempotent: the venv was reused, not rebuilt
        assert (clone / ".venv" / "pyvenv.cfg").stat().st_ino == venv_before.st_ino


def test_the_setup_script_without_a_command_says_its_usage(clone: Path):
    result = run_readme("./scripts/setup-and-run", clone)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ./scripts/setup-and-run demo|test")


def test_without_the_venv_module_set_up_names_the_debian_package(tmp_path: Path):
    fresh = git_clone(tmp_path)
    python = tmp_path / "python3"  # Debian's python3 before python3-venv is installed
    python.write_text("#!/bin/sh\necho 'ensurepip is not available' >&2\nexit 1\n")
    python.chmod(0o755)
    result = run_readme(DEMO, fresh, python=str(python))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == ("setup-and-run: cannot make a virtual "
                                              "environment: apt-get install python3-venv, "
                                              "then run again")
    assert not (fresh / ".venv").exists()


def test_a_second_set_up_installs_nothing_until_pyproject_changes(tmp_path: Path):
    # the fresh-machine trial (docs/fresh-machine.md) runs the command again offline: pip,
    # which fetches setuptools to build the editable install, must not run a second time
    def installed(package: str) -> bool:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                capture_output=True, text=True, check=False).stdout
        return "ok installed" in status

    apt = (ROOT / ".ci" / "apt-packages.txt").read_text(encoding="utf-8").split()
    absent = [p for p in apt if shutil.which("dpkg-query") is None or not installed(p)]
    if absent and os.geteuid() == 0:
        pytest.skip(f"as root set-up would apt-get install {' '.join(absent)} on this machine")
    fresh = git_clone(tmp_path)
    fake = tmp_path / "fake"  # a pip that only records its arguments
    (fake / "pip").mkdir(parents=True)
    (fake / "pip" / "__init__.py").write_text("")
    (fake / "pip" / "__main__.py").write_text(
        "import os, sys\n"
        "with open(os.environ['FAKE_PIP_LOG'], 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + '\\n')\n")
    log = tmp_path / "pip.log"
    site = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, FAKE_PIP_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(fake), *site]))

    def installs() -> list[str]:
        result = subprocess.run(f"{DEMO} --help", shell=True, cwd=fresh, env=env,
                                capture_output=True, text=True, timeout=240, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "--demo" in result.stdout  # the sandbox's help: set-up went through
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return [line for line in lines if line.startswith("install")]

    assert installs() == ["install -q -e .[sandbox]"]
    assert installs() == []
    with (fresh / "pyproject.toml").open("a") as f:
        f.write("# a new dependency would be here\n")
    assert installs() == ["install -q -e .[sandbox]"]
    assert installs() == []


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
def test_the_setup_script_and_ci_pass_shellcheck():
    result = subprocess.run(["shellcheck", str(ROOT / "scripts" / "setup-and-run"),
                             str(ROOT / "scripts" / "fresh-machine-trial"),
                             str(ROOT / ".ci" / "run")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout


# ------------------------------------------------------------------ missing packages
@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment without any third-party package, the checkout on its path."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "checkout.pth").write_text(f"{ROOT}\n", encoding="utf-8")
    return python


@pytest.mark.parametrize(("argv", "needs"), [
    (["-m", "disposabledisco", "validate", "config.json"], CORE),
    (["-m", "disposabledisco", "sandbox", "--demo"], SANDBOX),
    ([str(ROOT / "create_cluster.py"), "config.json"], CORE),
    ([str(ROOT / "create_config.py")], CORE),
    (["-c", "import disposabledisco.sandbox.run"], SANDBOX),
], ids=["python -m", "sandbox", "create_cluster.py", "create_config.py", "sandbox module"])
def test_a_missing_package_is_one_line_naming_the_pip_install(
        bare_python: Path, tmp_path: Path, argv: list[str], needs: dict[str, str]):
    result = subprocess.run([str(bare_python), *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    requirements = list(dict.fromkeys(needs.values()))
    quoted = " ".join(f"'{r}'" for r in requirements)
    assert result.stderr == (
        f"disposabledisco: missing Python package(s) {', '.join(requirements)}; install "
        f"with: {bare_python} -m pip install {quoted} (from a checkout: "
        "./scripts/setup-and-run demo)\n")


def test_the_checked_requirements_are_pyprojects():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert sorted(set(CORE.values())) == sorted(project["dependencies"])
    extras = project["optional-dependencies"]
    assert sorted(set(SANDBOX.values()) - set(CORE.values())) == sorted(extras["sandbox"])
    assert sorted(set(TEST.values()) - set(CORE.values())) == sorted(extras["test"])
