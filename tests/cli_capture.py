"""The CLI run in this process with its output captured: one helper for every CLI test."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from disposabledisco.cli import main


def cli(*argv: str) -> tuple[int, str, str]:
    """Run `disposabledisco <argv>` in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()
