"""rmemfs-recover: rebuild a failed host's filesystem from the baseline plus its dirty pages, then mount it.

Exit codes: 0 recovered and mounted (or dry run done); 1 unexpected error; 2 usage;
10 backend missing, foreign, or a baseline file missing/corrupt (named);
12 mountpoint missing or busy; 13 not root or no /dev/fuse; 14 region directory
unusable; 15 exporter failed; 16 backend unreachable (a RADOS cluster that did not answer in time);
20 source unreachable or timed out (it cannot be fenced: pass
-o fence_cmd=CMD, run with HOST:PORT FSID, exit 0 = powered off or cut off; or --baseline-only);
21 authentication failed (wrong secret); 22 filesystem id mismatch;
23 the source filesystem is still alive; 24 transport unavailable or failed;
25 the source's memory belongs to another epoch (already recovered);
26 the rebuilt namespace is inconsistent; 27 --verify found a mismatch;
28 the fetched pages do not fit the new dirty list (raise -o dirty_capacity);
29 the source's exporter would not fence it, or fence_cmd did not confirm it is cut off (README, fencing).
"""
from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from .. import fs as _fuse_adapter  # noqa: F401  (loads pyfuse3 at start-up, not on the recovery's clock)
from .. import PAGE_SIZE
from ..errors import QuietError
from ..exits import EXIT_USAGE
from ..host import check_environment, check_mountpoint
from ..launch import ExporterLaunch
from ..loader import LoadPlan
from ..options import parse_options
from ..exporter import RetireRefused, retire
from ..store import StoreOptions, open_store
from ..recovery import ProgressEvent, RecoveryReport, recover, write_report
from .common import run_main, setup_logging, take_options
from .mount import Ready, build_parser, daemon_log, daemonize_and_run, exporter_log, run_session

log = logging.getLogger(__name__)
MAX_TIMEOUT = 24 * 3600.0


def main(argv: list[str] | None = None, prepared: ExporterLaunch | None = None,
         on_mounted: Callable[[RecoveryReport], None] | None = None,
         planned: tuple[int, LoadPlan] | None = None) -> None:
    """For rmemfs-standby, which runs this in its own process: ``prepared``, an exporter it started ahead
    (``ExporterLaunch.prepared``), used for the new regions instead of starting one when it is still alive;
    ``on_mounted``, called with the report (its phases) once the mount is usable; ``planned``, the baseline's
    load plan it keeps fresh while watching, with its generation."""
    p = build_parser("rmemfs-recover", __doc__.splitlines()[0])
    p.add_argument("--source", help="the failed host's exporter, HOST[:PORT] (default: the owner the backend "
                   "names, at its recorded port)")
    p.add_argument("--transport", choices=("auto", "verbs", "software"), default="auto",
                   help="auto picks verbs when an RDMA device is present (default auto)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the summary as JSON to FILE")
    p.add_argument("--dry-run", action="store_true", help="connect, read the dirty lists, report; mount nothing")
    p.add_argument("--verify", action="store_true", help="re-read and check every recovered page after the rebuild")
    p.add_argument("--baseline-only", action="store_true",
                   help="recover from the baseline alone when the source is gone (loses later writes)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the source (default 10)")
    p.add_argument("--load", choices=("lazy", "eager"), default="lazy",
                   help="lazy (default): mount once the namespace and the dirty pages are in, and load the "
                   "baseline's other pages in the background, each on demand first; eager: load everything, "
                   "then mount")
    p.add_argument("--no-liveness-check", action="store_true",
                   help="skip waiting to see that the source's heartbeat has stopped")
    args = p.parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.log if args.log and args.foreground else None, quiet=not args.debug)
        mine, mount_options = take_options(args.options, ("fence_cmd",))
        fence_cmd = mine.get("fence_cmd")
        opts = parse_options(mount_options)
        if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT):
            raise QuietError(f"--timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds "
                             f"(got {args.timeout})", EXIT_USAGE)
        mountpoint = args.mountpoint.absolute()
        if not args.dry_run:
            check_environment()
            check_mountpoint(mountpoint)
        report = RecoveryReport(dry_run=args.dry_run, baseline_only=args.baseline_only)
        # The new exporter's interpreter starts now, beside the connect and the liveness wait, and gets its
        # region directory once it exists: a lazy mount no longer waits for a Python start-up (issue 11).
        ahead = prepared if prepared is not None or args.dry_run else ExporterLaunch.prepared(args.backend, opts)
        launched: list[ExporterLaunch] = []
        new_dirs: list[Path] = []     # beside a local source's: ours to remove if the recovery fails

        def region_dir_made(region_dir: Path, fsid: str) -> None:
            if region_dir.name != opts.region_dir(fsid).name:
                new_dirs.append(region_dir)
                if "port=" not in ",".join(args.options):
                    opts.port = 0    # a local source's exporter still holds the default port

        def start_exporter(region_dir: Path, fsid: str) -> None:
            # Once the new region files exist; the prepared exporter's start-up overlapped the rest.
            log_file = exporter_log(daemon_log(args, region_dir))
            if ahead is not None:
                try:
                    ahead.hand(region_dir, opts, log_file)
                    launched.append(ahead)
                    return
                except OSError as e:     # it died meanwhile (while the standby watched): start one now
                    log.info("the prepared exporter is gone (%s, exit %s); starting one", e, ahead.proc.poll())
            launched.append(ExporterLaunch(region_dir, args.backend, fsid, opts, log_file))

        try:
            # recover() takes a Path; a rados: spec passes through Path() unchanged (backend_spec
            # normalised its slashes), and recover() gives it to mount.read_backend with opts.store.
            opened, report = trio.run(lambda: recover(
                Path(args.backend), args.source, opts, transport=args.transport, timeout=args.timeout,
                dry_run=args.dry_run, verify=args.verify, baseline_only=args.baseline_only,
                check_alive=not args.no_liveness_check, fence_cmd=fence_cmd, load=args.load, planned=planned,
                on_progress=TerminalProgress() if sys.stderr.isatty() else None, report=report, regions_ready=start_exporter,
                region_dir_made=region_dir_made))
            t_mount = time.monotonic()
            port = launched[0].ready() if opened is not None else None
            if opened is not None:
                # A part of publish+mount: the new exporter's start-up that the recovery did not hide.
                report.phase("exporter wait").seconds = time.monotonic() - t_mount
        except BaseException:
            for launch in launched:
                launch.abort()
            for region_dir in new_dirs:
                discard_unpublished(args.backend, opts.store, region_dir)
            raise
        finally:
            if ahead is not None and prepared is None and not ahead.handed:
                ahead.abort()            # no regions were made (a failure, a dry run): nothing to serve
        if opened is None:
            print(dry_run_summary(report))
            if args.json:
                write_report(args.json, report)
            return 0
        local_source = opened.region_dir.name != opts.region_dir(opened.fs.fsid).name
        log_file = daemon_log(args, opened.region_dir)

        def finish(note: str) -> None:
            ph = report.phase("publish+mount")
            ph.seconds = float(note) if note else time.monotonic() - t_mount
            report.total_seconds += ph.seconds
            report.time_to_mount_s = report.total_seconds
            print(report.summary(), flush=True)
            if args.json and opened.background is None:   # a lazy one's is written by the serving process
                write_report(args.json, report)

        def retire_old() -> None:
            # The new epoch is published: the old memory on this host is fenced and may go. This runs in
            # the serving daemon, after the mount is reported: a failure here must not end it.
            old = opts.region_dir(opened.fs.fsid)
            try:
                retire(old)
            except RetireRefused as e:      # a live process still uses it (a fenced old mount)
                log.warning("%s; kept it (`rmemfs-ctl orphans --remove` frees it once that is gone)", e)
            except Exception as e:
                log.warning("could not retire the old regions in %s (%s): remove them by hand", old, e)

        bg = opened.background
        json_path = args.json.absolute() if args.json else None
        if bg is not None:
            bar = TerminalProgress() if args.foreground and sys.stderr.isatty() else None
            if bar is not None:
                bg.loader.on_progress = lambda done, total: bar(ProgressEvent(
                    "background", done * PAGE_SIZE, done, total * PAGE_SIZE, total, done >= total))

            def loaded() -> None:
                # The serving process adds the load's figures to the report once it is complete; a local
                # source's pages may be asked for until then (baseline pages the store fails).
                if json_path:
                    write_report(json_path, report)
                if local_source:
                    retire_old()
            bg.on_complete = loaded

        def work(ready: Ready) -> int:
            def mounted() -> None:
                took = time.monotonic() - t_mount
                if bg is not None and json_path:
                    # Written here, in the serving process, which rewrites it when the load completes.
                    report.phase("publish+mount").seconds = took
                    report.time_to_mount_s = report.total_seconds + took
                    report.background_load = bg.loader.stats()
                    write_report(json_path, report)
                ready(f"{took:.6f}")
                if on_mounted is not None:
                    report.phase("publish+mount").seconds = took
                    on_mounted(report)
                if local_source and bg is None:
                    retire_old()

            return run_session(opened, mountpoint, opts, log_file, args.debug, mounted, port)

        return daemonize_and_run(args.foreground, work, on_ready=finish)

    run_main("rmemfs-recover", body)


class TerminalProgress:
    """The recovery's progress as a one-line bar per phase on stderr, with bytes, pages and ETA."""

    def __init__(self) -> None:
        self._start: dict[str, float] = {}
        self._last = 0.0

    def __call__(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        start = self._start.setdefault(ev.label, now)
        if ev.done:
            sys.stderr.write("\n")
            return
        if now - self._last <= 0.1 and ev.bytes < ev.total_bytes:
            return
        self._last = now
        frac = min(1.0, ev.bytes / ev.total_bytes)
        elapsed = now - start
        eta = elapsed / frac - elapsed if frac > 0 else 0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{ev.label:<14} [{bar:<30}] {frac * 100:5.1f}% "
                         f"{ev.bytes / (1 << 20):8.1f}/{ev.total_bytes / (1 << 20):.1f} MiB "
                         f"{ev.pages}/{ev.total_pages} pages ETA {eta:4.1f}s ")
        sys.stderr.flush()


def discard_unpublished(backend_path: str, store_options: StoreOptions, region_dir: Path) -> None:
    """Remove a recovery's own ``<dir>.e<epoch>`` region directory after a failure, unless the backend's
    published epoch reached that epoch (then its memory may be the only copy, and it stays)."""
    epoch = region_dir.name.rpartition(".e")[2]
    try:
        published = open_store(backend_path, store_options).read_manifest().epoch
    except Exception as e:      # cannot tell: keep it, and say so
        log.warning("kept %s: the backend's epoch is unreadable (%s)", region_dir, e)
        return
    if not epoch.isdigit() or published >= int(epoch):
        return
    shutil.rmtree(region_dir, ignore_errors=True)


def dry_run_summary(report: RecoveryReport) -> str:
    lists = ", ".join(f"{k}: {v} pages" for k, v in report.dirty_pages_listed.items())
    lines = [f"dry run: filesystem {report.fsid}, source {report.source} ({report.transport})",
             f"  baseline generation {report.baseline_generation}",
             f"  dirty lists: {lists}",
             f"  would fetch {report.dirty_pages_fetched} pages ({report.dirty_bytes_fetched / (1 << 20):.1f} MiB)"]
    lines += [f"  rejected dirty-list entry: {r}" for r in report.rejected_entries]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
