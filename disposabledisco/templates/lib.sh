# lib.sh: helpers shared by every node script (bootstrap, join, membership).
# The renderer puts the quoted NAME=value assignments above this file.

STATE_DIR=/var/lib/disposabledisco
STAGED_TARBALL=$STATE_DIR/disco.tar
SSHD_PATH=/usr/local/bin:/usr/bin:/bin:/usr/games

log() { printf 'disposabledisco: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
trap 'log "failed (status $?) at line $LINENO: ${BASH_COMMAND%%$'\''\n'\''*}"' ERR

# EXIT_CONFIG (set above this file from ssh.py, which reads it back): exit status of a
# refusal that is the config's fault (sysexits EX_CONFIG): it would repeat on a fresh
# node, so the reconciler never counts it against the node.
# A failure a fresh node would repeat (a bad setting, a refused DISCO_USER/DISCO_ROOT).
die_config() { log "ERROR: $*"; exit "$EXIT_CONFIG"; }

# EXIT_TAMPER (set above this file from ssh.py): exit status of a refusal of something
# planted on the node (sysexits EX_NOPERM): the node is kept as evidence and never
# replaced for it (any Disco job could plant the same on a fresh node, so replacing would
# only burn nodes).

require_root() {
  [[ $EUID -eq 0 ]] || die "must run as root (sudo -n bash -s)"
  cd /
}

node_name() { hostname -s 2>/dev/null || hostname; }

# The home folder of the Disco user (created by the bootstrap): a real directory it owns.
disco_home() {
  local home
  home=$(getent passwd "$DISCO_USER" | cut -d: -f6)
  [[ -n $home ]] || die "user $DISCO_USER does not exist: bootstrap the node first"
  check_user_dir "$home"
  printf '%s\n' "$home"
}

# write_file MODE OWNER PATH < content: atomic replace, only when the content changed.
# Only for directories no unprivileged user can write (/etc, STATE_DIR): anything the
# Disco user can write goes through user_write.
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

# -- paths the Disco user can write (its home, ~/.ssh, DISCO_ROOT) -----------------------
# Root never opens, chowns or chmods anything there: it only looks with lstat (`stat`
# without -L) and reads or writes as the Disco user, so a planted symlink, hard link,
# FIFO or directory can at most redirect that user's own access, and it is refused.

# Run a command as the Disco user (plain environment, no ~/.bashrc).
as_user() {
  runuser -u "$DISCO_USER" -- env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 "$@"
}

# What lstat sees at PATH: "type|links|uid|owner", or "missing".
path_facts() { stat -c '%F|%h|%u|%U' -- "$1" 2>/dev/null || echo missing; }

refuse_path() {
  local path=$1 found=$2 want=$3
  [[ $found != "symbolic link" ]] || found+=" to $(readlink -- "$path" || echo '?')"
  log "ERROR: refusing $path on $(node_name): it is a $found, expected $want (planted by someone with access to $DISCO_USER? the node is kept for inspection: remove it, or terminate the instance yourself)"
  exit "$EXIT_TAMPER"
}

# check_user_file PATH [missing-ok]: a regular file with one link, owned by the Disco user.
check_user_file() {
  local path=$1 facts type links uid owner want
  want="a regular file owned by $DISCO_USER with one link"
  facts=$(path_facts "$path")
  if [[ $facts == missing ]]; then
    [[ ${2:-} == missing-ok ]] || die "$path is missing on $(node_name)"
    return 0
  fi
  IFS='|' read -r type links uid owner <<<"$facts"
  [[ $type == "regular file" || $type == "regular empty file" ]] ||
    refuse_path "$path" "$type" "$want"
  ((links == 1)) || refuse_path "$path" "hard link ($links links)" "$want"
  ((uid == $(id -u "$DISCO_USER"))) || refuse_path "$path" "file owned by $owner" "$want"
}

# check_user_dir PATH: a directory (not a link to one) owned by the Disco user.
check_user_dir() {
  local path=$1 facts type links uid owner
  facts=$(path_facts "$path")
  [[ $facts != missing ]] || die "$path is missing on $(node_name)"
  IFS='|' read -r type links uid owner <<<"$facts"
  [[ $type == directory ]] || refuse_path "$path" "$type" "a directory owned by $DISCO_USER"
  ((uid == $(id -u "$DISCO_USER"))) ||
    refuse_path "$path" "directory owned by $owner" "a directory owned by $DISCO_USER"
}

# user_dir MODE PATH: the Disco user's directory, created by that user when missing.
user_dir() {
  local mode=$1 path=$2
  [[ $(path_facts "$path") != missing ]] || as_user mkdir -m "$mode" -- "$path"
  check_user_dir "$path"
  as_user chmod "$mode" -- "$path"
}

# user_read PATH: the bytes of one of the Disco user's files, read by that user without
# following a link and without waiting on a FIFO.
user_read() {
  check_user_file "$1"
  as_user dd if="$1" iflag=nofollow,nonblock bs=1M status=none
}

# user_write MODE PATH < content: atomic replace by the Disco user, through a fresh
# mktemp name in the same directory (no fixed temp name to plant), then checked.
user_write() {
  local mode=$1 path=$2
  check_user_dir "$(dirname -- "$path")"
  check_user_file "$path" missing-ok
  # shellcheck disable=SC2016 # expanded by the inner shell
  as_user bash -c 'set -e; umask 077; t=$(mktemp -- "$2.XXXXXX")
    trap '\''rm -f -- "$t"'\'' EXIT
    cat >"$t"; chmod "$1" -- "$t"; mv -fT -- "$t" "$2"; trap - EXIT' user_write "$mode" "$path"
  check_user_file "$path"
}

# Run a command as the Disco user with the environment a non-interactive SSH command
# gets (sshd's default PATH, then ~/.bashrc), which is how Disco starts its workers.
# A ~/.bashrc that is no regular file (a FIFO) is skipped rather than waited on.
as_disco() {
  local home
  home=$(disco_home)
  # shellcheck disable=SC2016 # expanded by the inner shell
  runuser -u "$DISCO_USER" -- env -i HOME="$home" USER="$DISCO_USER" LOGNAME="$DISCO_USER" \
    PATH="$SSHD_PATH" SHELL=/bin/bash LANG=C.UTF-8 \
    bash -c '[ ! -f "$HOME/.bashrc" ] || . "$HOME/.bashrc" >/dev/null 2>&1 </dev/null
      exec "$@"' as_disco "$@"
}

# Disco needs these on the non-interactive PATH of its user on every node.
verify_disco_path() {
  local missing=() tool
  for tool in "$@"; do
    # shellcheck disable=SC2016 # expanded by the inner shell
    as_disco bash -c 'command -v "$1" >/dev/null' check "$tool" || missing+=("$tool")
  done
  ((${#missing[@]} == 0)) ||
    die_config "not on the non-interactive PATH of $DISCO_USER: ${missing[*]} (DISCO_INSTALL=$DISCO_INSTALL)"
}

# Unpack an installed Disco tree at / (same path on every node), once per tarball content.
# tar as root follows a link it meets on the way to a member, so folders other users can
# write (DISCO_ROOT, the Disco user's home, the temp folders) are skipped: Disco makes
# what it needs in DISCO_ROOT itself, as its user.
unpack_tarball() {
  local file=$1 expected=${2:-} sum dir home skip=()
  home=$(getent passwd "$DISCO_USER" | cut -d: -f6)
  for dir in "$DISCO_ROOT" "$home" /tmp /var/tmp /dev/shm; do
    [[ -z ${dir#/} ]] || skip+=("--exclude=${dir#/}")
  done
  sum=$(sha256sum "$file" | cut -d' ' -f1)
  [[ -z $expected || $sum == "$expected" ]] ||
    die "$file has sha256 $sum, expected $expected (DISCO_TARBALL changed or upload damaged)"
  if [[ -f $STATE_DIR/tarball.sha256 && $(<"$STATE_DIR/tarball.sha256") == "$sum" ]]; then
    log "Disco tarball $sum already unpacked"
    return
  fi
  log "unpacking Disco tarball $sum at /"
  # its settings file is the install's: kept aside for write_disco_settings, never put
  # over the one we write (a joining slave ended up with the tarball's settings)
  rm -f "$INSTALLED_SETTINGS"
  tar -xOf "$file" --wildcards --no-anchored 'etc/disco/settings.py' 2>/dev/null |
    write_file 0644 root:root "$INSTALLED_SETTINGS" || true
  [[ -s $INSTALLED_SETTINGS ]] || rm -f "$INSTALLED_SETTINGS"
  tar -xf "$file" -C / --no-same-owner --no-overwrite-dir --exclude=etc/disco/settings.py \
    "${skip[@]}"
  compile_disco_quietly
  printf '%s\n' "$sum" | write_file 0644 root:root "$STATE_DIR/tarball.sha256"
}

# Precompile Disco's Python so workers never print compile-time SyntaxWarnings. The
# folder comes from the Disco user's PATH: root compiles only a root-owned real path,
# anything else is compiled by the Disco user.
compile_disco_quietly() {
  local dir compile=()
  dir=$(as_disco python -W ignore -c \
    'import os, disco; print(os.path.dirname(disco.__file__))' 2>/dev/null) || return 0
  [[ -d $dir ]] || return 0
  if [[ $(stat -c %u -- "$dir") != 0 || $(realpath -- "$dir") != "$dir" ]]; then
    compile=(as_user)
  fi
  "${compile[@]}" python3 -W ignore -m compileall -q "$dir" >/dev/null 2>&1 ||
    log "could not precompile $dir"
}

# -- /etc/disco/settings.py: one writer on every node, after every install step ----------
# The install's own file (tarball, source build, apt package or AMI) sets what Disco needs
# to find itself (DISCO_HOME, DISCO_WWW_ROOT, ...): it is kept in STATE_DIR and its plain
# assignments go into the file we write, under ours (SETTINGS_PY), so nothing it needs is
# lost and nothing of ours is overwritten by a later install.
SETTINGS_FILE=/etc/disco/settings.py
INSTALLED_SETTINGS=$STATE_DIR/installed-settings.py
SETTINGS_HEADER='# Written by disposabledisco'

read -r -d '' MERGE_SETTINGS_PY <<'PY' || true
import ast, sys
installed, master_host = sys.argv[1], sys.argv[2]
ours = sys.stdin.read()
# where Disco's own `make install` puts itself, for an install that does not say
values = {"DISCO_HOME": "/usr/lib/disco", "DISCO_WWW_ROOT": "/usr/share/disco/master/www"}

def assignments(text, where):
    found = {}
    for node in ast.parse(text, where).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                print(f"disposabledisco: {where}: {node.targets[0].id} is not a plain value,"
                      " not kept", file=sys.stderr)
    return found

try:
    with open(installed, encoding="utf-8") as handle:
        values.update(assignments(handle.read(), installed))
except FileNotFoundError:
    pass
kept = sorted(set(values) - set(assignments(ours, "SETTINGS_PY")))
lines = ours.splitlines()
lines[1:1] = [f"# kept from the installed settings: {', '.join(kept)}"]
lines[2:2] = [f"{key} = {values[key]!r}" for key in kept]
if master_host:
    lines.append(f"DISCO_MASTER_HOST = {master_host!r}")
print("\n".join(lines))
PY

# write_disco_settings ROLE: the merged file; prints "changed" on stdout when it changed.
write_disco_settings() {
  local role=$1 host="" before after
  local folder=${SETTINGS_FILE%/*}
  install -d -m 0755 "$folder" "$STATE_DIR"
  [[ $(stat -c '%u %F' -- "$folder") == "0 directory" ]] ||
    die "$folder on $(node_name) is not a directory of root's: refusing to write settings there"
  # a file that is not ours came with an install (apt, the AMI, an older unpack): keep it
  if [[ -f $SETTINGS_FILE && ! -L $SETTINGS_FILE ]] &&
    [[ $(head -n 1 -- "$SETTINGS_FILE") != "$SETTINGS_HEADER"* ]]; then
    write_file 0644 root:root "$INSTALLED_SETTINGS" <"$SETTINGS_FILE"
  fi
  if [[ $role == master ]]; then
    host=$(hostname -s)
    [[ $host =~ ^[A-Za-z0-9-]+$ ]] || die "the master's short hostname '$host' is not usable by Disco"
  fi
  before=$(sha256sum "$SETTINGS_FILE" 2>/dev/null | cut -d' ' -f1 || true)
  printf '%s' "$SETTINGS_PY" | python3 -I -c "$MERGE_SETTINGS_PY" "$INSTALLED_SETTINGS" "$host" |
    write_file 0644 root:root "$SETTINGS_FILE"
  after=$(sha256sum "$SETTINGS_FILE" | cut -d' ' -f1)
  printf '%s\n' "$after" | write_file 0644 root:root "$STATE_DIR/settings.sha256"
  if [[ $before != "$after" ]]; then
    log "wrote $SETTINGS_FILE"
    echo changed
  fi
}
