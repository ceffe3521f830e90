"""The `init` command's logic: print a complete, valid config to start from."""

from __future__ import annotations

import json

from disposabledisco.config import default_config


def render_default_config() -> str:
    """The default config as the text `init` prints: 2-space JSON ending in a newline.

    Key order follows the schema, so the file reads like docs/config-reference.md.
    """
    return json.dumps(default_config(), indent=2, ensure_ascii=False) + "\n"
