# doctor_job.sh (master): ask Disco itself, as the Disco user, with the environment Disco's
# own commands get. Arguments: `nodeinfo URL SECONDS HOST...` or `wordcount TAG SECONDS
# LINE` (see doctor_job.py, given in JOB_PY). Bounded by HARD_SECONDS: on expiry the job
# script is stopped (it removes its job and tag) and `timeout` is printed.

main() {
  require_root
  local dir status=0
  dir=$(as_user mktemp -d)
  # shellcheck disable=SC2016 # expanded by the inner shell
  as_user bash -c 'cat >"$1"' write "$dir/doctor_job.py" <<<"$JOB_PY"
  as_disco timeout -k 10 "$HARD_SECONDS" python3 -W ignore "$dir/doctor_job.py" "$@" \
    </dev/null 2>&1 || status=$?
  as_user rm -rf -- "$dir"
  if ((status == 124 || status == 137)); then
    printf 'timeout %s\n' "$HARD_SECONDS"
  elif ((status != 0)); then
    printf 'error doctor_job.py exited %s\n' "$status"
  fi
}
