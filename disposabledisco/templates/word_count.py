"""Disco word count over INPUT... (`python3 word_count.py INPUT...`, as a Disco client).

Prints `JOB_SECONDS s` and `RESULT {json counts}`. The job's name is WORD_COUNT_NAME
(default `wordcount`); every map call first sleeps WORD_COUNT_PAUSE seconds (default 0.05:
a 60-line input is a ~3 s map task, so a host can be lost while the job runs; 0 for none).
WORD_COUNT_READER is `chain` (default) for `ddfs chunk` input, whose blobs hold Disco's
encoded records, or `lines` for plain text such as `raw://` inputs (Disco's own line
iteration). One script for the sandbox demo and the `disco` test tier.
"""

import json
import os
import sys
import time

from disco.core import Job, result_iterator
from disco.worker.task_io import chain_reader

#: map_reader by WORD_COUNT_READER: None is Disco's default, the input's lines
READERS = {"chain": chain_reader, "lines": None}


def map(line, params):
    # Disco ships the function alone: the module's imports are not there
    import time
    time.sleep(params)
    for word in line.split():
        yield word.decode() if isinstance(word, bytes) else word, 1


def reduce(iter, params):
    from disco.util import kvgroup
    for word, counts in kvgroup(sorted(iter)):
        yield word, sum(counts)


if __name__ == "__main__":
    started = time.monotonic()
    job = Job(name=os.environ.get("WORD_COUNT_NAME", "wordcount")).run(
        input=sys.argv[1:], map=map, reduce=reduce,
        map_reader=READERS[os.environ.get("WORD_COUNT_READER", "chain")],
        params=float(os.environ.get("WORD_COUNT_PAUSE", "0.05")))
    counts = dict(result_iterator(job.wait(show=False)))
    print("JOB_SECONDS %.2f" % (time.monotonic() - started))
    print("RESULT " + json.dumps(counts))
