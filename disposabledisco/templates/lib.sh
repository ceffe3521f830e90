# lib.sh: helpers shared by every node script (bootstrap, join, membership).
# The renderer puts the quoted NAME=value assignments above this file.

STATE_DIR=/var/lib/disposabledisco
STAGED_TARBALL=$STATE_DIR/disco.tar
SSHD_PATH=/usr/local/bin:/usr/bin:/bin:/usr/games

log() { printf 'disposabledisco: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR

require_root() {
  [[ $EUID -eq 0 ]] || die "must run as root (sudo -n bash -s)"
}

# The home folder of the Disco user (created by the bootstrap).
disco_home() {
  local home
  home=$(getent passwd "$DISCO_USER" | cut -d: -f6)
  [[ -n $home ]] || die "user $DISCO_USER does not exist: bootstrap the node first"
  printf '%s\n' "$home"
}

# write_file MODE OWNER PATH < content: atomic replace, only when the content changed.
write_file() {
  local mode=$1 owner=$2 path=$3 tmp
  tmp=$(mktemp "$path.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  chown "$owner" "$tmp"
  if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    chmod "$mode" "$path"
    chown "$owner" "$path"
  else
    mv -f "$tmp" "$path"
  fi
}

# Run a command as the Disco user with the environment a non-interactive SSH command
# gets (sshd's default PATH, then ~/.bashrc), which is how Disco starts its workers.
as_disco() {
  local home
  home=$(disco_home)
  # shellcheck disable=SC2016 # expanded by the inner shell
  runuser -u "$DISCO_USER" -- env -i HOME="$home" USER="$DISCO_USER" LOGNAME="$DISCO_USER" \
    PATH="$SSHD_PATH" SHELL=/bin/bash LANG=C.UTF-8 \
    bash -c '. "$HOME/.bashrc" >/dev/null 2>&1 </dev/null; exec "$@"' as_disco "$@"
}

# Disco needs these on the non-interactive PATH of its user on every node.
verify_disco_path() {
  local missing=() tool
  for tool in "$@"; do
    # shellcheck disable=SC2016 # expanded by the inner shell
    as_disco bash -c 'command -v "$1" >/dev/null' check "$tool" || missing+=("$tool")
  done
  ((${#missing[@]} == 0)) ||
    die "not on the non-interactive PATH of $DISCO_USER: ${missing[*]} (DISCO_INSTALL=$DISCO_INSTALL)"
}

# Unpack an installed Disco tree at / (same path on every node), once per tarball content.
unpack_tarball() {
  local file=$1 expected=${2:-} sum
  sum=$(sha256sum "$file" | cut -d' ' -f1)
  [[ -z $expected || $sum == "$expected" ]] ||
    die "$file has sha256 $sum, expected $expected (DISCO_TARBALL changed or upload damaged)"
  if [[ -f $STATE_DIR/tarball.sha256 && $(<"$STATE_DIR/tarball.sha256") == "$sum" ]]; then
    log "Disco tarball $sum already unpacked"
    return
  fi
  log "unpacking Disco tarball $sum at /"
  tar -xf "$file" -C / --no-same-owner --no-overwrite-dir
  compile_disco_quietly
  printf '%s\n' "$sum" | write_file 0644 root:root "$STATE_DIR/tarball.sha256"
}

# Precompile Disco's Python so workers never print compile-time SyntaxWarnings.
compile_disco_quietly() {
  local dir
  dir=$(as_disco python -W ignore -c \
    'import os, disco; print(os.path.dirname(disco.__file__))' 2>/dev/null) || return 0
  if [[ -d $dir ]]; then
    python3 -W ignore -m compileall -q "$dir" >/dev/null 2>&1 || log "could not precompile $dir"
  fi
}
