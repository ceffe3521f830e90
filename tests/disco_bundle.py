"""Where the `disco` tier finds a Disco source bundle: one rule for every test module.

`DISCO_SOURCE` when set; else the first `shared/vendor/disco-*-src.tar.gz` beside the
checkout or beside one of its parent folders (`../shared/vendor` for a clone next to the
shared folder, further up for a clone nested deeper). The tier skips with the reason when
there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def vendor_folders() -> list[Path]:
    """The `shared/vendor` folders looked at, nearest first."""
    return [parent / "shared" / "vendor" for parent in REPO.parents]


def find_bundle() -> Path | None:
    """The bundle to use, or None; a DISCO_SOURCE that is not a file is an error."""
    named = os.environ.get("DISCO_SOURCE")
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(f"DISCO_SOURCE={named} is not a file")
        return Path(named)
    for folder in vendor_folders():
        found = sorted(folder.glob("disco-*-src.tar.gz"))
        if found:
            return found[-1]
    return None


def source_bundle() -> Path:
    """The bundle, or skip the test saying where it was looked for."""
    try:
        bundle = find_bundle()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    if bundle is None:
        pytest.skip(f"no Disco source bundle in {vendor_folders()[0]} (or a shared/vendor "
                    "folder further up) and DISCO_SOURCE unset")
    return bundle
