"""How long this process's own event loop (and its garbage collector) held things up.

A standby decides from silence, so both sides need their own stalls measured apart from the other's:
the source's heartbeat task (``session._heartbeat``) and the standby's watch loop (``standby.Watcher``)
each sleep through ``Lateness.sleep``, which records how much later than asked the loop woke them
(whatever held the loop or the CPU meanwhile). ``GcPauses`` records the collector's pauses, which stop
every thread of the interpreter.
"""
from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)


# CPython makes a thread that holds the GIL give it up to a waiting one only after this long (5 ms by
# default). An event loop releases the GIL at every system call, and a busy worker thread (the flush
# hashing pages, a plan reading segment indexes) takes it each time, so the loop waits up to the interval
# per call: the convoy effect. In tools/soak_standby.py (8 writers, flush_interval=1, 2 minutes a run) at
# 5 ms the source's loop woke 48-68 ms late while its own thread ran 7-10 ms of that and the process 70-81 ms
# (the flush's threads); at 1 ms and at 0.5 ms it woke at most 26-29 ms late, with the loop's thread
# running most of that, and the longest heartbeat gaps from GIL waits were gone (47-52 ms, against 68-88).
SWITCH_INTERVAL = 0.001


def favour_the_event_loop() -> None:
    """Let this process's event loop take the GIL back from worker threads within SWITCH_INTERVAL."""
    sys.setswitchinterval(SWITCH_INTERVAL)


@dataclass
class Lateness:
    """Wake-ups later than asked: the longest, when it ended (wall clock, ns), and how many were late by
    more than ``threshold``. For the longest, what used the CPU meanwhile tells its cause apart: this
    (the loop's) thread's CPU time (a long step of the loop), the whole process's (its other threads,
    holding the GIL), or neither (the process was not running: the machine's other work)."""

    threshold: float = 0.05
    longest: float = 0.0
    longest_at_ns: int | None = None
    longest_loop_cpu: float = 0.0
    longest_process_cpu: float = 0.0
    late: int = 0

    def note(self, seconds: float, loop_cpu: float = 0.0, process_cpu: float = 0.0) -> None:
        if seconds > self.longest:
            self.longest, self.longest_at_ns = seconds, time.time_ns()
            self.longest_loop_cpu, self.longest_process_cpu = loop_cpu, process_cpu
        if seconds > self.threshold:
            self.late += 1

    async def sleep(self, seconds: float) -> float:
        """``trio.sleep(seconds)``; returns (and notes) how much later than that the task ran again."""
        start, thread_cpu, process_cpu = time.monotonic(), time.thread_time(), time.process_time()
        await trio.sleep(seconds)
        late = max(0.0, time.monotonic() - start - seconds)
        self.note(late, time.thread_time() - thread_cpu, time.process_time() - process_cpu)
        return late

    def to_json(self) -> dict[str, Any]:
        return {"longest": self.longest, "longest_at_ns": self.longest_at_ns, "late": self.late,
                "threshold": self.threshold, "longest_loop_cpu": self.longest_loop_cpu,
                "longest_process_cpu": self.longest_process_cpu}


class GcPauses:
    """The garbage collector's pauses in this interpreter (``gc.callbacks``), longest and total, from
    ``install()`` on."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_generation: int | None = None
        self.total = 0.0
        self.collections = 0
        self._start = 0.0

    def install(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        self.collections += 1
        self.total += pause
        if pause > self.longest:
            self.longest, self.longest_generation = pause, info.get("generation")

    def to_json(self) -> dict[str, Any]:
        return {"longest": self.longest, "longest_generation": self.longest_generation, "total": self.total,
                "collections": self.collections}


GC_PAUSES = GcPauses()      # the process's one collector; installed by whoever serves (mount, standby)
