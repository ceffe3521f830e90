# join_known_hosts.sh (master): the Disco user's known_hosts gets the slaves' pinned host
# keys (stdin, one known_hosts line each). Lines for the same names or addresses are
# replaced, so a slave that comes back at an old address never meets a stale key. Read and
# written as the Disco user (see user_write).

main() {
  require_root
  local home file entries
  home=$(disco_home)
  file=$home/.ssh/known_hosts
  entries=$(cat)
  user_dir 0700 "$home/.ssh"
  {
    if [[ $(path_facts "$file") != missing ]]; then
      user_read "$file" | awk -v names="${HOST_NAMES[*]}" '
        BEGIN { n = split(names, list, " "); for (i = 1; i <= n; i++) drop[list[i]] = 1 }
        {
          count = split($1, hosts, ",")
          for (i = 1; i <= count; i++) if (hosts[i] in drop) next
          print
        }'
    fi
    printf '%s\n' "$entries"
  } | user_write 0644 "$file"
}
