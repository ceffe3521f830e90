# join_known_hosts.sh (master): the Disco user's known_hosts gets the slaves' pinned host
# keys (stdin, one known_hosts line each). Lines for the same names or addresses are
# replaced, so a slave that comes back at an old address never meets a stale key.

main() {
  require_root
  local home file entries
  home=$(disco_home)
  file=$home/.ssh/known_hosts
  entries=$(cat)
  install -d -m 0700 -o "$DISCO_USER" -g "$(id -gn "$DISCO_USER")" "$home/.ssh"
  {
    if [[ -f $file ]]; then
      awk -v names="${HOST_NAMES[*]}" '
        BEGIN { n = split(names, list, " "); for (i = 1; i <= n; i++) drop[list[i]] = 1 }
        {
          count = split($1, hosts, ",")
          for (i = 1; i <= count; i++) if (hosts[i] in drop) next
          print
        }' "$file"
    fi
    printf '%s\n' "$entries"
  } | write_file 0644 "$DISCO_USER:" "$file"
}
