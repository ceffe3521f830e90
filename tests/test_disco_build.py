"""The `disco` tier: Disco built from source by our build step, proven by a real Disco job.

Uses the source bundle in `../shared/vendor/` (or the file named by `DISCO_SOURCE`) and
skips with the reason when it, root, or a build tool is missing. The job runs on the
installed tree in an overlay of `/` inside new mount, network, UTS and PID namespaces, so
Disco sees its real paths (`/usr/lib/disco`, `/etc/disco/settings.py`) and port 8989 while
the machine sees none of it; everything it started dies with the namespace's first process.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from disposabledisco import bootstrap, disco_fixes, disco_source
from disposabledisco.disco_source import PINS, BundleError, assemble_bundle, bundle_sha256
from tests.disco_bundle import (
    BUILD_TOOLS,
    Build,
    broken_bundle,
    need_tools,
    read_member,
    rebundle,
    run_build,
    source_bundle,
    vendor_build,
    write_build_script,
)

pytestmark = pytest.mark.disco

JOB_TOOLS = ("unshare", "ip", "chroot", "mount")


@pytest.fixture(scope="module")
def build_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tools(*BUILD_TOOLS)
    return write_build_script(tmp_path_factory.mktemp("script"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Build, Path]:
    """The vendor bundle's one build of the session: (tarball, the build, output folder)."""
    tarball, build, out = vendor_build(tmp_path_factory)
    print(f"\nbuild: {build.seconds:.1f} s, installed tarball {tarball.stat().st_size} bytes")
    return tarball, build, out


def test_rendered_script_is_shellcheck_clean_and_carries_the_fixes(build_script: Path) -> None:
    subprocess.run(["shellcheck", str(build_script)], check=True)
    text = build_script.read_text()
    assert "FIXES:" in text and "is a template" not in text


def test_build_installs_a_complete_tree(built: tuple[Path, Build, Path]) -> None:
    tarball, build, _ = built
    steps = [line.split()[-1] for line in build.stderr.splitlines()
             if line.startswith("disco build: step ")]
    assert steps == ["verify", "unpack", "repository", "fixes", "rebar", "compile", "install",
                     "pack"]
    with tarfile.open(tarball) as tree:
        names = {member.name.removeprefix("./") for member in tree}
        settings = tree.extractfile("./etc/disco/settings.py").read().decode()
        util = tree.extractfile("./usr/lib/python3/dist-packages/disco/util.py").read()
        app = tree.extractfile("./usr/lib/disco/master/ebin/disco.app").read().decode()
    for beam in ("disco_server", "job_coordinator", "web_server", "worker_utils"):
        assert f"usr/lib/disco/master/ebin/{beam}.beam" in names
    for dep in ("lager", "mochiweb", "plists", "folsomite", "folsom", "bear", "goldrush"):
        assert any(name.startswith(f"usr/lib/disco/master/deps/{dep}/ebin/")
                   and name.endswith(".beam") for name in names), dep
    assert {"usr/bin/disco", "usr/bin/ddfs", "usr/lib/python3/dist-packages/clx/__init__.py",
            "usr/share/disco/master/www/index.html"} <= names
    assert 'DISCO_HOME = "/usr/lib/disco"' in settings
    assert 'DISCO_WWW_ROOT = "/usr/share/disco/master/www"' in settings
    assert b"from urllib.parse import urlparse" in util
    assert '{vsn,"0.5.4"}' in app  # the repository step gave `{vsn, git}` a version


def test_second_run_with_the_same_bundle_does_nothing(
        build_script: Path, built: tuple[Path, Build, Path]) -> None:
    tarball, _, out = built
    before = (tarball.stat().st_mtime_ns, sorted(os.listdir(out)))
    again = run_build(build_script, source_bundle(), out)
    assert again.returncode == 0, again.stderr
    assert "already built" in again.stderr and "step" not in again.stderr
    assert (tarball.stat().st_mtime_ns, sorted(os.listdir(out))) == before


def test_a_bundle_that_does_not_compile_fails_naming_the_step(
        build_script: Path, tmp_path: Path) -> None:
    result = run_build(build_script, broken_bundle(tmp_path / "broken.tar.gz"),
                       tmp_path / "out")
    assert result.returncode == 1
    assert "step compile failed" in result.stderr
    assert "disco_server.erl" in result.stderr  # the log tail shows the compiler's error
    assert "FAILED: step compile" in result.stderr.splitlines()[-1]
    assert not list((tmp_path / "out").glob("*.tar.gz"))


def test_upstream_text_that_a_fix_does_not_expect_fails_naming_the_file(
        build_script: Path, tmp_path: Path) -> None:
    bundle = source_bundle()
    name = "disco/lib/disco/util.py"
    changed = read_member(bundle, name).replace(b"from urlparse import urlparse",
                                                b"from urllib.parse import urlparse")
    result = run_build(build_script, rebundle(bundle, tmp_path / "changed.tar.gz",
                                              {name: changed}), tmp_path / "out")
    assert result.returncode == 1
    assert "step fixes failed" in result.stderr
    assert "lib/disco/util.py: expected 1 occurrence of 'from urlparse import urlparse'" \
        in result.stderr


def test_fixes_write_nothing_when_one_does_not_apply(tmp_path: Path) -> None:
    bundle = source_bundle()
    names = sorted({name for name, _, _ in disco_fixes.FIXES})
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(read_member(bundle, f"disco/{name}"))
    last = disco_fixes.FIXES[-1][0]
    (tmp_path / last).write_text("upstream rewrote this file\n")
    before = {name: (tmp_path / name).read_bytes() for name in names}
    with pytest.raises(disco_fixes.FixError, match=f"^{last}: expected 1 occurrence"):
        disco_fixes.apply_fixes(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in names} == before


def test_a_bundle_with_the_wrong_hash_is_refused(build_script: Path, tmp_path: Path) -> None:
    result = run_build(build_script, source_bundle(), tmp_path / "out", sha="0" * 64)
    assert result.returncode == 1
    assert "step verify failed" in result.stderr and "expected " + "0" * 64 in result.stderr


def test_an_output_folder_others_can_write_is_refused(build_script: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o777)
    bundle = source_bundle()
    result = run_build(build_script, bundle, out)
    assert result.returncode == 1
    assert "writable by group or others" in result.stderr and not os.listdir(out)
    # Nor is a tarball someone else put there taken as already built.
    (out / f"disco-installed-{bundle_sha256(bundle)}.tar.gz").write_bytes(b"planted")
    result = run_build(build_script, bundle, out)
    assert result.returncode == 1
    assert "writable by group or others" in result.stderr and "already built" not in result.stderr


def make_repo(path: Path, files: dict[str, tuple[bytes, int | None]]) -> str:
    """A git repository at `path` holding `files`: name -> (bytes, mode), or (link target,
    None) for a symbolic link; its commit."""
    for name, (data, mode) in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:
            target.symlink_to(data.decode())
        else:
            target.write_bytes(data)
            target.chmod(mode)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-C", str(path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A", "-f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "vendor"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def bundle_files(bundle: Path) -> dict[str, tuple[bytes, int | None]]:
    """Files and links of a bundle: name -> (content, 0o755/0o644), or (target, None)."""
    with tarfile.open(bundle) as tree:
        return {member.name.removeprefix("./"):
                (tree.extractfile(member).read(), 0o755 if member.mode & 0o100 else 0o644)
                if member.isfile() else (member.linkname.encode(), None)
                for member in tree if member.isfile() or member.issym()}


@dataclass
class Upstream:
    """Local git repositories standing in for the pinned upstream ones."""

    base_url: str
    commits: dict[str, str]  # pinned commit -> the local repository's commit


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    """One local repository per pin, holding exactly that pin's part of the vendor bundle."""
    need_tools("git")
    vendor = bundle_files(source_bundle())
    root = tmp_path_factory.mktemp("upstream")
    dep_paths = [pin.path for pin in PINS if pin.path]
    commits = {}
    for pin in PINS:
        prefix = "/".join(part for part in ("disco", pin.path) if part) + "/"
        files = {name[len(prefix):]: entry for name, entry in vendor.items()
                 if name.startswith(prefix)
                 and not any(name.startswith(f"disco/{dep}/") for dep in dep_paths
                             if dep != pin.path)}
        assert files, pin.repo
        commits[pin.commit] = make_repo(root / pin.repo, files)
    return Upstream(f"file://{root}", commits)


def test_assembled_bundle_matches_upstream_and_is_reproducible(
        upstream: Upstream, tmp_path: Path) -> None:
    vendor = bundle_files(source_bundle())
    base_url, commits = upstream.base_url, upstream.commits
    first = assemble_bundle(tmp_path / "one.tar.gz", base_url, commits)
    second = assemble_bundle(tmp_path / "two.tar.gz", base_url, commits)
    assert first == second == bundle_sha256(tmp_path / "two.tar.gz")
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    assert bundle_files(tmp_path / "one.tar.gz") == vendor
    with tarfile.open(tmp_path / "one.tar.gz") as tree:
        members = tree.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, disco_source.FIXED_MTIME)}

    # A commit the repository does not have is an error naming the repository.
    unknown = dict(commits)
    unknown[PINS[3].commit] = "f" * 40
    with pytest.raises(BundleError, match=f"{PINS[3].repo} at {'f' * 40}"):
        assemble_bundle(tmp_path / "three.tar.gz", base_url, unknown)
    assert not (tmp_path / "three.tar.gz").exists()

    # The module alone (as a master without this package runs it) fetches the real pins:
    # these repositories lack them, and it says which one, exit 1, no file.
    alone = tmp_path / "alone" / "disco_source.py"
    alone.parent.mkdir()
    shutil.copy(disco_source.__file__, alone)
    result = subprocess.run([sys.executable, str(alone), str(tmp_path / "four.tar.gz"),
                             base_url], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"disco bundle: {base_url}/{PINS[0].repo} at "
                                    f"{PINS[0].commit}: git fetch failed")
    assert not (tmp_path / "four.tar.gz").exists()


def test_the_assembled_bundle_builds_the_same_installed_tree(
        upstream: Upstream, build_script: Path, built: tuple[Path, Build, Path],
        tmp_path: Path) -> None:
    bundle = tmp_path / "assembled.tar.gz"
    sha = assemble_bundle(bundle, upstream.base_url, upstream.commits)
    result = run_build(build_script, bundle, tmp_path / "out", sha)
    assert result.returncode == 0, result.stderr
    tarball = tmp_path / "out" / f"disco-installed-{sha}.tar.gz"
    # Same sources, deterministic compile, normalised tar: the very bytes of the vendor build.
    assert tarball.read_bytes() == built[0].read_bytes()


WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog")
# Two input files, so the map stage runs two tasks on the DDFS blobs `ddfs chunk` makes.
TEXTS = ["\n".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(i % 6 + 1))
                   for i in range(start, start + 150)) + "\n" for start in (0, 150)]

JOB_PY = bootstrap.template("word_count.py")

# Runs as PID 1 of the new namespaces: overlay of / with the installed tree on top, then
# Disco inside a chroot of it, as the master's own short host name (workers start locally).
OUTER_SH = '''\
set -euo pipefail
T=$1
ip link set lo up
hostname discotest
mount -t tmpfs tmpfs "$T/ovl"
mkdir "$T/ovl/upper" "$T/ovl/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/ovl/upper,workdir=$T/ovl/work" "$T/root"
mount -t proc proc "$T/root/proc"
mount --rbind /dev "$T/root/dev"
mount -t tmpfs tmpfs "$T/root/tmp"
tar -xzf "$T/installed.tar.gz" -C "$T/root"
# Erlang takes the first name of the address its host name resolves to: own line.
printf '127.0.0.1 localhost\\n127.0.1.1 discotest\\n' >"$T/root/etc/hosts"
# What a provisioner does: keep the installed settings, ours on top (one node: 1 replica).
printf 'DDFS_TAG_MIN_REPLICAS = 1\\nDDFS_TAG_REPLICAS = 1\\nDDFS_BLOB_REPLICAS = 1\\n' \\
  >>"$T/root/etc/disco/settings.py"
cp -r "$T/job" "$T/root/tmp/job"
exec chroot "$T/root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \\
  LOGNAME=root USER=root bash /tmp/job/inner.sh
'''

INNER_SH = '''\
set -euo pipefail
cd /tmp/job
fail() {
  echo "FAILED: $*"
  disco events @ 2>/dev/null | tail -n 30 || true
  tail -n 30 /usr/var/disco/log/console.log || true
  exit 1
}
echo '[["discotest", "2"]]' >/usr/var/disco/disco_8989.config
disco start
connected=
for _ in $(seq 200); do
  if disco nodeinfo 2>/dev/null | grep -q "'connected': True"; then connected=1; break; fi
  sleep 0.3
done
[[ -n $connected ]] || fail "the worker node never connected"
ddfs chunk data:words ./a.txt ./b.txt
WORD_COUNT_PAUSE=0 python3 job.py tag://data:words || fail "the job failed"
disco stop
'''


def run_namespaced(folder: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """`folder/outer.sh FOLDER` as PID 1 of new mount, network, UTS and PID namespaces:
    everything Disco started there dies with it, the machine sees none of it."""
    return subprocess.run(
        ["unshare", "--mount", "--net", "--uts", "--pid", "--fork", "--kill-child",
         "--mount-proc", "bash", str(folder / "outer.sh"), str(folder)],
        capture_output=True, text=True, timeout=timeout, check=False)


def test_word_count_runs_on_the_built_tree(built: tuple[Path, Build, Path],
                                           tmp_path: Path) -> None:
    need_tools(*JOB_TOOLS)
    tarball, _, _ = built
    for folder in ("ovl", "root", "job"):
        (tmp_path / folder).mkdir()
    shutil.copy(tarball, tmp_path / "installed.tar.gz")
    (tmp_path / "outer.sh").write_text(OUTER_SH)
    (tmp_path / "job" / "inner.sh").write_text(INNER_SH)
    (tmp_path / "job" / "job.py").write_text(JOB_PY)
    for name, text in zip(("a.txt", "b.txt"), TEXTS, strict=True):
        (tmp_path / "job" / name).write_text(text)
    started = time.monotonic()
    result = run_namespaced(tmp_path, timeout=300)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Master discotest:8989 started" in output
    results = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, output
    counts = json.loads(results[0].removeprefix("RESULT "))
    expected = collections.Counter(" ".join(TEXTS).split())
    assert counts == dict(expected)
    assert sum(counts.values()) > 1000
    job_line = next(line for line in result.stdout.splitlines() if line.startswith("JOB_"))
    print(f"\nDisco start + push + word count + stop: {seconds:.1f} s; {job_line}")
