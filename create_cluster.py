#!/usr/bin/env python3
"""Converge the cluster to a config: `python create_cluster.py config.json [--wait] [--dry-run]`.

The same as `disposabledisco up config.json`; works from a checkout without installing.
"""

import importlib.util
import sys
from pathlib import Path


def _main() -> int:
    # Run from a checkout without installing: make the package next to this file importable.
    if importlib.util.find_spec("disposabledisco") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from disposabledisco.deps import require

    require()  # one line naming what to install, not a traceback from cli's imports
    from disposabledisco.cli import main

    return main(sys.argv[1:], entry="create_cluster.py")


if __name__ == "__main__":
    raise SystemExit(_main())
