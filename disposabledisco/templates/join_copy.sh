# join_copy.sh (master): copy the Disco tarball to one slave over the cluster link, as the
# Disco user, with the slave's pinned host key (never an unchecked host key).

main() {
  require_root
  [[ -f $STAGED_TARBALL ]] || die "no Disco tarball on the master at $STAGED_TARBALL"
  as_disco scp -q -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=15 \
    "$STAGED_TARBALL" "$SLAVE_ADDRESS:$INCOMING_NAME"
}
