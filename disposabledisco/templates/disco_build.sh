#!/usr/bin/env bash
# disco_build.sh: build Disco from a source bundle and pack the installed tree.
#
# Usage (as root, on the master): disco_build.sh BUNDLE SHA256 OUTDIR
#   (or DISCO_BUNDLE, DISCO_BUNDLE_SHA256, DISCO_BUILD_OUT in the environment)
# Result: OUTDIR/disco-installed-SHA256.tar.gz, the tree `make install` staged (usr/bin,
# usr/lib/disco, usr/share/disco, etc/disco/settings.py) plus the Python package under
# usr/lib/python3/dist-packages. Built once per bundle hash: a second run does nothing.
# Render it with disposabledisco.disco_source.build_script(), which embeds our fixes.
set -euo pipefail

bundle=${1:-${DISCO_BUNDLE:-}}
want_sha=${2:-${DISCO_BUNDLE_SHA256:-}}
out=${3:-${DISCO_BUILD_OUT:-}}
work=

log() { printf 'disco build: %s\n' "$*" >&2; }

die() {
  log "FAILED: $*"
  exit 1
}

cleanup() {
  if [[ -n $work ]]; then
    rm -rf -- "$work"
  fi
}

# Run one named step with its output in a log; a failure names the step and shows the tail.
step() {
  local name=$1
  shift
  log "step $name"
  local step_log=$work/$name.log rc=0
  # A subshell in the background keeps `set -e` in force inside the step (an `if` or `||`
  # around a function turns it off), and `wait` collects its status.
  ("$@") >"$step_log" 2>&1 &
  wait "$!" || rc=$?
  if ((rc != 0)); then
    log "step $name failed (exit $rc); last lines of its log:"
    tail -n 40 "$step_log" >&2
    die "step $name"
  fi
}

check_inputs() {
  [[ -n $bundle && -n $want_sha && -n $out ]] \
    || die "usage: disco_build.sh BUNDLE SHA256 OUTDIR"
  [[ $want_sha =~ ^[0-9a-f]{64}$ ]] || die "SHA256 must be 64 lowercase hex digits, got '$want_sha'"
  [[ -f $bundle ]] || die "no source bundle at $bundle"
  local tool missing=()
  for tool in erl rebar make git python3 tar sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    die "missing build tools: ${missing[*]} (apt-get install erlang-nox erlang-dev rebar erlang-eunit erlang-tools make git python3)"
  fi
}

# The output folder holds fixed names: it must be ours and writable by no one else
# (an existing folder is checked, never chmod-ed: it could be /tmp).
prepare_out() {
  [[ -d $out ]] || (umask 022 && mkdir -p -- "$out")
  [[ -O $out ]] || die "output folder $out is not owned by $(id -un); use a private folder"
  if [[ -n $(find "$out" -maxdepth 0 -perm /022) ]]; then
    die "output folder $out is writable by group or others; use a private folder"
  fi
}

verify_bundle() {
  local got
  got=$(sha256sum <"$bundle" | cut -d' ' -f1)
  [[ $got == "$want_sha" ]] || { echo "bundle $bundle has sha256 $got, expected $want_sha"; return 1; }
}

unpack() {
  mkdir "$work/src"
  tar -xzf "$bundle" -C "$work/src" --no-same-owner
  local tops=("$work"/src/*)
  if [[ ${#tops[@]} -ne 1 || ! -f ${tops[0]}/Makefile || ! -d ${tops[0]}/master ]]; then
    echo "the bundle must hold one folder with Disco's Makefile and master/ in it"
    return 1
  fi
  mv -- "${tops[0]}" "$work/disco"
}

# Four .app.src files say {vsn, git}: rebar runs `git describe` and needs a repository.
make_repository() {
  local version
  version=$(sed -n 's/^DISCO_VERSION *= *//p' Makefile)
  [[ -n $version ]] || { echo "no DISCO_VERSION in the Makefile"; return 1; }
  git init -q
  git add -A
  GIT_CONFIG_NOSYSTEM=1 git -c user.name="disco build" -c user.email="disco-build@localhost" \
    -c commit.gpgsign=false commit -q -m "Disco $version source bundle $want_sha"
  git tag "$version"
  echo "version $version"
}

# Our changes for OTP 25 and Python 3.11 (disposabledisco/disco_fixes.py, embedded at render).
apply_fixes() {
  python3 - "$work/disco" <<'DISCO_FIXES_PY'
raise SystemExit("disco_build.sh is a template: render it with disco_source.build_script()")
DISCO_FIXES_PY
}

# master/rebar (2011) does not run on OTP 25; the Makefile calls ./rebar, so put Debian's there.
use_system_rebar() {
  install -m 0755 -- "$(command -v rebar)" master/rebar
  ./master/rebar --version
}

# `deterministic` keeps the build folder's random name out of the .beam files.
compile() {
  ERL_COMPILER_OPTIONS="[deterministic]" make master
  ls master/ebin/disco.app
}

install_tree() {
  make DESTDIR="$work/stage" install-node install-master \
    "$work/stage/usr/bin/disco" "$work/stage/usr/bin/ddfs"
  local site=$work/stage/usr/lib/python3/dist-packages
  install -d -m 0755 -- "$site"
  cp -r lib/disco lib/clx "$site/"
  grep -q '^DISCO_HOME' "$work/stage/etc/disco/settings.py"
}

# Sorted names, fixed owner and mtime (2000-01-01: Disco zips its Python package for every
# job, and zip cannot store times before 1980): same bundle, same tarball bytes.
pack() {
  local target=$out/disco-installed-$want_sha.tar.gz
  tar -C "$work/stage" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime=@946684800 -cf - . | gzip -n >"$work/installed.tar.gz"
  mv -f -- "$work/installed.tar.gz" "$out/.disco-installed.$$.tmp"
  mv -f -- "$out/.disco-installed.$$.tmp" "$target"
  du -b "$target"
}

main() {
  check_inputs
  # Before trusting what is there: a tarball in a folder others can write is not ours.
  prepare_out
  local target=$out/disco-installed-$want_sha.tar.gz
  if [[ -s $target ]]; then
    log "already built: $target"
    return 0
  fi
  work=$(mktemp -d)
  trap cleanup EXIT
  local started=$SECONDS
  step verify verify_bundle
  step unpack unpack
  cd "$work/disco"
  step repository make_repository
  step fixes apply_fixes
  step rebar use_system_rebar
  step compile compile
  step install install_tree
  step pack pack
  log "built $target in $((SECONDS - started)) s"
  printf '%s\n' "$target"
}

main "$@"
