# slave.sh: a slave's bootstrap. Its cluster key, cookie and (tarball mode) Disco itself
# come from the master when it joins.

main() {
  bootstrap_common
  run_post_init
  write_stamp "$1"
}
