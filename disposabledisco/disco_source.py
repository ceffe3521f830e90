"""Disco from source: the pinned upstream commits, the bundle assembled from them, the build.

Disco is in no package registry and its last release does not build on a current Erlang, so
the tool builds it: `assemble_bundle` fetches Disco and the Erlang dependencies its master
needs at the commits below and writes one reproducible source tarball (same commits, same
bytes, same sha256); `build_script` renders `templates/disco_build.sh`, which a master runs
to build that bundle with our fixes (`disco_fixes.py`) and pack the installed tree.

Standard library only, no package imports: a master without this package runs the file
itself (`python3 disco_source.py DEST [BASE_URL]`) to assemble the bundle when the user gave
none.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

DEFAULT_BASE_URL = "https://github.com"
TOP = "disco"
# One fixed time for every entry (2000-01-01 UTC), so the bytes depend on content only.
FIXED_MTIME = 946684800


@dataclasses.dataclass(frozen=True)
class Pin:
    """One upstream repository at one commit, and where it goes in the bundle."""

    path: str  # inside the bundle's top folder
    repo: str  # owner/name under the base URL
    ref: str  # the tag or branch the commit was taken from (provenance only)
    commit: str
    license: str


# Provenance: ../shared/vendor/README.md (2026-12-02). Disco's develop branch (0.5.4 + 25
# commits) and the dependency versions that compile and run on Erlang/OTP 25; Disco's own
# rebar.config asks for older ones (lager 2.0.3, ...) that do not.
PINS: tuple[Pin, ...] = (
    Pin("", "discoproject/disco", "develop",
        "be65272d3eecca184a3c8f2fa911b86ac87a4e8a", "BSD 3-clause"),
    Pin("master/deps/lager", "erlang-lager/lager", "3.9.2",
        "459a3b2cdd9eadd29e5a7ce5c43932f5ccd6eb88", "Apache 2.0"),
    Pin("master/deps/goldrush", "DeadZen/goldrush", "0.1.9",
        "8f1b715d36b650ec1e1f5612c00e28af6ab0de82", "ISC"),
    Pin("master/deps/meck", "eproxus/meck", "0.9.2",
        "5aaa24886db404f995c9a91b421367f6bfe6e566", "Apache 2.0"),
    Pin("master/deps/mochiweb", "mochi/mochiweb", "v2.22.0",
        "835b107a4da4550080d032623ff6ae9a18d02c37", "MIT"),
    Pin("master/deps/folsomite", "discoproject/folsomite", "master",
        "e8f50c37e89344830c6cbd3caf6f4084e51c3875", "Apache 2.0"),
    Pin("master/deps/folsom", "discoproject/folsom", "master",
        "7b85131e88d5f9e4586ac2022ec1ecd5b98856d4", "Apache 2.0"),
    Pin("master/deps/bear", "boundary/bear", "0.8.2",
        "119234548783af19b8ec75c879c5062676b92571", "Apache 2.0"),
    Pin("master/deps/plists", "discoproject/plists", "master",
        "5c52f3b55ff45d52454ae79c000bf029137a9727", "MIT"),
)


class BundleError(Exception):
    """A source bundle cannot be assembled (repository unreachable, commit missing, ...)."""


def bundle_sha256(path: Path) -> str:
    """The sha256 of a bundle file: it names the build, so one bundle is built once."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git(args: list[str], cwd: Path, what: str) -> bytes:
    # No prompts, no user or system git configuration: the pins alone decide the result.
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False,
                                env=env)
    except FileNotFoundError:
        raise BundleError("git is not installed (apt-get install git)") from None
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise BundleError(f"{what}: git {args[0]} failed: {message[-1] if message else '?'}")
    return result.stdout


def _fetch_tree(url: str, commit: str, scratch: Path) -> bytes:
    """The tar of one commit's tree, fetched alone (depth 1) from the repository at `url`."""
    what = f"{url} at {commit}"
    repo = scratch / commit
    repo.mkdir()
    _git(["init", "-q", "--bare"], repo, what)
    _git(["fetch", "-q", "--depth", "1", url, commit], repo, what)
    got = _git(["rev-parse", "FETCH_HEAD"], repo, what).decode().strip()
    if got != commit:
        raise BundleError(f"{what}: fetched {got} instead")
    return _git(["archive", "--format=tar", commit], repo, what)


def _entry(name: str, member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A tar entry with only what the content decides: name, type, size, executable bit."""
    info = tarfile.TarInfo(name)
    info.type = member.type
    info.size = member.size
    info.linkname = member.linkname
    info.mode = 0o755 if member.isdir() or member.mode & 0o111 else 0o644
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def assemble_bundle(dest: Path, base_url: str = DEFAULT_BASE_URL,
                    commits: Mapping[str, str] | None = None) -> str:
    """Write the source bundle for `PINS` to `dest` from `base_url`; its sha256.

    Every repository is fetched from `{base_url}/{owner}/{name}`. `commits` maps a pinned
    commit to the commit actually fetched (tests use local repositories whose commits
    differ); unmapped pins are fetched as pinned. The tarball is reproducible: entries
    sorted, owner root, one fixed mtime, gzip without a timestamp.
    """
    commits = commits or {}
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    with tempfile.TemporaryDirectory(prefix="disco-bundle-") as scratch:
        for pin in PINS:
            url = f"{base_url.rstrip('/')}/{pin.repo}"
            tree = _fetch_tree(url, commits.get(pin.commit, pin.commit), Path(scratch))
            prefix = "/".join(part for part in (TOP, pin.path) if part)
            with tarfile.open(fileobj=io.BytesIO(tree)) as archive:
                for member in archive:  # (tarfile reads git's pax header itself)
                    name = f"{prefix}/{member.name.rstrip('/')}".rstrip("/")
                    if name in entries and not member.isdir():
                        raise BundleError(f"{pin.repo}: {name} is also in another repository")
                    data = archive.extractfile(member).read() if member.isfile() else None
                    entries[name] = (_entry(name, member), data)
    # Folders between the top and each dependency (e.g. master/deps) when no repo has them.
    for name in list(entries):
        parent = name.rpartition("/")[0]
        while parent and parent not in entries:
            folder = tarfile.TarInfo(parent)
            folder.type = tarfile.DIRTYPE
            entries[parent] = (_entry(parent, folder), None)
            parent = parent.rpartition("/")[0]
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as packed, \
                tarfile.open(fileobj=packed, mode="w", format=tarfile.GNU_FORMAT) as out:
            for name in sorted(entries):
                info, data = entries[name]
                out.addfile(info, io.BytesIO(data) if data is not None else None)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return bundle_sha256(dest)


def build_script() -> str:
    """`templates/disco_build.sh` with `disco_fixes.py` embedded: one standalone script."""
    package = resources.files("disposabledisco")
    text = (package / "templates" / "disco_build.sh").read_text()
    placeholder = ('raise SystemExit("disco_build.sh is a template: '
                   'render it with disco_source.build_script()")\n')
    if text.count(placeholder) != 1:
        raise RuntimeError("disco_build.sh lost its fixes placeholder")
    return text.replace(placeholder, (package / "disco_fixes.py").read_text())


def main(argv: list[str]) -> int:
    """`disco_source.py DEST [BASE_URL]`: assemble the pinned bundle, print its sha256."""
    if len(argv) not in (1, 2):
        print("usage: disco_source.py DEST [BASE_URL]", file=sys.stderr)
        return 2
    try:
        print(assemble_bundle(Path(argv[0]), *argv[1:]))
    except BundleError as error:
        print(f"disco bundle: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
