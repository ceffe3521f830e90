"""Disco's own answer for the doctor; run on the master as the Disco user (doctor_job.sh).

    doctor_job.py nodeinfo URL SECONDS HOST...
        GET URL (the master's /disco/ctrl/nodeinfo) until every HOST is connected and not
        blacklisted, or SECONDS pass (Disco retries a worker every 15 s, so a host that was
        just added may connect late); prints `nodeinfo <json>`, the last answer, or
        `error <reason>` when the master never answered.
    doctor_job.py wordcount TAG SECONDS LINE
        pushes LINE to DDFS under TAG (`ddfs chunk`), counts its words with a map/reduce job
        that reads the chunk with chain_reader, prints `result <json>`; prints `step NAME`
        before each step, so a timeout names the step that hung, and `error <reason>` when
        a step fails. The job and the tag are removed in any case.

Only the standard library at the top: the nodeinfo mode runs where Disco's Python package
is not installed.
"""

import json
import os
import signal
import sys
import tempfile
import time
import urllib.request


def say(*words):
    print(*words, flush=True)


def nodeinfo(url, seconds, hosts):
    deadline = time.monotonic() + float(seconds)
    answer, reason = None, "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.loads(response.read().decode("utf-8"))
        except (OSError, ValueError) as error:
            reason = f"{url}: {error}"
        else:
            ready = [h for h in hosts if isinstance(answer.get(h), dict)
                     and answer[h].get("connected") is True
                     and answer[h].get("blacklisted") is not True]
            if len(ready) == len(hosts):
                break
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    if answer is None:
        say("error", reason)
    else:
        say("nodeinfo", json.dumps(answer, sort_keys=True))


def map(line, params):  # Disco's names for the two functions
    for word in line.split():
        # chain_reader hands ddfs chunk input over as bytes on Python 3
        yield (word.decode("utf-8") if isinstance(word, bytes) else word), 1


def reduce(iter, params):
    from disco.util import kvgroup
    for word, counts in kvgroup(sorted(iter)):
        yield word, sum(counts)


def _stop(signum, frame):
    raise SystemExit("stopped by timeout")


def wordcount(tag, seconds, line):
    from disco.core import Disco, Job, result_iterator
    from disco.ddfs import DDFS
    from disco.worker.task_io import chain_reader

    signal.signal(signal.SIGTERM, _stop)  # the shell's timeout: clean up, then exit
    ddfs, job = DDFS(), None
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as text:
        text.write(line + "\n")
        text.flush()
        try:
            say("step push")
            ddfs.chunk(tag, [text.name])
            say("step run")
            job = Job(name="disposabledisco_doctor").run(
                input=["tag://" + tag], map=map, reduce=reduce, map_reader=chain_reader)
            say("job", job.name)
            results = job.wait(timeout=float(seconds), show=False)
            say("step read")
            counts = dict(result_iterator(results))
            say("result", json.dumps(counts, sort_keys=True))
        except Exception as error:  # any failure is the doctor's finding, said in one line
            say("error", f"{type(error).__name__}: {error}".replace("\n", " ")[:500])
        finally:
            _clean(Disco(), ddfs, tag, job)


def _clean(master, ddfs, tag, job):
    say("step clean")
    if job is not None:
        for action in (master.kill, master.purge):
            try:
                action(job.name)
            except Exception as error:
                say("cleanup", f"{action.__name__} {job.name}: {error}".replace("\n", " "))
    try:
        ddfs.delete(tag)
    except Exception as error:
        say("cleanup", f"ddfs rm {tag}: {error}".replace("\n", " "))


if __name__ == "__main__":
    os.umask(0o077)
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "nodeinfo":
        nodeinfo(args[0], args[1], args[2:])
    elif mode == "wordcount":
        wordcount(args[0], args[1], args[2])
    else:
        sys.exit(f"unknown mode {mode}")
