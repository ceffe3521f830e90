# disco_apply.sh (master): start Disco if it is not running and apply the host table
# (list body on stdin) live through the master's own HTTP API. TABLE_ONLY=1 (a drain
# before a scale-down) applies the table to a running Disco and nothing else.

read -r -d '' POST_TABLE_PY <<'PY' || true
import sys, time, urllib.error, urllib.request
url, body = sys.argv[1], sys.stdin.buffer.read()
deadline = time.monotonic() + float(sys.argv[2])
while True:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.read().decode("utf-8", "replace")
        break
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")[:300]
        sys.exit(f"{url} answered {error.code}: {detail}")
    except OSError as error:
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not answer: {error}")
        time.sleep(0.5)
if "table saved!" not in answer:
    sys.exit(f"{url} did not save the table: {answer[:300]}")
print(f"{url}: {answer.strip()}")
PY

# Disco's own job list ([[start, status, name], ...]): the names of the active jobs, one a
# line; exit 1 when Disco does not answer within the deadline.
read -r -d '' ACTIVE_JOBS_PY <<'PY' || true
import json, sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            jobs = json.loads(response.read().decode("utf-8"))
        break
    except (OSError, ValueError) as error:
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not answer: {error}")
        time.sleep(0.5)
for job in jobs if isinstance(jobs, list) else ():
    if isinstance(job, list) and len(job) == 3 and job[1] == "active":
        print(job[2])
PY

# Disco reads its settings only at start: record what it was started with, and restart
# it when the file differs (a bootstrap earlier in this pass rewrote it, e.g. replica counts
# after a change of NUM_SLAVES), but never under a running job: while Disco says a job is
# active the restart waits for a later pass. Both said on stdout, which the pass reports.
main() {
  require_root
  local status started=$STATE_DIR/disco-started-settings.sha256 current jobs pending=""
  status=$(as_disco disco status </dev/null 2>&1 || true)
  if [[ $TABLE_ONLY == 1 ]]; then
    if grep -qw running <<<"$status"; then
      python3 -W ignore -c "$POST_TABLE_PY" "$TABLE_URL" "$START_DEADLINE_SECONDS"
    else
      log "Disco is not running: it reads the table file when it starts"
    fi
    return
  fi
  # the membership step rewrites the master's settings too (repairs drift found here)
  write_disco_settings master >/dev/null
  current=$(<"$STATE_DIR/settings.sha256")
  if grep -qw running <<<"$status" && [[ -f $started && $(<"$started") != "$current" ]]; then
    if ! jobs=$(python3 -W ignore -c "$ACTIVE_JOBS_PY" "$JOBLIST_URL" 30 2>&1); then
      log "$jobs; restarting Disco anyway (a Disco that does not answer keeps no job going)"
      jobs=""
    fi
    if [[ -n $jobs ]]; then
      pending=$(paste -sd ' ' <<<"$jobs")
      log "the settings changed since Disco started: the restart waits for job(s) $pending"
      echo "Disco restart pending on $(node_name): its settings changed; waiting for job(s) $pending to end"
    else
      log "the settings changed since Disco started: restarting Disco"
      as_disco disco stop </dev/null >&2 || true
      status=stopped
      echo "restarted Disco on $(node_name): its settings changed"
    fi
  fi
  if ! grep -qw running <<<"$status"; then
    log "starting Disco"
    # it fails the same way on a fresh master (settings come from the config, the rest of
    # the node was checked by the bootstrap): the config's fault, never the master's
    as_disco disco start </dev/null >&2 ||
      die_config "disco start failed on $(node_name) (check DISCO_SETTINGS, DISCO_PORT and DISCO_ROOT)"
  fi
  # what the running Disco read: unchanged while its restart is pending
  [[ -n $pending ]] || printf '%s\n' "$current" | write_file 0644 root:root "$started"
  python3 -W ignore -c "$POST_TABLE_PY" "$TABLE_URL" "$START_DEADLINE_SECONDS"
}
