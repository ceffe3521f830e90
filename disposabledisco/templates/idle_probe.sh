# idle_probe.sh (master): the facts the idle check needs (see idle_probe.py, given in
# PROBE_PY): one cheap command per pass, only when IDLE_MINUTES is set.

main() {
  require_root
  timeout -k 5 30 python3 -W ignore -c "$PROBE_PY" "$JOBLIST_URL" "$DISCO_USER" </dev/null 2>&1 ||
    printf 'error idle_probe.py exited %s\n' "$?"
}
