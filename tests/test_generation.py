"""helix_compile/generation.py: what one rank's work leaves behind in the process that called it."""

import time

from helix_compile.generation import Watchdog


def test_a_stopped_watchdog_never_ends_the_process():
    """rank_main stops its watchdog when it returns: a caller that goes on (a test, a notebook, the next request)
    must not be ended, exit 3, by the finished generation's "no progress" timer."""
    dog = Watchdog(0, 0.3)
    dog.stop()
    time.sleep(1.2)  # past the limit: a running watchdog would have called os._exit(3) by now
    assert dog.stopped.is_set()
