# join_slave.sh (slave): install the cluster key pair and the Erlang cookie read from stdin
# (three base64 lines: cookie, public key, private key). Keys of an earlier master are
# replaced, so a slave can be joined again to a new master.

main() {
  require_root
  local home group cookie pub priv keys line
  home=$(disco_home)
  group=$(id -gn "$DISCO_USER")
  IFS= read -r cookie || true
  IFS= read -r pub || true
  IFS= read -r priv || true
  [[ -n $cookie && -n $pub && -n $priv ]] || die "join: expected the cluster key and cookie on stdin"
  install -d -m 0700 -o "$DISCO_USER" -g "$group" "$home/.ssh"
  printf '%s' "$priv" | base64 -d | write_file 0600 "$DISCO_USER:" "$home/.ssh/id_ed25519"
  printf '%s' "$pub" | base64 -d | write_file 0644 "$DISCO_USER:" "$home/.ssh/id_ed25519.pub"
  printf '%s' "$cookie" | base64 -d | write_file 0400 "$DISCO_USER:" "$home/.erlang.cookie"
  line="$(printf '%s' "$pub" | base64 -d | awk '{print $1, $2; exit}') $CLUSTER_KEY_COMMENT"
  keys=$home/.ssh/authorized_keys
  {
    if [[ -f $keys ]]; then grep -vF " $CLUSTER_KEY_COMMENT" "$keys" || true; fi
    printf '%s\n' "$line"
  } | write_file 0600 "$DISCO_USER:" "$keys"
  printf 'tarball=%s\n' "$(cat "$STATE_DIR/tarball.sha256" 2>/dev/null || echo none)"
}
