"""``python -m peak_load CHECKPOINT``: load CHECKPOINT with ``hymtl.model.load_checkpoint`` and print
the refusal, if any, then ``peak_mb`` and this process's peak resident memory in MB.

A module (not ``python -c``) so that ``tests/test_trust.py`` can start it as it starts the entry
points, through the worker's fork server: the peak it reports then includes the pages the fork
inherited, which the test's baseline, measured the same way in the same run, includes too.
"""

import resource
import sys

from hymtl.loading import LoadError
from hymtl.model import load_checkpoint

try:
    load_checkpoint(sys.argv[1])
except LoadError as exc:
    print(len(str(exc)), str(exc)[:200])
print("peak_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
