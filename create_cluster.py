#!/usr/bin/env python3
"""Converge the cluster to a config: `python create_cluster.py config.json [--wait] [--dry-run]`.

The same as `disposabledisco up config.json`; works from a checkout without installing.
"""

import sys
from pathlib import Path

try:
    import disposabledisco  # noqa: F401
except ImportError:  # running from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from disposabledisco.deps import require

require()  # one line naming what to install, before cli imports boto3/jsonschema/paramiko

from disposabledisco.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], entry="create_cluster.py"))
