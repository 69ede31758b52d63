"""A process that needs STOP_S seconds to stop after SIGTERM (as a rank writing a large checkpoint does): it writes
WORKDIR/ready, waits for the signal, then writes WORKDIR/stopped after STOP_S seconds and exits 143.

    bash run.sh tests/slow_stop_worker.py WORKDIR STOP_S
"""

import os
import signal
import sys
import time

workdir, stop_s = sys.argv[1], float(sys.argv[2])


def stop(signum, frame):
    time.sleep(stop_s)  # the checkpoint being written
    with open(os.path.join(workdir, "stopped"), "w") as f:
        f.write(f"{stop_s}\n")
    sys.exit(143)


signal.signal(signal.SIGTERM, stop)
with open(os.path.join(workdir, "ready"), "w") as f:
    f.write("ready\n")
while True:
    time.sleep(1)
