# master.sh: the master's bootstrap. The master owns the cluster's secrets: they are
# created here, on the node, and only ever copied node to node by the join step.

# The key the master uses to start Disco workers on slaves over SSH.
ensure_cluster_key() {
  local home key
  home=$(disco_home)
  key=$home/.ssh/id_ed25519
  # A key cut short by an interrupted ssh-keygen is unreadable: make it again.
  if [[ ! -s $key ]] || ! ssh-keygen -y -f "$key" >/dev/null 2>&1; then
    log "creating the cluster SSH key"
    rm -f "$key" "$key.pub"
    runuser -u "$DISCO_USER" -- ssh-keygen -q -t ed25519 -N '' -C "$CLUSTER_KEY_COMMENT" -f "$key"
  fi
  if [[ ! -s $key.pub ]]; then
    runuser -u "$DISCO_USER" -- ssh-keygen -y -f "$key" >"$key.pub.tmp"
    mv -f "$key.pub.tmp" "$key.pub"
  fi
  chmod 0600 "$key"
  chown "$DISCO_USER:" "$key" "$key.pub"
}

# One random Erlang cookie per cluster, made here from the kernel's random source.
ensure_cookie() {
  local home cookie
  home=$(disco_home)
  cookie=$home/.erlang.cookie
  if [[ ! -s $cookie ]]; then
    log "creating the Erlang cookie"
    (umask 077 && od -An -N20 -tx1 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F' >"$cookie.tmp")
    mv -f "$cookie.tmp" "$cookie"
  fi
  chmod 0400 "$cookie"
  chown "$DISCO_USER:" "$cookie"
}

main() {
  bootstrap_common
  ensure_cluster_key
  ensure_cookie
  run_post_init
  write_stamp "$1"
}
