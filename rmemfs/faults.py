"""Crash injection for tests: ``RMEMFS_FAULT=<point>`` SIGKILLs the process when it reaches that point.

Points are named where a crash is interesting for durability (see flusher.py).
Costs one dict lookup when unset.
"""
from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
_ARMED = os.environ.get("RMEMFS_FAULT", "")


def point(name: str) -> None:
    if _ARMED and _ARMED == name:
        log.warning("fault injection: SIGKILL at %s", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
