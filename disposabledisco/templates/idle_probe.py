"""What the idle check needs from the master, one fact a line (parsed by idle.parse_probe):

    now EPOCH            the master's clock (every other time is compared with it)
    started EPOCH        when the Disco user's oldest Erlang VM started (absent: not running)
    joblist JSON         Disco's own GET /disco/ctrl/joblist answer: [[start, status, name]]
    seen-active EPOCH    the last time this probe saw a job with status "active"
    error REASON         the master did not answer the job list

The job list gives start times only, so a long job's end would be unknown: this probe
records when it last saw a job running, in a root-owned file on the master.
Usage: idle_probe.py JOBLIST_URL DISCO_USER. Standard library only.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

MARK = "/var/lib/disposabledisco/idle-seen-active"


def main(url, user):
    now = int(time.time())
    print("now", now)
    ps = subprocess.run(["ps", "-u", user, "-o", "etimes=,comm="], capture_output=True,
                        text=True, check=False).stdout
    ages = [int(age) for age, _, name in (line.strip().partition(" ")
                                          for line in ps.splitlines())
            if age.isdigit() and name.strip().startswith("beam")]
    if ages:
        print("started", now - max(ages))
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            jobs = json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        print("error", f"{url}: {error}")
        jobs = None
    if isinstance(jobs, list):
        if any(isinstance(j, list) and len(j) == 3 and j[1] == "active" for j in jobs):
            os.makedirs(os.path.dirname(MARK), exist_ok=True)
            with open(MARK + ".tmp", "w") as mark:
                mark.write(f"{now}\n")
            os.replace(MARK + ".tmp", MARK)
        print("joblist", json.dumps(jobs))
    try:
        with open(MARK) as mark:
            print("seen-active", int(mark.read().strip()))
    except (OSError, ValueError):
        pass


main(sys.argv[1], sys.argv[2])
