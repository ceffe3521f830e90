# join_unpack.sh (slave): take the tarball the master just copied over and unpack it, then
# write the settings again (the install's values under ours). The copy sits in the Disco
# user's home: it is read by that user (no link followed) into root's STATE_DIR, never
# chowned or moved by root.

main() {
  require_root
  local home incoming part
  home=$(disco_home)
  incoming=$home/$INCOMING_NAME
  [[ $(path_facts "$incoming") != missing ]] ||
    die "the master did not deliver the Disco tarball to $incoming"
  install -d -m 0755 "$STATE_DIR"
  part=$(mktemp "$STAGED_TARBALL.XXXXXX")
  user_read "$incoming" >"$part"
  as_user rm -f -- "$incoming"
  chmod 0644 "$part"
  mv -f "$part" "$STAGED_TARBALL"
  unpack_tarball "$STAGED_TARBALL" "$DISCO_TARBALL_SHA256"
  write_disco_settings slave >/dev/null
  verify_disco_path disco erl python
}
