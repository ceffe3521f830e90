# join_slave.sh (slave): install the cluster's public key and the Erlang cookie read from
# stdin (two base64 lines: cookie, public key). Keys of an earlier master are replaced, so
# a slave can be joined again to a new master. Everything in the Disco user's home is
# written by that user (see user_write); a private key left by an older version is removed.

main() {
  require_root
  local home cookie pub keys line current=""
  home=$(disco_home)
  IFS= read -r cookie || true
  IFS= read -r pub || true
  [[ -n $cookie && -n $pub ]] || die "join: expected the cookie and cluster public key on stdin"
  user_dir 0700 "$home/.ssh"
  check_user_file "$home/.ssh/id_ed25519" missing-ok
  as_user rm -f -- "$home/.ssh/id_ed25519"
  printf '%s' "$pub" | base64 -d | user_write 0644 "$home/.ssh/id_ed25519.pub"
  printf '%s' "$cookie" | base64 -d | user_write 0400 "$home/.erlang.cookie"
  line="$(printf '%s' "$pub" | base64 -d | awk '{print $1, $2; exit}') $CLUSTER_KEY_COMMENT"
  keys=$home/.ssh/authorized_keys
  [[ $(path_facts "$keys") == missing ]] || current=$(user_read "$keys")
  {
    [[ -z $current ]] || grep -vF " $CLUSTER_KEY_COMMENT" <<<"$current" || true
    printf '%s\n' "$line"
  } | user_write 0600 "$keys"
  printf 'tarball=%s\n' "$(cat "$STATE_DIR/tarball.sha256" 2>/dev/null || echo none)"
}
