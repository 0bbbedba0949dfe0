"""The standby's watch: stay registered with the source's exporter and decide when the source is dead.

``Watcher.run`` connects to the source's exporter, does the registration
handshake (the catalog) ahead of any failure, and then reads the heartbeat
word of the ctl region with one-sided reads every ``watch_interval``. The
heartbeat is written by the source's event loop (``mount._heartbeat``), so a
hung loop looks the same as a dead process.

Verdicts (``Watcher.verdict``), after which ``run`` returns:

* ``dead``: the exporter answers but the heartbeat has not moved (the silence is measured on this
  host's monotonic clock, so clocks need not agree: from the return of the read that first saw the last
  beat to the start of a read that still finds it, so a stall of this process, before or after a read,
  never adds to it). Once two beats are missed the exporter is asked what the process is doing
  (``liveness``), and the silence that is a verdict depends on the answer (``detected_by``):

  - ``exit``: the process exited (killed, crashed): at once, a fact and no guess;
  - ``stopped``: it is stopped (SIGSTOP, a debugger), a pause: after ``dead_after`` plus one heartbeat
    interval of silence, so that the pause itself lasted at least ``dead_after`` (item 4: a shorter
    pause is never taken over);
  - ``silence``: it still runs, or the exporter cannot say: after ``hung_after``, which must outlast
    every stall of a live source (its event loop held, its process not scheduled).

  The caller fences and recovers (``recovery.recover`` fences first: a source that was only paused
  resumes fenced and acknowledges nothing).
A backend marked clean (the source unmounted on purpose) is never a verdict
either: the watcher waits for the source to mount again.

* ``fenced_by_cmd``: the exporter has been unreachable for ``hung_after`` and
  ``fence_cmd`` exited 0 (the source is powered off or cut off): the caller
  may recover from the baseline alone, losing what was dirty.

An exporter that is unreachable without ``fence_cmd`` is never a verdict:
the watcher keeps trying and says once that it needs an operator.

Catalog freshness: a failed read, a new pid or epoch in the ctl header (a
remount), or ``refresh_interval`` passing, leads to a new handshake, so a
region that grew or an exporter that restarted is seen before a failure.

Stalls, kept apart (``WatchStatus``): ``longest_gap`` is the longest time between two changes this
process saw, which includes its own stalls; ``source_longest_gap`` is the same measured on the source's
clock (its heartbeat wall times, less the beats in between: an upper bound on the source's longest
silence, exact when no beat was missed, loose by how much missed beats overran their interval);
``watch_lateness`` and ``read_longest`` are this process's own stalls: how late its watch loop woke,
and its longest heartbeat read.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import trio

from .errors import AuthFailed, BackendError, CorruptionError, SourceFsidMismatch, TransportFailed
from .fencing import run_fence_cmd
from .loader import LoadPlan, plan_load
from .recovery import connect_source
from .sources.remote import read_source_header
from .liveness import EXITED, STOPPED, UNKNOWN, ask_liveness
from .stalls import GC_PAUSES, Lateness
from .store import BaselineStore
from .transport.base import (AuthError, Catalog, ConnectError, Connection, FsidMismatch, TransportError,
                             TransportUnavailable)

log = logging.getLogger(__name__)

# tools/bench --only failover's write cost (the standby and the source's exporter on the source's 2 cores):
# at 10 ms the two took 0.07 + 0.04 cores, at 20 ms 0.055 + 0.03 (the source's 4 KiB pwrite()s ran 0.89x as
# fast as unwatched at 10 ms, 0.95x and 0.86x in two runs at 20 ms: too noisy to tell). Detection loses at
# most one interval: the failover p50s stayed under 300 ms (tools/bench at 5166bad).
DEFAULT_WATCH_INTERVAL = 0.02
# tools/bench --only heartbeat (20 ms heartbeat): 1 MiB writes, flushes and mmap stores leave gaps of
# 26-38 ms of loop time (up to ~0.1 s on this busy machine). The journal's compaction is built in slices of
# 5 ms (issue 12), a full GC pass is gone with gc.freeze() at the mount, and a flush's atomic section copies
# page maps, a full flush's too (it merged the live map's runs on the loop: 60-80 ms at 130,000 live pages,
# found with faulthandler stack dumps of the stalls). In tools/soak_standby.py (8 writers, flush_interval=1,
# 10 minutes, the 2 cores shared with a niced test run) a live source was silent for at most 141 ms; its
# loop thread ran 13 ms of it, the process 100 ms (most likely the loop waiting on the GIL behind the
# flush's threads). A threshold of 0.15 s (then dead_after, for every source) came within 7 ms of a false
# takeover in 10 minutes, and had one in a 3-minute run under heavier load before the full-flush fix; on
# 2 cores shared with three benchmarking helpers silences reached 0.9 s. Hence 0.25 s: 1.8x the worst
# silence at the soak's load; raise it where the source shares its CPUs with heavier work. It applies to a
# source that still runs (or an exporter that cannot say): one that exited or is stopped is known to be so
# by its exporter (``liveness``), sooner.
DEFAULT_HUNG_AFTER = 0.25
# A stopped process never beats, whatever the load: its threshold needs no room for stalls. 0.1 s: the
# detection goal (issue 12 item 2: about 100 ms here).
DEFAULT_DEAD_AFTER = 0.1
REFRESH_INTERVAL = 5.0
# After this many heartbeat intervals of silence the exporter is asked whether the source process exited
# (``liveness``): a beat late by a whole interval is common under load (tools/soak_standby.py: p99 gap
# ~36 ms at a 20 ms interval), so asking sooner would mostly hear "running".
PROBE_AFTER_BEATS = 2
STALL_EVENT_MIN = 0.05      # the watch's own stalls from this long are events (and at least hung_after / 4)


@dataclass
class WatchStatus:
    source: str
    state: str = "connecting"          # connecting, watching, unreachable, needs-operator, dead, fenced_by_cmd
    heartbeat: int | None = None
    heartbeat_interval: float | None = None
    last_change: float | None = None   # monotonic
    registrations: int = 0
    detected_after: float | None = None  # seconds the heartbeat was silent when declared dead
    detected_by: str | None = None     # "exit", "stopped" or "silence" (the module's docstring)
    detected_at_ns: int | None = None
    longest_gap: float = 0.0           # longest heartbeat silence seen while the source was alive
    source_longest_gap: float = 0.0    # the same on the source's clock: without this process's stalls
    heartbeat_ns: int | None = None    # the source's wall time of the last beat seen
    watch_lateness: Lateness = field(default_factory=Lateness)   # this process's loop: woken late by
    read_longest: float = 0.0          # this process's longest heartbeat read
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        age = None if self.last_change is None else time.monotonic() - self.last_change
        return {"source": self.source, "state": self.state, "heartbeat": self.heartbeat,
                "heartbeat_age": age, "heartbeat_interval": self.heartbeat_interval,
                "registrations": self.registrations, "detected_after": self.detected_after,
                "detected_by": self.detected_by,
                "detected_at_ns": self.detected_at_ns, "longest_gap": self.longest_gap,
                "source_longest_gap": self.source_longest_gap, "watch_lateness": self.watch_lateness.to_json(),
                "read_longest": self.read_longest, "gc": GC_PAUSES.to_json()}

    def saw_beat(self, heartbeat: int, heartbeat_ns: int, interval: float) -> None:
        """A changed heartbeat: the source's own longest silence, from its clock. Of N beats since the
        last one seen, each gap but one was at least about ``interval``, so the longest was at most the
        time between the two less N - 1 intervals (exact when N is 1)."""
        if self.heartbeat is not None and self.heartbeat_ns is not None and heartbeat > self.heartbeat:
            bound = (heartbeat_ns - self.heartbeat_ns) / 1e9 - (heartbeat - self.heartbeat - 1) * interval
            self.source_longest_gap = max(self.source_longest_gap, bound)
        self.heartbeat_ns = heartbeat_ns


class Watcher:
    """A background task: ``await nursery.start(w.run)`` returns once the first handshake is done (or the
    exporter was found unreachable); ``run`` returns with ``verdict`` set, or when ``stop()`` is called."""

    def __init__(self, *, host: str, port: int, fsid: str, secret: bytes, transport: str = "auto",
                 watch_interval: float = DEFAULT_WATCH_INTERVAL, dead_after: float = DEFAULT_DEAD_AFTER,
                 hung_after: float = DEFAULT_HUNG_AFTER,
                 fence_cmd: str | None = None, timeout: float = 2.0, event_log: Path | None = None,
                 source_stopped: Callable[[], bool] = lambda: False) -> None:
        self.host, self.port, self.fsid, self.secret = host, port, fsid, secret
        self.transport, self.watch_interval, self.dead_after = transport, watch_interval, dead_after
        self.hung_after = max(hung_after, dead_after)
        self.fence_cmd, self.timeout, self.event_log = fence_cmd, timeout, event_log
        self.source_stopped = source_stopped    # the backend says it was unmounted cleanly: nothing to take
        self.status = WatchStatus(source=f"{host}:{port}")
        self.verdict: str | None = None
        self.recovery_phases: dict[str, float] = {}     # the takeover's, once it has mounted (for metrics)
        self._conn: Connection | None = None
        self._catalog: Catalog | None = None
        self._liveness = False          # the exporter answers ``liveness`` (asked at each registration)
        self._told_no_liveness = False  # that it does not is logged once
        self._cancel = trio.CancelScope()
        self.finished = trio.Event()     # run has returned: a verdict, or stop(); the takeover starts at once

    def stop(self) -> None:
        self._cancel.cancel()

    def _event(self, kind: str, **detail: Any) -> None:
        event = {"time_ns": time.time_ns(), "event": kind, "source": self.status.source, **detail}
        del self.status.events[:-100]
        self.status.events.append(event)
        if self.event_log is not None:
            write_event(self.event_log, event)

    async def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with trio.move_on_after(1):
                await conn.aclose()

    async def _register(self) -> None:
        await self._close()
        try:
            with trio.fail_after(self.timeout):
                self._conn, self._catalog = await connect_source(self.transport, self.host, self.port, self.fsid,
                                                                 self.secret, self.timeout)
        except FsidMismatch as e:      # a misconfiguration, not an outage: say so and stop
            raise SourceFsidMismatch(str(e)) from None
        except AuthError as e:
            raise AuthFailed(str(e)) from None
        except TransportUnavailable as e:   # no retry mends it (no RDMA device here): not an outage
            raise TransportFailed(str(e)) from None
        self.status.registrations += 1
        self._event("registered", regions=len(self._catalog.regions))
        self._liveness = True
        await self._process_state()     # the exporter starts watching the process while it is alive
        log.debug("registered with %s (%d regions)", self.status.source, len(self._catalog.regions))

    async def _process_state(self) -> str:
        """The source process's state as its exporter knows it (``liveness``); UNKNOWN when it cannot say.
        An exporter without the request (an older one) is not asked again until the next registration."""
        if not self._liveness or self._conn is None:
            return UNKNOWN
        with trio.move_on_after(max(self.hung_after, 0.5)):
            try:
                return (await ask_liveness(self._conn))[1]
            except TransportError as e:
                if not self._told_no_liveness:
                    self._told_no_liveness = True
                    log.info("source exporter %s cannot tell whether its process exited (%s): detection by "
                             "heartbeat silence only", self.status.source, e)
        self._liveness = False
        return UNKNOWN

    def _note_stall(self, kind: str, seconds: float) -> None:
        """This process's own stall (its loop woke late, or a read took long): kept, and an event once it
        is long enough to matter beside ``hung_after``."""
        st = self.status
        if kind == "read":
            st.read_longest = max(st.read_longest, seconds)
        if seconds >= max(STALL_EVENT_MIN, self.hung_after / 4):
            self._event("watch-stalled", part=kind, seconds=seconds)
            log.info("standby: this host's watch %s stalled for %.0f ms (hung_after %.0f ms)",
                     "loop" if kind == "loop" else "read", seconds * 1e3, self.hung_after * 1e3)

    async def _verdict(self, silent: float, heartbeat_interval: float | None) -> str | None:
        """What ``silent`` seconds of heartbeat silence make of the source (the module's docstring): "exit",
        "stopped", "silence", or None (not dead yet). Once beats are missed the exporter is asked."""
        interval = heartbeat_interval or 0.0
        probe_after = max(PROBE_AFTER_BEATS * interval, 2 * self.watch_interval)
        state = await self._process_state() if silent >= probe_after else UNKNOWN
        if state == EXITED:
            return "exit"
        if state == STOPPED:      # a pause whatever hung_after says: only dead_after of it counts
            return "stopped" if silent >= self.dead_after + interval else None
        return "silence" if silent >= self.hung_after else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        unreachable_since: float | None = None
        told_operator = False
        registered_at = 0.0
        seen: tuple[int, int] | None = None      # (pid, epoch) of the memory registered with
        st = self.status
        try:
            with self._cancel:
                while True:
                    now = time.monotonic()
                    try:
                        if self._conn is not None and self._conn.peer_closed():
                            # Dropped between reads (the exporter's idle timeout, or a restart): that
                            # is not an outage, so register again instead of reading on a dead connection.
                            log.info("source exporter %s closed the watch connection; registering again",
                                     self.status.source)
                            await self._close()
                        if self._conn is None or now - registered_at > REFRESH_INTERVAL:
                            await self._register()
                            registered_at = time.monotonic()
                        assert self._conn is not None and self._catalog is not None
                        issued = time.monotonic()
                        with trio.fail_after(max(self.hung_after, 0.5)):
                            header = await read_source_header(self._conn, self._catalog)
                        self._note_stall("read", time.monotonic() - issued)
                    except (ConnectError, TransportError, CorruptionError, OSError, trio.TooSlowError) as e:
                        await self._close()
                        if unreachable_since is None:
                            unreachable_since = time.monotonic()
                            st.state = "unreachable"
                            self._event("unreachable", error=str(e))
                            log.info("source exporter %s unreachable: %s", st.source, e)
                        if not started:
                            started = True
                            task_status.started()
                        if time.monotonic() - unreachable_since >= self.hung_after:
                            if await trio.to_thread.run_sync(self.source_stopped):
                                unreachable_since = time.monotonic()   # a remount's start-up gets hung_after anew
                                if st.state != "source-stopped":
                                    st.state = "source-stopped"
                                    self._event("source-stopped")
                                    log.info("source %s was unmounted cleanly: waiting for it to mount again",
                                             st.source)
                            elif self.fence_cmd:
                                if await trio.to_thread.run_sync(run_fence_cmd, self.fence_cmd, self.host,
                                                                 self.port, self.fsid):
                                    st.state = self.verdict = "fenced_by_cmd"
                                    st.detected_after = time.monotonic() - unreachable_since
                                    st.detected_at_ns = time.time_ns()
                                    self._event("fenced_by_cmd")
                                    return
                            elif not told_operator:
                                told_operator = True
                                st.state = "needs-operator"
                                self._event("needs-operator")
                                log.warning("source exporter %s is unreachable and no fence_cmd is configured: "
                                            "not taking over; an operator must fence it and run rmemfs-recover "
                                            "--baseline-only (still trying)", st.source)
                        await trio.sleep(min(max(self.watch_interval, 0.05), 1.0))
                        continue
                    if unreachable_since is not None:
                        log.info("source exporter %s reachable again", st.source)
                        unreachable_since, told_operator = None, False
                    now = time.monotonic()
                    ident = (header.pid, header.epoch)
                    if seen is not None and ident != seen:
                        # The source remounted (new pid or epoch): its regions may differ; register again.
                        self._event("remounted", pid=header.pid, epoch=header.epoch)
                        seen = None
                        await self._close()
                        continue
                    if seen is None or header.heartbeat != st.heartbeat:
                        interval = header.heartbeat_interval_us / 1e6
                        if st.last_change is not None and seen is not None:
                            st.longest_gap = max(st.longest_gap, now - st.last_change)
                            st.saw_beat(header.heartbeat, header.heartbeat_ns, interval)
                        else:
                            st.heartbeat_ns = header.heartbeat_ns
                        st.heartbeat, st.last_change = header.heartbeat, now
                        st.heartbeat_interval = interval
                        seen = ident
                    if header.fence:
                        st.state = "source-fenced"
                    elif st.state != "watching":
                        st.state = "watching"
                        self._event("watching", pid=header.pid, epoch=header.epoch)
                    if not started:
                        started = True
                        task_status.started()
                    assert st.last_change is not None
                    # From the return of the read that saw the beat to the start of this one: the source
                    # was silent at least that long, whatever this process did meanwhile.
                    silent = issued - st.last_change
                    by = None if header.fence else await self._verdict(silent, st.heartbeat_interval)
                    if by is not None and not await trio.to_thread.run_sync(self.source_stopped):
                        st.state = self.verdict = "dead"
                        st.detected_after, st.detected_by = silent, by
                        st.detected_at_ns = time.time_ns()
                        self._event("dead", heartbeat=header.heartbeat, silent=silent, by=by)
                        return
                    self._note_stall("loop", await st.watch_lateness.sleep(self.watch_interval))
        finally:
            self.finished.set()
            await self._close()
            if not started:
                task_status.started()


class PlanAhead:
    """A background task: the baseline's load plan (every segment index read and checked), made again
    whenever the source publishes a new generation, at most every ``REFRESH_INTERVAL``; a takeover starts
    from it instead of reading the indexes then (issue 12: prepared ahead). A failure is only logged: the
    takeover plans for itself."""

    def __init__(self, open_backend: Callable[[], BaselineStore]) -> None:
        self.open_backend = open_backend        # opened in the serving process (a RADOS handle does not fork)
        self.backend: BaselineStore | None = None
        self.planned: tuple[int, LoadPlan] | None = None     # (generation, plan)
        self.plans = 0

    async def run(self) -> None:
        while True:
            try:
                if self.backend is None:
                    self.backend = await trio.to_thread.run_sync(self.open_backend)
                backend = self.backend
                manifest = await trio.to_thread.run_sync(backend.read_manifest)
                if self.planned is None or self.planned[0] != manifest.generation:
                    plan = await trio.to_thread.run_sync(plan_load, backend, manifest)
                    self.planned, self.plans = (manifest.generation, plan), self.plans + 1
                    log.debug("standby: planned baseline generation %d ahead", manifest.generation)
            except (BackendError, CorruptionError, OSError) as e:
                log.info("standby: could not plan the baseline ahead (%s); a takeover will plan it", e)
            await trio.sleep(REFRESH_INTERVAL)


def write_event(path: Path, event: dict[str, Any]) -> None:
    """One JSON line appended to the event log (a failure to log never stops the watch)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")
    except OSError as e:
        log.debug("event log %s: %s", path, e)


def watch_metrics(watcher: Watcher) -> Callable[[], Iterator[Any]]:
    """The watch's Prometheus figures (``metrics.serve``): heartbeat age, longest gap, detections."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    def collect() -> Iterator[Any]:
        st = watcher.status.to_json()
        yield InfoMetricFamily("rmemfs_standby", "the watched source and state",
                               value={"source": st["source"], "state": str(st["state"])})
        age = GaugeMetricFamily("rmemfs_standby_heartbeat_age_seconds", "time since the heartbeat last moved")
        age.add_metric([], st["heartbeat_age"] if st["heartbeat_age"] is not None else float("nan"))
        yield age
        gap = GaugeMetricFamily("rmemfs_standby_heartbeat_longest_gap_seconds",
                                "longest heartbeat silence seen while the source was alive")
        gap.add_metric([], st["longest_gap"])
        yield gap
        for name, doc, value in (
                ("source_longest_gap", "the source's longest heartbeat silence, on its own clock",
                 st["source_longest_gap"]),
                ("watch_lateness_longest", "this standby's own longest stall: its watch loop woken late",
                 st["watch_lateness"]["longest"]),
                ("read_longest", "this standby's longest heartbeat read", st["read_longest"]),
                ("gc_pause_longest", "this standby's longest garbage-collector pause", st["gc"]["longest"])):
            g = GaugeMetricFamily(f"rmemfs_standby_{name}_seconds", doc)
            g.add_metric([], value)
            yield g
        yield CounterMetricFamily("rmemfs_standby_registrations", "handshakes with the source's exporter",
                                  value=st["registrations"])
        yield CounterMetricFamily("rmemfs_standby_detections", "sources declared dead",
                                  value=1 if st["detected_after"] is not None else 0)
        det = GaugeMetricFamily("rmemfs_standby_detection_seconds", "heartbeat silence at the detection")
        det.add_metric([], st["detected_after"] if st["detected_after"] is not None else float("nan"))
        yield det
        phases = GaugeMetricFamily("rmemfs_standby_recovery_phase_seconds", "the takeover's recovery, per phase",
                                   labels=["phase"])
        for name, seconds in watcher.recovery_phases.items():
            phases.add_metric([name], seconds)
        yield phases

    return collect


def status_socket(mountpoint: Path) -> Path:
    """Where a standby for ``mountpoint`` answers ``rmemfs-ctl standby status`` (root only)."""
    import hashlib
    digest = hashlib.sha256(str(mountpoint.absolute()).encode()).hexdigest()[:16]
    return Path("/run/rmemfs-standby") / f"{digest}.sock"


def status_file(mountpoint: Path) -> Path:
    """The standby's last status, written at a takeover (the socket goes when the watch ends)."""
    return status_socket(mountpoint).with_suffix(".json")
