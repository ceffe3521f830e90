# join_unpack.sh (slave): take the tarball the master just copied over and unpack it.

main() {
  require_root
  local home incoming
  home=$(disco_home)
  incoming=$home/$INCOMING_NAME
  [[ -f $incoming ]] || die "the master did not deliver the Disco tarball to $incoming"
  install -d -m 0755 "$STATE_DIR"
  chown root:root "$incoming"
  chmod 0644 "$incoming"
  mv -f "$incoming" "$STAGED_TARBALL"
  unpack_tarball "$STAGED_TARBALL" "$DISCO_TARBALL_SHA256"
  verify_disco_path disco erl python
}
