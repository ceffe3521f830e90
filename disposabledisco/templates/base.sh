# base.sh: bootstrap steps shared by both roles. Every step checks before it acts, so the
# script can be run again after any interruption and converges to the same node.

VENV=/opt/disposabledisco/venv
LOCK_DEADLINE_SECONDS=600

# Cloud-init may still be installing packages on a fresh instance.
wait_for_cloud_init() {
  command -v cloud-init >/dev/null 2>&1 || return 0
  log "waiting for cloud-init to finish"
  timeout "$LOCK_DEADLINE_SECONDS" cloud-init status --wait >/dev/null 2>&1 ||
    log "cloud-init reported a problem or did not finish; continuing"
}

# True while another process holds one of dpkg's or apt's locks (fcntl locks, per file).
apt_locked() {
  python3 - /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
    /var/cache/apt/archives/lock <<'PY' 2>/dev/null
import fcntl, os, sys
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    with open(path, "a") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(0)
sys.exit(1)
PY
}

wait_for_apt_lock() {
  command -v python3 >/dev/null 2>&1 || return 0
  local deadline=$((SECONDS + LOCK_DEADLINE_SECONDS))
  while apt_locked; do
    ((SECONDS < deadline)) || die "apt/dpkg is still locked after ${LOCK_DEADLINE_SECONDS}s"
    sleep 1
  done
}

apt_get() {
  wait_for_apt_lock
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$LOCK_DEADLINE_SECONDS" \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

# apt-get update exits 0 even when every source failed: read its output instead.
apt_update() {
  local out
  log "apt-get update"
  if ! out=$(apt_get update 2>&1); then
    printf '%s\n' "$out" >&2
    die "apt-get update failed"
  fi
  if grep -qE '^(W|E): (Failed to fetch|Some index files failed)' <<<"$out"; then
    printf '%s\n' "$out" >&2
    die "apt-get update could not fetch every package index (network or apt source problem)"
  fi
}

# Prints the packages that are not installed yet.
missing_packages() {
  local package
  for package in "$@"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null) == installed ]] ||
      printf '%s\n' "$package"
  done
}

# Installs what is missing; `apt-get update` runs only when something is missing.
install_packages() {
  local missing
  mapfile -t missing < <(missing_packages "$@")
  if ((${#missing[@]} == 0)); then
    log "packages already installed: $*"
    return
  fi
  apt_update
  log "installing: ${missing[*]}"
  apt_install "${missing[@]}"
}

# A package name that apt does not know is the config's fault: a fresh node fails the same.
apt_install() {
  local out
  if ! out=$(apt_get install -y --no-install-recommends "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    if grep -qE "^E: (Unable to locate package|Package '.*' has no installation candidate)" <<<"$out"; then
      die_config "apt-get cannot install $* (check the package names in the config)"
    fi
    die "apt-get install $* failed"
  fi
}

# The lowest uid of a login account on this node (login.defs UID_MIN, else 1000).
uid_min() {
  local min
  min=$(awk '$1 == "UID_MIN" { print $2; exit }' /etc/login.defs 2>/dev/null || true)
  [[ $min =~ ^[0-9]+$ ]] || min=1000
  printf '%s\n' "$min"
}

# DISCO_USER is created here (a system account, recorded in STATE_DIR) or is an existing
# ordinary account: root and system accounts the tool did not create are refused, since
# the bootstrap hands this user the cluster's keys and Disco runs jobs as it.
ensure_disco_user() {
  local marker=$STATE_DIR/user.created uid
  if ! id -u "$DISCO_USER" >/dev/null 2>&1; then
    log "creating user $DISCO_USER"
    useradd --system --create-home --shell /bin/bash "$DISCO_USER"
    printf '%s:%s\n' "$DISCO_USER" "$(id -u "$DISCO_USER")" | write_file 0644 root:root "$marker"
  fi
  uid=$(id -u "$DISCO_USER")
  ((uid != 0)) || die_config "DISCO_USER $DISCO_USER has uid 0 on $(node_name): pick an unprivileged user name"
  if ((uid < $(uid_min))) && [[ ! -f $marker || $(<"$marker") != "$DISCO_USER:$uid" ]]; then
    die_config "DISCO_USER $DISCO_USER is an existing system account (uid $uid) on $(node_name) that disposabledisco did not create: pick a new user name (if an older disposabledisco made it, record that: echo $DISCO_USER:$uid | sudo tee $marker)"
  fi
  [[ $(getent passwd "$DISCO_USER" | cut -d: -f7) == /bin/bash ]] ||
    usermod --shell /bin/bash "$DISCO_USER"
  # A '!' (locked) password makes sshd refuse key logins when it does not use PAM.
  if [[ $(getent shadow "$DISCO_USER" | cut -d: -f2) == '!'* ]]; then
    usermod -p '*' "$DISCO_USER"
  fi
  local home
  home=$(getent passwd "$DISCO_USER" | cut -d: -f6)
  if [[ $(path_facts "$home") == missing ]]; then
    install -d -m 0750 -o "$DISCO_USER" -g "$(id -gn "$DISCO_USER")" "$home"
    as_user cp -rT /etc/skel "$home" 2>/dev/null || true
  fi
  home=$(disco_home)
  user_dir 0700 "$home/.ssh"
}

# ~/.bashrc is read by bash for non-interactive SSH commands on Debian/Ubuntu, before
# its interactive guard: put the venv first on PATH there and keep Python quiet.
configure_disco_shell() {
  local home rc body
  home=$(disco_home)
  rc=$home/.bashrc
  body=$(
    printf '%s\n' '# BEGIN disposabledisco (managed: rewritten on every bootstrap)'
    # shellcheck disable=SC2016 # $PATH is for the .bashrc, not for now
    printf 'case ":$PATH:" in *":%s/bin:"*) ;; *) PATH="%s/bin:$PATH" ;; esac\n' "$VENV" "$VENV"
    printf '%s\n' 'export PATH' 'export PYTHONWARNINGS=ignore' '# END disposabledisco'
    if [[ $(path_facts "$rc") != missing ]]; then
      user_read "$rc" | sed '/^# BEGIN disposabledisco/,/^# END disposabledisco/d'
    fi
  )
  printf '%s\n' "$body" | user_write 0644 "$rc"
}

install_pip_requirements() {
  ((${#PIP_REQUIREMENTS[@]} > 0)) || return 0
  local want
  want=$(printf '%s\n' "$VENV" "${PIP_REQUIREMENTS[@]}" | sha256sum | cut -d' ' -f1)
  if [[ -x $VENV/bin/python && -f $STATE_DIR/pip.sha256 &&
    $(<"$STATE_DIR/pip.sha256") == "$want" ]]; then
    log "pip requirements already installed"
    return
  fi
  [[ -x $VENV/bin/python ]] || python3 -m venv --system-site-packages "$VENV"
  log "pip install: ${PIP_REQUIREMENTS[*]}"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
    "${PIP_REQUIREMENTS[@]}"
  printf '%s\n' "$want" | write_file 0644 root:root "$STATE_DIR/pip.sha256"
}

install_mgmt_keys() {
  local home keys line current
  home=$(disco_home)
  keys=$home/.ssh/authorized_keys
  current=""
  [[ $(path_facts "$keys") == missing ]] || current=$(user_read "$keys")
  {
    [[ -z $current ]] || printf '%s\n' "$current"
    while IFS= read -r line; do
      line=${line%$'\r'}
      [[ -n $line ]] || continue
      grep -qxF -- "$line" <<<"$current" || printf '%s\n' "$line"
    done <<<"$MGMT_KEY"
  } | user_write 0600 "$keys"
}

# apt mode: the user's Disco apt source, then its packages (Erlang comes with BASE_PACKAGES).
install_disco_apt() {
  local list=/etc/apt/sources.list.d/disco.list changed=no missing
  if [[ ! -f $list || $(<"$list") != "$DISCO_APT_SOURCE" ]]; then
    printf '%s\n' "$DISCO_APT_SOURCE" | write_file 0644 root:root "$list"
    changed=yes
  fi
  mapfile -t missing < <(missing_packages "${DISCO_APT_PACKAGES[@]}")
  if [[ $changed == yes || ${#missing[@]} -gt 0 ]]; then
    apt_update
    apt_install "${DISCO_APT_PACKAGES[@]}"
  fi
  compile_disco_quietly
}

# download KEY URL DEST SHA256: https never follows a redirect to anything but https, and
# with a SHA256 (the config's KEY_SHA256) the file must have that hash.
download() {
  local key=$1 url=$2 dest=$3 want=$4 part=$3.part sum
  case $url in
  https://*)
    command -v curl >/dev/null 2>&1 ||
      die_config "$key is an https:// URL but curl is missing on $(node_name)"
    curl --fail --silent --show-error --location --proto =https --proto-redir =https \
      --retry 3 -o "$part" "$url"
    ;;
  s3://*)
    command -v aws >/dev/null 2>&1 ||
      die_config "$key is an s3:// URL but the aws CLI is missing on $(node_name)"
    aws s3 cp --only-show-errors "$url" "$part"
    ;;
  *) die_config "unsupported $key URL: $url" ;;
  esac
  # a mismatch repeats on any node: the config's fault (or the server's), not this node's
  if [[ -n $want ]]; then
    sum=$(sha256sum "$part" | cut -d' ' -f1)
    if [[ $sum != "${want,,}" ]]; then
      rm -f "$part"
      die_config "$url has sha256 $sum, ${key}_SHA256 says $want"
    fi
  fi
  mv -f "$part" "$dest"
}

# tarball mode from a URL: fetch once per URL, then unpack.
fetch_disco_tarball() {
  if [[ -f $STATE_DIR/tarball.source && $(<"$STATE_DIR/tarball.source") == "$DISCO_TARBALL_URL" &&
    -f $STATE_DIR/tarball.sha256 ]]; then
    log "Disco tarball from $DISCO_TARBALL_URL already unpacked"
    return
  fi
  download DISCO_TARBALL "$DISCO_TARBALL_URL" "$STAGED_TARBALL" "$DISCO_TARBALL_SHA256"
  rm -f "$STATE_DIR/tarball.sha256"
  unpack_tarball "$STAGED_TARBALL"
  printf '%s\n' "$DISCO_TARBALL_URL" | write_file 0644 root:root "$STATE_DIR/tarball.source"
}

# -- source mode (master only) -------------------------------------------------------------
STAGED_SOURCE=$STATE_DIR/disco-source.tar.gz
BUILD_DIR=$STATE_DIR/build

# The bundle: uploaded before this script (a local DISCO_SOURCE), downloaded once per URL,
# or assembled here from DISCO_SOURCE_BASE_URL once per base URL and pin set.
fetch_disco_source() {
  local origin
  if [[ -n $DISCO_SOURCE_URL ]]; then
    origin="url $DISCO_SOURCE_URL"
  elif [[ -n $DISCO_SOURCE_PY ]]; then
    origin="assembled $DISCO_SOURCE_BASE_URL $(printf '%s' "$DISCO_SOURCE_PY" | sha256sum | cut -d' ' -f1)"
  else
    [[ -f $STAGED_SOURCE ]] || die "the Disco source bundle was not uploaded to $STAGED_SOURCE"
    rm -f "$STATE_DIR/source.origin"
    return
  fi
  if [[ -f $STAGED_SOURCE && -f $STATE_DIR/source.origin &&
    $(<"$STATE_DIR/source.origin") == "$origin" ]]; then
    log "Disco source bundle ($origin) already here"
    return
  fi
  rm -f "$STATE_DIR/source.origin"
  if [[ -n $DISCO_SOURCE_URL ]]; then
    download DISCO_SOURCE "$DISCO_SOURCE_URL" "$STAGED_SOURCE" "$DISCO_SOURCE_SHA256"
  else
    assemble_disco_source
  fi
  printf '%s\n' "$origin" | write_file 0644 root:root "$STATE_DIR/source.origin"
}

# DISCO_SOURCE null: disco_source.py (standard library only) fetches the pinned commits.
assemble_disco_source() {
  local script out rc=0
  script=$(mktemp)
  printf '%s' "$DISCO_SOURCE_PY" >"$script"
  log "assembling the Disco source bundle from $DISCO_SOURCE_BASE_URL at the pinned commits"
  out=$(python3 -I "$script" "$STAGED_SOURCE" "$DISCO_SOURCE_BASE_URL" 2>&1) || rc=$?
  rm -f "$script"
  if ((rc != 0)); then
    printf '%s\n' "$out" >&2
    die_config "could not assemble the Disco source bundle on $(node_name): ${out##*$'\n'} (with DISCO_SOURCE null the master fetches from DISCO_SOURCE_BASE_URL: allow it outbound https, or set DISCO_SOURCE to a bundle file)"
  fi
}

# disco_build.sh (rendered with our fixes) once per bundle hash. It fails with its last line
# `disco build: FAILED: step NAME` after the step's log tail: a fresh master would fail the
# same, so it is the config's (the bundle's) fault and no node is replaced for it.
run_disco_build() {
  local sum=$1 errors rc=0 failed
  errors=$(mktemp)
  log "building Disco from the source bundle $sum"
  printf '%s' "$DISCO_BUILD_SH" | bash -s -- "$STAGED_SOURCE" "$sum" "$BUILD_DIR" \
    >/dev/null 2>"$errors" || rc=$?
  if ((rc != 0)); then
    tail -n 45 "$errors" >&2
    failed=$(sed -n 's/^disco build: FAILED: //p' "$errors" | tail -n 1)
    rm -f "$errors"
    die_config "the Disco build failed on $(node_name) at ${failed:-an unknown step} (its log tail is above): fix the source bundle in DISCO_SOURCE"
  fi
  grep -E '^disco build: (step|built)' "$errors" >&2 || true
  rm -f "$errors"
}

build_disco_from_source() {
  local sum target
  install -d -m 0755 "$STATE_DIR" "$BUILD_DIR"
  fetch_disco_source
  sum=$(sha256sum "$STAGED_SOURCE" | cut -d' ' -f1)
  [[ -z $DISCO_SOURCE_SHA256 || $sum == "${DISCO_SOURCE_SHA256,,}" ]] ||
    die_config "the Disco source bundle on $(node_name) has sha256 $sum, expected $DISCO_SOURCE_SHA256 (DISCO_SOURCE or DISCO_SOURCE_SHA256 changed)"
  target=$BUILD_DIR/disco-installed-$sum.tar.gz
  if [[ -s $target ]]; then
    log "Disco already built from the source bundle $sum"
  else
    run_disco_build "$sum"
    find "$BUILD_DIR" -maxdepth 1 -name 'disco-installed-*.tar.gz' ! -name "${target##*/}" -delete
  fi
  # the staged tarball is what join_copy sends to the slaves
  cmp -s "$target" "$STAGED_TARBALL" || install -m 0644 "$target" "$STAGED_TARBALL"
  unpack_tarball "$STAGED_TARBALL"
}

# Disco itself, per DISCO_INSTALL. A local tarball reaches the master before this script
# and each slave later, from the master, when the slave joins.
install_disco() {
  case $DISCO_INSTALL in
  none) log "DISCO_INSTALL=none: not installing Disco" ;;
  preinstalled) verify_disco_path disco erl python ;;
  apt)
    install_disco_apt
    verify_disco_path disco erl python
    ;;
  source)
    if [[ $ROLE == master ]]; then
      build_disco_from_source
    else
      log "the installed Disco tree comes from the master when this slave joins"
      return
    fi
    verify_disco_path disco erl python
    ;;
  tarball)
    if [[ -n $DISCO_TARBALL_URL ]]; then
      fetch_disco_tarball
    elif [[ $ROLE == master ]]; then
      [[ -f $STAGED_TARBALL ]] || die "the Disco tarball was not uploaded to $STAGED_TARBALL"
      unpack_tarball "$STAGED_TARBALL" "$DISCO_TARBALL_SHA256"
    else
      log "the Disco tarball comes from the master when this slave joins"
      return
    fi
    verify_disco_path disco erl python
    ;;
  *) die_config "unknown DISCO_INSTALL: $DISCO_INSTALL" ;;
  esac
}

# DISCO_ROOT: each missing folder is made by the owner of the folder it goes in (root or
# the Disco user; anyone else's is refused), the last one ends up the Disco user's. An
# existing DISCO_ROOT is never chowned: one the Disco user does not own is refused.
ensure_disco_root() {
  local path=$DISCO_ROOT current="" parent part type links uid owner parts want
  want=$(id -u "$DISCO_USER")
  [[ $path == /* && $path != / && $(realpath -m -- "$path") == "$path" ]] ||
    die_config "DISCO_ROOT $path is not a canonical absolute path on $(node_name) (no symbolic links, '..' or trailing '/')"
  IFS=/ read -ra parts <<<"${path#/}"
  for part in "${parts[@]}"; do
    parent=${current:-/}
    current+=/$part
    if [[ $(path_facts "$current") == missing ]]; then
      uid=$(stat -c %u -- "$parent")
      if ((uid == want)); then
        as_user mkdir -m 0755 -- "$current"
      elif ((uid == 0)); then
        mkdir -m 0755 -- "$current"
        [[ $current != "$path" ]] || chown -h "$DISCO_USER:$(id -gn "$DISCO_USER")" -- "$current"
      else
        die_config "cannot create DISCO_ROOT $path on $(node_name): $parent belongs to $(stat -c %U -- "$parent")"
      fi
    fi
    IFS='|' read -r type links uid owner <<<"$(path_facts "$current")"
    [[ $type == directory ]] ||
      die_config "DISCO_ROOT $path on $(node_name): $current is a $type, not a directory"
  done
  ((uid == want)) ||
    die_config "DISCO_ROOT $path already exists on $(node_name) owned by $owner, not $DISCO_USER: refusing to take it over (pick a new folder, or chown it to $DISCO_USER yourself)"
}

# POST_INIT is a script by design: run from a file (never eval), once per content change.
run_post_init() {
  [[ -n $POST_INIT ]] || return 0
  local sum script=$STATE_DIR/post_init.sh
  sum=$(printf '%s' "$POST_INIT" | sha256sum | cut -d' ' -f1)
  if [[ -f $STATE_DIR/post_init.sha256 && $(<"$STATE_DIR/post_init.sha256") == "$sum" ]]; then
    log "POST_INIT already ran for this content"
    return
  fi
  printf '%s\n' "$POST_INIT" | write_file 0700 root:root "$script"
  log "running POST_INIT"
  (cd / && bash "$script") </dev/null || die_config "POST_INIT failed (status $?)"
  printf '%s\n' "$sum" | write_file 0644 root:root "$STATE_DIR/post_init.sha256"
}

write_stamp() {
  printf '%s\n' "$1" | write_file 0644 root:root "$STATE_DIR/bootstrap.sha256"
  log "bootstrap done: $1"
}

bootstrap_common() {
  require_root
  install -d -m 0755 "$STATE_DIR"
  wait_for_cloud_init
  install_packages "${PACKAGES[@]}"
  ensure_disco_user
  configure_disco_shell
  install_pip_requirements
  install_mgmt_keys
  install_disco
  local changed
  changed=$(write_disco_settings "$ROLE")
  [[ -z $changed ]] || echo settings-changed
  ensure_disco_root
}
