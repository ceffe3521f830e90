# join_read.sh (master): print the Erlang cookie and the cluster's public key, base64, one
# per line, for the join step to hold in memory. The private key never leaves the master:
# slaves only need to accept it. Read as the Disco user (no link followed). Never run it
# with output logged.

main() {
  require_root
  local home file content
  home=$(disco_home)
  for file in "$home/.erlang.cookie" "$home/.ssh/id_ed25519.pub"; do
    [[ -s $file ]] || die "$file is missing on the master: bootstrap the master first"
    content=$(user_read "$file" | base64 -w0)
    printf '%s\n' "$content"
  done
}
