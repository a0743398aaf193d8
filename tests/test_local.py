"""colaflow.local.LocalCluster (what `colaflow demo` and the benches run on) leaves no daemon behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SCRIPT = """
import sys, time
from colaflow.local import LocalCluster
with LocalCluster("tiny-llama", workers=1) as c:
    print(" ".join(str(p.pid) for p in c.procs.values()), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited: only its parent's wait is missing
        return f.read().split(") ")[1][0] != "Z"


def test_sigterm_to_the_parent_stops_its_server_and_daemons():
    """The default SIGTERM action would end the parent and orphan `colaflow serve` and `colaflow edge`."""
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], "daemons outlived their LocalCluster"
    finally:
        parent.kill()
