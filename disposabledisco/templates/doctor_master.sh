# doctor_master.sh (master): what Disco itself does to reach its workers, done directly:
# SSH to every slave as the Disco user with strict host key checking and no prompt, then
# an Erlang ping by short name with the cluster cookie. Output: one result per line.

ssh_slave() {
  as_disco ssh -n -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 "$@"
}

main() {
  require_root
  local i out pings started=()
  for i in "${!SLAVES[@]}"; do
    # shellcheck disable=SC2016 # expanded on the slave
    if out=$(ssh_slave "${SLAVES[$i]}" \
      'printf "python=%s erl=%s\n" "$(command -v python)" "$(command -v erl)"' 2>&1); then
      printf 'ssh %s ok %s\n' "${SLAVES[$i]}" "$out"
      if ssh_slave "${SLAVES[$i]}" "${START_CHECK[$i]}" >/dev/null 2>&1; then
        started+=("${CHECK_NODES[$i]}")
      fi
    else
      printf 'ssh %s failed %s\n' "${SLAVES[$i]}" "$(tr '\n' ' ' <<<"$out")"
    fi
  done
  ((${#started[@]} > 0)) || return 0
  pings=$(as_disco "${ERLANG[@]}" -sname "ddoctor$$" -noshell -eval "$PING_ERL" \
    -extra "${started[@]}" </dev/null 2>&1) || true
  printf '%s\n' "$pings"
  for i in "${!SLAVES[@]}"; do
    grep -qxF "ping ${CHECK_NODES[$i]} pong" <<<"$pings" && continue
    ssh_slave "${SLAVES[$i]}" "${STOP_CHECK[$i]}" >&2 || true
  done
}
