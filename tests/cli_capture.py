"""The CLI run with its output captured, in this process or in a child: one helper each
for every CLI test."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from disposabledisco.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> tuple[int, str, str]:
    """Run `disposabledisco <argv>` in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cli_process(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m disposabledisco <argv>` in a child process (for what replaces or ends
    the process: ssh's exec, the sandbox's signals), no stdin, text output."""
    return subprocess.run([sys.executable, "-m", "disposabledisco", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
