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
  apt_get install -y --no-install-recommends "${missing[@]}"
}

ensure_disco_user() {
  if ! id -u "$DISCO_USER" >/dev/null 2>&1; then
    log "creating user $DISCO_USER"
    useradd --system --create-home --shell /bin/bash "$DISCO_USER"
  fi
  [[ $(getent passwd "$DISCO_USER" | cut -d: -f7) == /bin/bash ]] ||
    usermod --shell /bin/bash "$DISCO_USER"
  # A '!' (locked) password makes sshd refuse key logins when it does not use PAM.
  if [[ $(getent shadow "$DISCO_USER" | cut -d: -f2) == '!'* ]]; then
    usermod -p '*' "$DISCO_USER"
  fi
  local home
  home=$(disco_home)
  if [[ ! -d $home ]]; then
    mkdir -p "$home"
    cp -rT /etc/skel "$home" 2>/dev/null || true
    chown -R "$DISCO_USER:" "$home"
  fi
  install -d -m 0700 -o "$DISCO_USER" -g "$(id -gn "$DISCO_USER")" "$home/.ssh"
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
    if [[ -f $rc ]]; then
      sed '/^# BEGIN disposabledisco/,/^# END disposabledisco/d' "$rc"
    fi
  )
  printf '%s\n' "$body" | write_file 0644 "$DISCO_USER:" "$rc"
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
  local home keys line
  home=$(disco_home)
  keys=$home/.ssh/authorized_keys
  [[ -f $keys ]] || install -m 0600 -o "$DISCO_USER" /dev/null "$keys"
  while IFS= read -r line; do
    line=${line%$'\r'}
    [[ -n $line ]] || continue
    grep -qxF -- "$line" "$keys" || printf '%s\n' "$line" >>"$keys"
  done <<<"$MGMT_KEY"
  chmod 0600 "$keys"
  chown "$DISCO_USER:" "$keys"
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
    apt_get install -y --no-install-recommends "${DISCO_APT_PACKAGES[@]}"
  fi
  compile_disco_quietly
}

# tarball mode from a URL: fetch once per URL, then unpack.
fetch_disco_tarball() {
  if [[ -f $STATE_DIR/tarball.source && $(<"$STATE_DIR/tarball.source") == "$DISCO_TARBALL_URL" &&
    -f $STATE_DIR/tarball.sha256 ]]; then
    log "Disco tarball from $DISCO_TARBALL_URL already unpacked"
    return
  fi
  local part=$STAGED_TARBALL.part
  case $DISCO_TARBALL_URL in
  https://*)
    command -v curl >/dev/null 2>&1 || die "DISCO_TARBALL is an https:// URL but curl is missing"
    curl --fail --silent --show-error --location --retry 3 -o "$part" "$DISCO_TARBALL_URL"
    ;;
  s3://*)
    command -v aws >/dev/null 2>&1 || die "DISCO_TARBALL is an s3:// URL but the aws CLI is missing"
    aws s3 cp --only-show-errors "$DISCO_TARBALL_URL" "$part"
    ;;
  *) die "unsupported DISCO_TARBALL URL: $DISCO_TARBALL_URL" ;;
  esac
  mv -f "$part" "$STAGED_TARBALL"
  rm -f "$STATE_DIR/tarball.sha256"
  unpack_tarball "$STAGED_TARBALL"
  printf '%s\n' "$DISCO_TARBALL_URL" | write_file 0644 root:root "$STATE_DIR/tarball.source"
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
  *) die "unknown DISCO_INSTALL: $DISCO_INSTALL" ;;
  esac
}

write_disco_settings() {
  install -d -m 0755 /etc/disco
  {
    printf '%s' "$SETTINGS_PY"
    if [[ $ROLE == master ]]; then
      local host
      host=$(hostname -s)
      [[ $host =~ ^[A-Za-z0-9-]+$ ]] || die "the master's short hostname '$host' is not usable by Disco"
      printf "DISCO_MASTER_HOST = '%s'\n" "$host"
    fi
  } | write_file 0644 root:root /etc/disco/settings.py
  install -d -m 0755 -o "$DISCO_USER" -g "$(id -gn "$DISCO_USER")" "$DISCO_ROOT"
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
  (cd / && bash "$script") </dev/null || die "POST_INIT failed (status $?)"
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
  write_disco_settings
}
