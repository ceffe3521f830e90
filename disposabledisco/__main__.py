"""`python -m disposabledisco …` is the `disposabledisco` command."""

import sys

from .deps import CORE, SANDBOX, require

require(SANDBOX if sys.argv[1:2] == ["sandbox"] else CORE)

from .cli import main  # noqa: E402  (after the check: it imports the packages checked)

raise SystemExit(main())
