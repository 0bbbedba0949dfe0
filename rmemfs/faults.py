"""Fault injection for tests: ``RMEMFS_FAULT=<point>`` SIGKILLs the process when it reaches that point;
``RMEMFS_FAULT=raise:<point>`` raises an exception there (see ``fail``); ``RMEMFS_FAULT=stop:<point>``
SIGSTOPs it there, so that a test can break something real (a Ceph OSD) at that moment and SIGCONT it.

Points are named where a crash is interesting for durability (see flusher.py).
Costs one dict lookup when unset.
"""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)
_ARMED = os.environ.get("RMEMFS_FAULT", "")


def point(name: str) -> None:
    if _ARMED and _ARMED in (name, f"stop:{name}"):
        stop = _ARMED != name
        log.warning("fault injection: %s at %s", "SIGSTOP" if stop else "SIGKILL", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)


def fail(name: str, make: Callable[[str], BaseException]) -> None:
    """``RMEMFS_FAULT=raise:<name>`` raises ``make(message)`` at that point: a failure the code around it
    must survive (the start-up's cleanup, for one)."""
    if _ARMED and _ARMED == f"raise:{name}":
        log.warning("fault injection: raising at %s", name)
        raise make(f"fault injected at {name}")
