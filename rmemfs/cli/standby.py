"""rmemfs-standby: watch a source host's filesystem and take it over by itself when it dies.

  rmemfs-standby --source HOST[:PORT] --backend B [-o opts] [-f] MOUNTPOINT

Standby options (in -o, beside the mount options used after a takeover):
  watch_interval=S   seconds between heartbeat reads (default 0.02)
  dead_after=S       how long a pause of the source (its process stopped, as its exporter says) is
                     left alone before a takeover (default 0.1); one that exited is taken over at once
  hung_after=S       heartbeat silence of a source that still runs, or whose exporter cannot say what
                     it does, that counts as dead (default: 0.25, or 5 of the source's heartbeat
                     intervals when that is longer; at least dead_after)
  fence_cmd=CMD      run with HOST:PORT and the fsid when the exporter is unreachable; exit 0 means
                     the source is powered off or cut off, and the standby recovers from the baseline
  event_log=PATH     append the watch's events (registered, watching, unreachable, dead, ...) as JSON lines
  metrics=ADDR:PORT  serve Prometheus metrics of the watch (heartbeat age, detections, registrations)
  report=PATH        write the takeover's recovery report (its phases) as JSON, as rmemfs-recover --json

After a takeover the process serves the mount as the new owner (as rmemfs-recover -f does), and its
exit codes are rmemfs-recover's. Before it: 0 stopped (SIGTERM, SIGINT); 1 unexpected error; 2 usage;
10 backend missing; 12 mountpoint; 13 not root; 16 backend unreachable; 21 wrong secret; 22 filesystem
id mismatch; 24 transport unavailable (README's exit-code table; rmemfs/exits.py).
B is a directory or rados:POOL[/PREFIX] (with -o ceph_conf=PATH,ceph_id=NAME, passed on to the takeover).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from .. import control
from ..metrics import check_address, serve as serve_metrics
from .. import fs as _fuse_adapter  # noqa: F401  (loads pyfuse3 now, not on the takeover's clock)
from ..errors import BackendError, CommandError, CorruptionError, QuietError, backend_failed
from ..exits import EXIT_USAGE
from ..host import check_environment, check_mountpoint
from ..launch import ExporterLaunch
from ..opening import read_backend
from ..options import parse_options
from ..recovery import parse_source
from ..sdnotify import notify
from ..store import STATE_CLEAN, StoreOptions, open_store
from ..stalls import GC_PAUSES, favour_the_event_loop
from ..standby import (DEFAULT_DEAD_AFTER, DEFAULT_HUNG_AFTER, DEFAULT_WATCH_INTERVAL, PlanAhead, Watcher, status_file,
                       status_socket, watch_metrics, write_event)
from . import recover as recover_cli
from .common import first_of, run_main, setup_logging, take_options
from .mount import build_parser, daemonize_and_run

log = logging.getLogger(__name__)
STANDBY_KEYS = ("watch_interval", "dead_after", "hung_after", "fence_cmd", "event_log", "metrics", "report")


def _seconds(mine: dict[str, str], key: str) -> float | None:
    if key not in mine:
        return None
    try:
        v = float(mine[key])
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 < v <= 60):
        raise QuietError(f"option {key} must be more than 0 and at most 60 seconds (got {mine[key]})", EXIT_USAGE)
    return v


def main(argv: list[str] | None = None) -> None:
    p = build_parser("rmemfs-standby", __doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="the source host's exporter, HOST[:PORT]")
    p.add_argument("--transport", choices=("auto", "verbs", "software"), default="auto")
    args = p.parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.log if args.log else None)
        mine, rest = take_options(args.options, STANDBY_KEYS)
        watch_interval = _seconds(mine, "watch_interval") or DEFAULT_WATCH_INTERVAL
        dead_after = _seconds(mine, "dead_after")
        hung_after = _seconds(mine, "hung_after")
        opts = parse_options([",".join(rest)] if rest else [])
        check_environment()
        mountpoint = args.mountpoint.absolute()
        check_mountpoint(mountpoint)
        backend_path = args.backend
        backend, fsid, manifest = read_backend(backend_path, opts)
        try:
            secret = backend.secret()
        except (BackendError, CorruptionError) as e:
            raise backend_failed(e) from None
        host, port = parse_source(args.source, manifest, opts.port)
        watcher = Watcher(host=host, port=port, fsid=fsid, secret=secret, transport=args.transport,
                          watch_interval=watch_interval, dead_after=dead_after or DEFAULT_DEAD_AFTER,
                          hung_after=hung_after or DEFAULT_HUNG_AFTER,
                          fence_cmd=mine.get("fence_cmd"),
                          event_log=Path(mine["event_log"]).absolute() if "event_log" in mine else None,
                          source_stopped=lambda: backend_clean(backend_path, opts.store))
        plan_ahead = PlanAhead(lambda: open_store(backend_path, opts.store))
        metrics = mine.get("metrics")
        if metrics is not None:
            try:
                check_address(metrics)
            except ValueError as e:
                raise QuietError(f"option {e}", EXIT_USAGE) from None

        def work(ready: Any) -> int:
            if args.log:
                setup_logging(args.debug, args.log)
            if metrics is not None:
                try:
                    serve_metrics(metrics, watch_metrics(watcher))
                except OSError as e:
                    raise QuietError(f"cannot serve metrics on {metrics}: {e}", EXIT_USAGE) from None
            # The takeover's exporter, started now: at a takeover it is handed the new region directory
            # instead of the mount waiting for a new interpreter to start.
            prepared = ExporterLaunch.prepared(backend_path, opts)
            try:
                return watch_and_take_over(prepared, ready)
            finally:
                if not prepared.handed:
                    prepared.abort()

        def watch_and_take_over(prepared: ExporterLaunch, ready: Any) -> int:
            try:
                t0 = trio.run(watch, watcher, mountpoint, hung_after, ready, plan_ahead)
            except BaseExceptionGroup as group:   # the watch's own failure (a wrong secret...), out of trio's group
                raise first_of(group, CommandError) or group from None
            if watcher.verdict is None:
                return 0
            st = watcher.status
            log.warning("standby: source %s %s after %.0f ms of heartbeat silence%s; taking over at %s",
                        st.source, "is dead" if watcher.verdict == "dead" else "was fenced by fence_cmd",
                        (st.detected_after or 0) * 1000,
                        {"exit": " (its exporter saw the filesystem process exit)",
                         "stopped": " (its exporter sees the filesystem process stopped)"}.get(st.detected_by or "", ""),
                        mountpoint)
            save_status(mountpoint, {**st.to_json(), "state": "taking-over", "detected_mono": t0})
            if watcher.event_log is not None:
                write_event(watcher.event_log, {"time_ns": time.time_ns(), "event": "taking-over",
                                                "source": st.source, "detected_after": st.detected_after,
                                                "detected_by": st.detected_by})
            rargv = ["--backend", str(backend_path), "--source", f"{host}:{port}", "--transport", args.transport,
                     "--no-liveness-check", "-f", str(mountpoint)]
            if metrics is not None:    # the new owner's filesystem figures join the watch's, on its server
                rest.append(f"metrics={metrics}")
            if rest:
                rargv[0:0] = ["-o", ",".join(rest)]
            if "report" in mine:
                rargv[0:0] = ["--json", str(Path(mine["report"]).absolute())]
            if watcher.verdict == "fenced_by_cmd":
                rargv.insert(0, "--baseline-only")
            if args.log:
                rargv[0:0] = ["--log", str(args.log)]
            if args.debug:
                rargv.insert(0, "--debug")
            # In this process, rmemfs-recover (lazy by default: it mounts before the baseline is all in):
            # it fences, fetches, publishes, mounts and serves until unmounted.
            try:
                recover_cli.main(rargv, prepared, on_mounted=lambda report: watcher.recovery_phases.update(
                    {name: ph.seconds for name, ph in report.phases.items()}), planned=plan_ahead.planned)
            except SystemExit as e:
                return int(e.code or 0)
            return 0

        return daemonize_and_run(args.foreground, work)

    run_main("rmemfs-standby", body)


def backend_clean(backend_path: str, store_options: StoreOptions) -> bool:
    """The backend's manifest says the source unmounted cleanly (unreadable counts as not clean)."""
    try:
        return open_store(backend_path, store_options).read_manifest().state == STATE_CLEAN
    except Exception as e:
        log.debug("reading the backend's state: %s", e)
        return False


def save_status(mountpoint: Path, doc: dict[str, Any]) -> None:
    path = status_file(mountpoint)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


async def watch(watcher: Watcher, mountpoint: Path, hung_after: float | None, ready: Any,
                plan_ahead: PlanAhead | None = None) -> float:
    """Watch until a verdict (or SIGTERM); serve the status socket and keep the baseline's plan fresh
    meanwhile. Returns the monotonic time of the verdict."""
    import signal
    sock = status_socket(mountpoint)
    sock.parent.mkdir(mode=0o700, exist_ok=True)

    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        if req.get("op") != "standby-status":
            return {"ok": False, "error": f"unknown request {req.get('op')!r}"}
        return {"ok": True, "mountpoint": str(mountpoint), "dead_after": watcher.dead_after,
                "hung_after": watcher.hung_after,
                "watch_interval": watcher.watch_interval, **watcher.status.to_json()}

    GC_PAUSES.install()
    favour_the_event_loop()
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, sock, handle)
        await nursery.start(watcher.run)
        if plan_ahead is not None:
            nursery.start_soon(plan_ahead.run)
        if hung_after is None and watcher.status.heartbeat_interval:
            # The default follows the source's own interval: 5 beats, at least DEFAULT_HUNG_AFTER.
            watcher.hung_after = max(DEFAULT_HUNG_AFTER, 5 * watcher.status.heartbeat_interval, watcher.dead_after)
        log.info("standby: watching %s for %s (a stopped source taken over after %.3f s, a silent one after "
                 "%.3f s, every %.3f s; state %s)", watcher.status.source, mountpoint, watcher.dead_after,
                 watcher.hung_after, watcher.watch_interval, watcher.status.state)
        ready("")
        notify(f"READY=1\nSTATUS=watching {watcher.status.source} ({watcher.status.state})")

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as rx:
                async for _ in rx:
                    log.info("standby: stopping")
                    watcher.stop()
                    return

        nursery.start_soon(signals)
        await watcher.finished.wait()
        nursery.cancel_scope.cancel()
    try:
        sock.unlink()
    except FileNotFoundError:
        pass
    return time.monotonic()


if __name__ == "__main__":
    main()
    sys.exit(0)
