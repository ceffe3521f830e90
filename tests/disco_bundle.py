"""The `disco` tier's Disco: where the source bundle is found, and its one build per session.

`DISCO_SOURCE` when set; else the first `shared/vendor/disco-*-src.tar.gz` beside the
checkout or beside one of its parent folders (`../shared/vendor` for a clone next to the
shared folder, further up for a clone nested deeper). The tier skips with the reason when
there is none. `vendor_build` builds that bundle once per session for every module that
needs the installed tree (a fixture imported into several modules would run once per
module: one build each).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from disposabledisco.disco_source import build_script, bundle_sha256

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


BUILD_TOOLS = ("erl", "rebar", "make", "git", "python3", "tar", "shellcheck")


def need_tools(*tools: str) -> None:
    """Skip unless root and every tool is on PATH: the build and the job run need both."""
    if os.geteuid() != 0:
        pytest.skip("the Disco build and job run need root")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (see .ci/apt-packages.txt)")


@dataclass
class Build:
    returncode: int
    stderr: str
    seconds: float


def write_build_script(folder: Path) -> Path:
    """The product's rendered build script, written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disco_build.sh"
    path.write_text(build_script())
    return path


def run_build(script: Path, bundle: Path, out: Path, sha: str | None = None) -> Build:
    """Run the build as a node would over SSH: the script on stdin of `bash -s`."""
    started = time.monotonic()
    result = subprocess.run(["bash", "-s", "--", str(bundle), sha or bundle_sha256(bundle),
                             str(out)], input=script.read_text(), capture_output=True,
                            text=True, timeout=600, check=False)
    return Build(result.returncode, result.stderr, time.monotonic() - started)


@functools.cache
def _build_once(basetemp: Path) -> tuple[Path, Build, Path]:
    bundle = source_bundle()
    out = basetemp / "disco-vendor-build" / "out"
    build = run_build(write_build_script(out.parent), bundle, out)
    assert build.returncode == 0, build.stderr
    print(f"\nDisco build: {build.seconds:.1f} s")
    return out / f"disco-installed-{bundle_sha256(bundle)}.tar.gz", build, out


def vendor_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Build, Path]:
    """The vendor bundle built once per session: (installed tarball, the build, its folder)."""
    need_tools(*BUILD_TOOLS)
    return _build_once(tmp_path_factory.getbasetemp())


def rebundle(bundle: Path, dest: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of `bundle` with some files replaced (bytes) or removed (None)."""
    with tarfile.open(bundle) as src, tarfile.open(dest, "w:gz") as out:
        for member in src:
            name = member.name.removeprefix("./")
            if name in change:
                data = change[name]
                if data is None:
                    continue
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
            else:
                out.addfile(member, src.extractfile(member) if member.isfile() else None)
    return dest


def read_member(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as src:
        return src.extractfile(name).read()


def broken_bundle(dest: Path) -> Path:
    """The source bundle with an Erlang syntax error in disco_server.erl: fails at compile."""
    bundle = source_bundle()
    name = "disco/master/src/disco_server.erl"
    return rebundle(bundle, dest, {name: read_member(bundle, name) + b"\nthis is not erlang(\n"})
