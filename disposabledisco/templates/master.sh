# master.sh: the master's bootstrap. The master owns the cluster's secrets: they are
# created here, on the node, by the Disco user in its own home (root never writes,
# chowns or chmods there), and only the cookie and the public key leave it, at join.

# The key the master uses to start Disco workers on slaves over SSH.
ensure_cluster_key() {
  local home key
  home=$(disco_home)
  key=$home/.ssh/id_ed25519
  check_user_file "$key" missing-ok
  check_user_file "$key.pub" missing-ok
  # A key cut short by an interrupted ssh-keygen is unreadable: make it again.
  if [[ ! -s $key ]] || ! as_user ssh-keygen -y -f "$key" >/dev/null 2>&1; then
    log "creating the cluster SSH key"
    as_user rm -f -- "$key" "$key.pub"
    as_user ssh-keygen -q -t ed25519 -N '' -C "$CLUSTER_KEY_COMMENT" -f "$key"
  fi
  if [[ ! -s $key.pub ]]; then
    as_user ssh-keygen -y -f "$key" | user_write 0644 "$key.pub"
  fi
  as_user chmod 0600 -- "$key"
  check_user_file "$key"
  check_user_file "$key.pub"
}

# One random Erlang cookie per cluster, made here from the kernel's random source.
ensure_cookie() {
  local home cookie
  home=$(disco_home)
  cookie=$home/.erlang.cookie
  check_user_file "$cookie" missing-ok
  if [[ ! -s $cookie ]]; then
    log "creating the Erlang cookie"
    od -An -N20 -tx1 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F' | user_write 0400 "$cookie"
  fi
  as_user chmod 0400 -- "$cookie"
  check_user_file "$cookie"
}

main() {
  bootstrap_common
  ensure_cluster_key
  ensure_cookie
  run_post_init
  write_stamp "$1"
}
