"""Prometheus metrics (prometheus_client) on ``-o metrics=ADDR:PORT``, for rmemfs and rmemfs-standby.

One HTTP server per process and address. Each part of a process adds its own collector: the standby's
watch (``standby.watch_metrics``) and a mounted filesystem (``filesystem_metrics``); in rmemfs-standby
both, on one address, the second after a takeover. Collectors run in the server's thread at each scrape,
so they read only figures that are O(1) and safe to read beside the event loop (no list walks: a scrape
must not stall the heartbeat).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .stalls import GC_PAUSES

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

_servers: dict[str, Any] = {}


def check_address(addr: str) -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT too) or ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"metrics must be ADDR:PORT (got {addr})")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(addr: str, collect: Callable[[], Iterable[Any]]) -> None:
    """Add ``collect`` (yielding metric families) to the server on ``addr``, started on first use.
    OSError if the address cannot be served."""
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY
    from prometheus_client.registry import Collector

    class _Collector(Collector):
        def collect(self) -> Iterable[Any]:
            return collect()

        def describe(self) -> Iterable[Any]:
            return []        # not collected at registration (the filesystem may not be serving yet)

    if addr not in _servers:
        host, port = check_address(addr)
        _servers[addr] = start_http_server(port, addr=host)
        log.info("serving Prometheus metrics on %s", addr)
    REGISTRY.register(_Collector())


def filesystem_metrics(session: Session) -> Callable[[], Iterable[Any]]:
    """The served filesystem's figures: heartbeat, dirty lists, flushes, fencing."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, value: float) -> Any:
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], value)
        return g

    def collect() -> Iterable[Any]:
        fs, flusher = session.opened.fs, session.flusher
        tracker = fs.tracker
        hdr = tracker.header()
        yield CounterMetricFamily("rmemfs_heartbeat", "heartbeat increments (by the event loop)", value=hdr.heartbeat)
        yield gauge("rmemfs_heartbeat_age_seconds", "wall time since the last heartbeat",
                    max(0.0, (time.time_ns() - hdr.heartbeat_ns) / 1e9))
        yield gauge("rmemfs_epoch", "the filesystem's epoch (one per owner)", session.opened.epoch)
        yield gauge("rmemfs_fenced", "1 once a newer owner fenced this mount", 1 if hdr.fence else 0)
        # Entries, not pages: each entry is a run of up to 65536 pages (rmemfs-ctl stats counts pages).
        yield gauge("rmemfs_dirty_entries", "entries on the current dirty list", tracker.current.count)
        yield gauge("rmemfs_dirty_flushing_entries", "entries on the list being flushed", tracker.flushing.count)
        yield gauge("rmemfs_dirty_capacity_entries", "entries per dirty list", tracker.capacity)
        yield gauge("rmemfs_loop_lateness_longest_seconds",
                    "the longest the heartbeat task woke late: this event loop's longest stall",
                    session.loop_lateness.longest)
        yield gauge("rmemfs_gc_pause_longest_seconds", "the garbage collector's longest pause",
                    GC_PAUSES.longest)
        yield CounterMetricFamily("rmemfs_journal_compactions", "namespace journal compactions written",
                                  value=fs.compactions)
        yield gauge("rmemfs_journal_compaction_longest_step_seconds",
                    "the longest event-loop step a journal compaction took (a slice or the write)",
                    fs.compaction_longest_step_s)
        if flusher is not None:
            st = flusher.statistics()
            yield CounterMetricFamily("rmemfs_flushes", "baselines published", value=st.flushes)
            yield CounterMetricFamily("rmemfs_flush_failures", "flushes that failed", value=st.failures)
            yield CounterMetricFamily("rmemfs_flush_written_bytes", "bytes written by flushes", value=st.total_bytes)
            yield gauge("rmemfs_flush_last_seconds", "duration of the last flush", st.last_duration_s)
            yield gauge("rmemfs_flush_last_pages", "pages in the last flush", st.last_pages)
            yield gauge("rmemfs_baseline_generation", "the latest baseline's generation", st.generation)
            yield gauge("rmemfs_baseline_age_seconds", "wall time since the latest baseline",
                        max(0.0, (time.time_ns() - st.generation_time_ns) / 1e9))
        bg = session.opened.background
        if bg is not None:
            yield gauge("rmemfs_load_missing_pages", "pages a lazy recovery has still to load",
                        bg.loader.stats().get("missing_pages") or 0)

    return collect
