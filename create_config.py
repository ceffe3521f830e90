#!/usr/bin/env python3
"""Print a default config: `python create_config.py > config.json`.

Kept from the original 2012 tool; it is the same as `disposabledisco init`.
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

    return main(sys.argv[1:], entry="create_config.py")


if __name__ == "__main__":
    raise SystemExit(_main())
