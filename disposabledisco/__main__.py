"""`python -m disposabledisco …` is the `disposabledisco` command."""

from .cli import main

raise SystemExit(main())
