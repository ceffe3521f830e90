# doctor_probe.sh (every node): facts for the health check, one `key=value` per line.
# Prints hashes and modes only: the cookie itself never leaves the node. The cookie is
# looked at with lstat and read as the Disco user: a planted link is reported, not followed.

main() {
  require_root
  local home cookie tool name facts type links uid owner sum
  printf 'hostname=%s\n' "$(hostname -s)"
  printf 'nproc=%s\n' "$(nproc)"
  home=$(getent passwd "$DISCO_USER" | cut -d: -f6)
  if [[ -z $home ]]; then
    printf 'user=missing\n'
    return
  fi
  cookie=$home/.erlang.cookie
  facts=$(path_facts "$cookie")
  if [[ $facts != missing ]]; then
    IFS='|' read -r type links uid owner <<<"$facts"
    if [[ $type == "regular file" && $links == 1 && $uid == "$(id -u "$DISCO_USER")" ]]; then
      sum=$(user_read "$cookie" | sha256sum | cut -d' ' -f1)
      printf 'cookie_sha256=%s\n' "$sum"
      printf 'cookie_mode=%s\n' "$(stat -c '%a %U' -- "$cookie")"
    else
      printf 'cookie_mode=%s (%s links) %s\n' "$type" "$links" "$owner"
    fi
  fi
  for tool in python erl disco; do
    # shellcheck disable=SC2016 # expanded by the inner shell
    printf 'path_%s=%s\n' "$tool" "$(as_disco bash -c 'command -v "$1"' check "$tool" || true)"
  done
  for name in "${NAMES[@]}"; do
    printf 'resolve_%s=%s\n' "$name" "$(getent hosts "$name" | awk '{print $1; exit}')"
  done
}
