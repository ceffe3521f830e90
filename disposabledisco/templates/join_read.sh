# join_read.sh (master): print the cluster key pair and the Erlang cookie, base64, one per
# line, for the join step to hold in memory. Never run it with output logged.

main() {
  require_root
  local home file
  home=$(disco_home)
  for file in "$home/.erlang.cookie" "$home/.ssh/id_ed25519.pub" "$home/.ssh/id_ed25519"; do
    [[ -s $file ]] || die "$file is missing on the master: bootstrap the master first"
    base64 -w0 "$file"
    printf '\n'
  done
}
