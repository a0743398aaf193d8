"""The scheduler's one lock: it locks itself, as Flower's in-memory LinkState does, so every caller
(servicers, the step loop, the status page) calls its methods directly and none writes its records."""
from __future__ import annotations

import functools


def locked(method):
    """Run the method under the scheduler's lock (any thread may call it)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return run


def changes(method):
    """`locked`, and then the scheduler's listeners hear that something changed (a worker may have a
    message now, a waiting step its version)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            try:
                return method(self, *args, **kwargs)
            finally:
                self._changed()
    return run
