"""Recovery: rebuild a failed host's filesystem from the baseline plus its dirty pages, read remotely.

The order (US11436112B1; the patent's claim 7 for the list order):

1. connect to the source's exporter and do the registration handshake: it
   registers the filesystem's regions and the dirty-list region and returns
   their descriptions (a catalog); read the ctl header. Meanwhile the
   baseline's segment indexes are read and its load is planned (``loader``),
   and the exporter of the new region directory starts (its interpreter
   start-up overlaps the wait);
2. confirm the source is dead (its heartbeat has not moved for 2.5 of its own
   intervals): a live source is refused before anything touches it;
3. fence the source for the new epoch through its exporter (``fencing``):
   from then on it acknowledges nothing that is not in what is read below;
   then re-read the manifest (the base generation: a flush may have published
   one after the first read; the load is planned again if so);
4. read both dirty lists and check that the memory belongs to the published
   epoch; allocate new regions shaped like the source's;
5. load the latest baseline generation, verifying every page's checksum, and
   read every listed page over the transport, the list that was being flushed
   first and the current list last (a page both name is read once: the
   source is fenced). Each fetched page must land after the baseline's copy
   of it: long dirty runs are cut out of the load and fetched beside it; a
   scattered dirty page is loaded with its neighbours (cutting it out would
   cost a read and a write per gap) and fetched over it as soon as the span
   of the load that writes it is in. Contiguous pages are coalesced into one
   read, many reads are in flight, and fetched pages go through registered
   bounce buffers into the region files. Pages whose baseline copy was
   corrupt are then read from the source;
6. replay the journal and check the namespace;
7. (the caller) publish a new generation under a new epoch, mount, then
   flush the fetched pages into a baseline.

Which awaits break atomicity: none matters here, as nothing else touches the
new regions until the mount; the load and the fetch share them, ordered by
``SpanCounter`` (a fetched page is written only after its span is in).

The recovery logic sees only the transport interface (``transport.base``).
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from collections.abc import Callable

import trio

from . import PAGE_SIZE, faults
from .core import Filesystem
from .dirty import CtlHeader, ListFull, list_bytes, list_offset, merge_runs, parse_entries, parse_list_count
from .errors import (AuthFailed, BackendError, BackendFailed, CapacityExceeded, CorruptionError, EpochMismatch,
                     FenceFailed, NamespaceInconsistent, RecoveryError, RegionsFailed, SourceAlive, SourceFsidMismatch,
                     SourceUnreachable, TransportFailed, VerifyFailed, backend_failed)
from .exporter import exporter_alive
from .fencing import FenceRefused, request_fence, run_fence_cmd
from .loader import LoadPlan, LoadResult, RegionWriter, plan_load, region_file_writer
from .opening import Opened, fresh_regions, read_backend
from .options import MountOptions
from .pagemap import PageMaps, Run
from .regions import CTL_REGION_ID, META_REGION_ID, RegionSet
from .secure import private_dir
from .sources.base import FallbackSource, PageFailure, PageSource
from .sources.baseline import BaselineSource
from .sources.lazy import LazyLoader, Residency
from .sources.remote import RemoteSource, read_exact, read_source_header
from .store import BaselineStore, Manifest
from .transport import load as load_transport, resolve
from .transport.base import (AuthError, Catalog, ConnectError, Connection, FsidMismatch, RegionRole,
                             TransportError, TransportUnavailable)

log = logging.getLogger(__name__)


FETCH_BUFFER_BYTES = 8 << 20  # one bounce buffer of fetched pages
FETCH_BUFFERS = 3             # being read into, and being written out
SKIP_LOAD_PAGES = 64          # dirty runs this long are cut out of the baseline load


@dataclass
class Phase:
    seconds: float = 0.0
    bytes: int = 0
    pages: int = 0


@dataclass
class RecoveryReport:
    fsid: str = ""
    source: str = ""
    transport: str = ""
    baseline_generation: int = 0
    baseline_time_ns: int = 0
    new_epoch: int = 0
    files: int = 0
    directories: int = 0
    baseline_bytes: int = 0
    baseline_pages: int = 0
    dirty_pages_listed: dict[str, int] = field(default_factory=dict)
    dirty_pages_fetched: int = 0
    dirty_bytes_fetched: int = 0
    corrupt_baseline_pages: int = 0
    rejected_entries: list[str] = field(default_factory=list)
    phases: dict[str, Phase] = field(default_factory=dict)
    baseline_only: bool = False
    dry_run: bool = False
    verified_pages: int = 0
    total_seconds: float = 0.0
    load: str = "eager"                    # "lazy": data pages come in after the mount (background_load)
    time_to_mount_s: float | None = None   # from the start of the recovery to a usable mount
    background_load: dict[str, Any] = field(default_factory=dict)   # the lazy load's figures (LazyLoader.stats)

    def phase(self, name: str) -> Phase:
        return self.phases.setdefault(name, Phase())

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for name, ph in self.phases.items():
            doc["phases"][name]["throughput_MiBps"] = (ph.bytes / ph.seconds / (1 << 20)) if ph.seconds else None
        return doc

    def summary(self) -> str:
        lines = [f"recovered filesystem {self.fsid} from {self.source or 'the baseline alone'}"
                 f" ({self.transport or 'no transport'})",
                 f"  files: {self.files}, directories: {self.directories}",
                 f"  baseline: generation {self.baseline_generation} of "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.baseline_time_ns / 1e9))}, "
                 f"{self.baseline_bytes / (1 << 20):.1f} MiB ({self.baseline_pages} pages)",
                 "  dirty pages listed: " + ", ".join(f"{k} {v}" for k, v in self.dirty_pages_listed.items()),
                 f"  dirty pages fetched from the source: {self.dirty_pages_fetched} "
                 f"({self.dirty_bytes_fetched / (1 << 20):.1f} MiB)"]
        if self.corrupt_baseline_pages:
            lines.append(f"  corrupt baseline pages replaced from the source: {self.corrupt_baseline_pages}")
        for r in self.rejected_entries:
            lines.append(f"  rejected dirty-list entry: {r}")
        for name, ph in self.phases.items():
            rate = f", {ph.bytes / ph.seconds / (1 << 20):.0f} MiB/s" if ph.seconds and ph.bytes else ""
            lines.append(f"  {name:<16} {ph.seconds * 1000:9.1f} ms{rate}")
        lines.append(f"  total            {self.total_seconds * 1000:9.1f} ms")
        if self.load == "lazy":
            pages = self.background_load.get("total_pages", 0)
            lines.append(f"  lazy: mounted first; {pages} baseline pages ({pages * PAGE_SIZE / (1 << 20):.1f} MiB) "
                         "load in the background")
        if self.baseline_only:
            lines.append("  WARNING: baseline only: writes after this generation could not be fetched")
        return "\n".join(lines)


class SpanCounter:
    """How many spans of the baseline load are in the regions; tasks wait for it to pass a mark."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = trio.Event()

    def set(self, value: int) -> None:
        self.value = max(self.value, value)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_above(self, mark: int) -> None:
        while self.value <= mark:
            await self._changed.wait()


@dataclass(frozen=True)
class ProgressEvent:
    """How far one phase of the rebuild is ("baseline", "dirty pages", "corrupt pages")."""
    label: str
    bytes: int
    pages: int
    total_bytes: int
    total_pages: int
    done: bool = False


ProgressCallback = Callable[[ProgressEvent], None]
"""Called for every step of progress, also from the recovery's worker threads: keep it cheap and thread-safe."""


class Progress:
    """Counts one phase's bytes and pages and reports each step to the caller's callback (if any)."""

    def __init__(self, label: str, total_bytes: int, total_pages: int, on_progress: ProgressCallback | None) -> None:
        self.label, self.total_bytes, self.total_pages = label, max(total_bytes, 1), total_pages
        self.on_progress = on_progress
        self.bytes = self.pages = 0

    def update(self, nbytes: int, npages: int | None = None) -> None:
        self.bytes += nbytes
        self.pages += npages if npages is not None else nbytes // PAGE_SIZE
        if self.on_progress:
            self.on_progress(ProgressEvent(self.label, self.bytes, self.pages, self.total_bytes, self.total_pages))

    def done(self) -> None:
        if self.on_progress:
            self.on_progress(ProgressEvent(self.label, self.bytes, self.pages, self.total_bytes, self.total_pages,
                                           done=True))


@dataclass
class SourceState:
    conn: Connection
    catalog: Catalog
    header: CtlHeader
    lists: dict[str, list[Run]]     # "flushing", "current" -> runs, in apply order
    liveness_deadline: float | None = None           # when to re-read the heartbeat


def parse_source(text: str, manifest: Manifest, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and "]" not in port:
        return host.strip("[]"), int(port)
    return text.strip("[]"), int(manifest.owner.get("exporter_port") or default_port)


async def connect_source(transport: str, host: str, port: int, fsid: str, secret: bytes,
                         timeout: float) -> tuple[Connection, Catalog]:
    name = resolve(transport)
    module = load_transport(name)
    conn = await module.connect(host, port, fsid=fsid, secret=secret, timeout=timeout)
    catalog = await conn.register()
    if catalog.fsid != fsid:
        await conn.aclose()
        raise SourceFsidMismatch(f"source {host}:{port} exports filesystem {catalog.fsid}, the backend holds {fsid}")
    return conn, catalog


async def read_source_state(conn: Connection, catalog: Catalog, report: RecoveryReport) -> SourceState:
    """Read the ctl header and both dirty lists; reject entries that name pages outside their region."""
    ctl = catalog.by_id(CTL_REGION_ID)
    header = await read_source_header(conn, catalog)
    lists: dict[str, list[Run]] = {}
    sizes = {r.region_id: r.length // PAGE_SIZE for r in catalog.regions if r.role is not RegionRole.CTL}
    for label, index in (("flushing", header.flushing), ("current", header.active)):
        off = list_offset(index, header.capacity)
        if off + list_bytes(header.capacity) > ctl.length:
            raise CorruptionError(f"dirty list {index} lies outside the ctl region ({ctl.length} bytes)")
        count = parse_list_count(await read_exact(conn, ctl, off, PAGE_SIZE), header.capacity)
        raw = await read_exact(conn, ctl, off + PAGE_SIZE, count * 8) if count else bytearray()
        runs = parse_entries(raw, ordered=True)
        bad = [i for i, (region_id, first, n) in enumerate(runs) if first + n > sizes.get(region_id, 0)]
        for i in bad:
            region_id, first, n = runs[i]
            pages = sizes.get(region_id)
            what = ("region does not exist" if pages is None else f"region has {pages} pages")
            msg = f"{label} list entry {i}: region {region_id} pages {first}..{first + n - 1} ({what})"
            log.warning("rejected dirty-list entry: %s", msg)
            report.rejected_entries.append(msg)
        if bad:
            rejected = set(bad)
            runs = [run for i, run in enumerate(runs) if i not in rejected]
        lists[label] = merge_runs(runs, ordered=True)    # rejecting entries kept the order
        report.dirty_pages_listed[label] = sum(n for _, _, n in lists[label])
    return SourceState(conn, catalog, header, lists)


async def check_source_dead(state: SourceState) -> None:
    """Refuse to take over a filesystem whose heartbeat still advances."""
    if state.liveness_deadline is None:
        return
    await trio.sleep(max(0.0, state.liveness_deadline - time.monotonic()))
    first = state.header
    try:
        again = await read_source_header(state.conn, state.catalog)
    except (TransportError, CorruptionError) as e:
        raise TransportFailed(f"re-reading the source's heartbeat: {e}") from None
    if again.heartbeat != first.heartbeat:
        raise SourceAlive(f"the source filesystem is alive (heartbeat {first.heartbeat} -> {again.heartbeat}, "
                          f"pid {again.pid}): unmount it, or stop it, before recovering")


def fetch_plan(state: SourceState, extra: list[Run]) -> tuple[list[Run], PageMaps]:
    """Runs to read, in apply order: flushing list, then current list, then corrupt baseline pages; and
    the pages they name (one byte per page of each region they touch).

    A page already read earlier is not read again: the source is fenced, so a
    second read would return the same bytes.
    """
    seen = PageMaps()
    plan: list[Run] = []
    pages = {r.region_id: r.length // PAGE_SIZE for r in state.catalog.regions}
    for runs in (state.lists.get("flushing", []), state.lists.get("current", []), merge_runs(extra)):
        for region_id, first, n in runs:
            plan += seen.claim(region_id, first, n, pages[region_id])
    return plan, seen


async def recover(backend_path: Path, source: str | None, opts: MountOptions, *, transport: str = "auto",
                  timeout: float = 10.0, dry_run: bool = False, verify: bool = False, baseline_only: bool = False,
                  check_alive: bool = True, on_progress: ProgressCallback | None = None, report: RecoveryReport | None = None,
                  regions_ready: Callable[[Path, str], None] | None = None,
                  region_dir_made: Callable[[Path, str], None] | None = None,
                  fence_cmd: str | None = None, load: str = "eager", planned: tuple[int, LoadPlan] | None = None
                  ) -> tuple[Opened | None, RecoveryReport]:
    """Steps 1-7. Returns the rebuilt filesystem (None for a dry run) and the report.

    An unreachable source is never taken over silently: it needs ``baseline_only`` (the operator accepts the
    loss window) or a ``fence_cmd`` that exits 0 (the source is powered off or cut off); a failing fence_cmd
    raises FenceFailed.

    ``region_dir_made(region dir, fsid)`` is called once the new region directory is chosen and exists (a
    failed recovery removes it), ``regions_ready(region dir, fsid)`` once its new region files are in place
    (to hand them to the exporter: one started before would map the old files that making them unlinks,
    and serve those).

    ``load="lazy"``: only the namespace region and the dirty pages are in when this returns; the returned
    ``Opened.background`` loads the rest of the baseline once the filesystem serves (``BackgroundLoad``).

    ``planned``: the baseline's load plan made ahead, with its generation (planned again if another is due).
    """

    report = report or RecoveryReport(dry_run=dry_run, baseline_only=baseline_only)
    t_total = time.monotonic()
    backend, fsid, manifest = read_backend(backend_path, opts)
    try:
        secret = backend.secret()
    except (BackendError, CorruptionError) as e:
        raise backend_failed(e) from None
    report.fsid = fsid
    report.baseline_generation, report.baseline_time_ns = manifest.generation, manifest.time_ns
    state: SourceState | None = None
    planner = _Planner(backend, report, planned)
    region_dir: Path | None = None
    if not dry_run:
        # The new regions' exporter starts now, so that its start-up overlaps waiting for the source;
        # the region files are created once the source's catalog gives their shape.
        region_dir = _recovery_region_dir(opts, fsid, manifest.epoch + 1)
        try:
            private_dir(region_dir)
        except OSError as e:
            raise RegionsFailed(f"cannot create the region directory {region_dir}: {e}") from None
        if region_dir_made:
            region_dir_made(region_dir, fsid)

    def reconnect(write: RegionWriter) -> PageSource:
        # The fenced source, for baseline pages the store cannot deliver during a lazy load; connected
        # when first needed, from the serving process.
        host, _, port = report.source.rpartition(":")
        return ReconnectingSource(transport, host, int(port), fsid, secret, timeout, write)

    # 1-2: the source's catalog and header, while the baseline's indexes are read and its load planned (until
    # _rebuild needs the plan); then the liveness verdict, and only for a dead source the fence, the manifest
    # again and the lists.
    try:
        async with trio.open_nursery() as nursery:
            if not dry_run:
                nursery.start_soon(planner.run, manifest)
            try:
                state = await open_source(source, transport, manifest, fsid, opts, secret, timeout, report)
            except SourceUnreachable as e:
                # --baseline-only: a reachable source is still checked and fenced (issue 15 item 5); only an
                # unreachable one is skipped, and only on the operator's word or fence_cmd's.
                if fence_cmd and not baseline_only:
                    host, _, port = report.source.rpartition(":")
                    if not await trio.to_thread.run_sync(run_fence_cmd, fence_cmd, host, int(port), fsid):
                        raise FenceFailed(f"source {report.source} is unreachable and fence_cmd did not confirm "
                                          "it is cut off: not taking it over (it may still acknowledge writes)"
                                          ) from None
                    log.info("fence_cmd confirmed source %s is cut off", report.source)
                    baseline_only = report.baseline_only = True
                elif not baseline_only:
                    raise
                age = max(0.0, time.time() - manifest.time_ns / 1e9)
                log.warning("source unreachable, recovering from the baseline alone (%s): writes the source "
                            "acknowledged after baseline generation %d (published %.0f s ago) are lost",
                            e, manifest.generation, age)
            if state is not None:
                if check_alive and not dry_run:
                    # The source's own interval (in its ctl header), not ours.
                    interval = state.header.heartbeat_interval_us / 1e6 or opts.heartbeat_interval
                    state.liveness_deadline = time.monotonic() + max(2.5 * interval, 1.5)
                    t = time.monotonic()
                    await check_source_dead(state)
                    report.phase("liveness check").seconds = time.monotonic() - t
                if not dry_run:
                    t = time.monotonic()
                    await fence_source(state, manifest.epoch + 1, report)
                    manifest = _reread_manifest(backend, manifest)
                    report.phase("fence").seconds = time.monotonic() - t
                if baseline_only:
                    await state.conn.aclose()
                    state = None
                else:
                    await read_lists(state, fsid, manifest, report)
            # A flush published between our first read and the fence: _rebuild's planner.get plans it again.
            report.baseline_generation, report.baseline_time_ns = manifest.generation, manifest.time_ns
            report.load = load
            return await _rebuild(backend, fsid, manifest, state, planner, region_dir, opts, report,
                                  dry_run=dry_run, verify=verify, on_progress=on_progress, t_total=t_total,
                                  source_again=reconnect if state is not None else None,
                                  regions_ready=regions_ready)
    except BaseExceptionGroup as group:
        raise _first_quiet(group) from None
    finally:
        if state is not None:
            await state.conn.aclose()


def _reread_manifest(backend: BaselineStore, before: Manifest) -> Manifest:
    """The manifest as published after the fence: the takeover must be based on the last generation the
    source published (the store refuses a publish based on a stale one)."""
    try:
        after = backend.read_manifest()
    except (BackendError, CorruptionError) as e:
        raise backend_failed(e) from None
    if after.epoch != before.epoch:
        raise EpochMismatch(f"the backend moved to epoch {after.epoch} during the recovery (it was at {before.epoch}): "
                            f"another host recovered or remounted it")
    return after


async def open_source(source: str | None, transport: str, manifest: Manifest, fsid: str, opts: MountOptions,
                      secret: bytes, timeout: float, report: RecoveryReport) -> SourceState:
    """Connect to the source's exporter, do the handshake and read its ctl header (the heartbeat's first
    sample); the lists are read later by ``read_lists``, after the liveness check and the fence."""
    if not source:
        source = manifest.owner.get("exporter_host") or manifest.owner.get("host")
    host, port = parse_source(source or "", manifest, opts.port)
    report.source = f"{host}:{port}"
    t = time.monotonic()
    try:
        conn, catalog = await connect_source(transport, host, port, fsid, secret, timeout)
    except FsidMismatch as e:
        raise SourceFsidMismatch(str(e)) from None
    except AuthError as e:
        raise AuthFailed(str(e)) from None
    except ConnectError as e:
        raise SourceUnreachable(f"{e}; it cannot be fenced through its exporter: pass -o fence_cmd=CMD (exit 0 "
                                "means the source is powered off or cut off) or --baseline-only (accepts losing "
                                "writes since the last baseline)") from None
    except TransportUnavailable as e:
        raise TransportFailed(str(e)) from None
    except TransportError as e:
        raise TransportFailed(f"source {host}:{port}: {e}") from None
    report.transport = conn.transport
    try:
        header = await read_source_header(conn, catalog)
    except (TransportError, CorruptionError) as e:
        await conn.aclose()
        raise TransportFailed(f"reading the ctl header from {host}:{port}: {e}") from None
    report.phase("connect").seconds = time.monotonic() - t
    return SourceState(conn, catalog, header, {})


async def fence_source(state: SourceState, epoch: int, report: RecoveryReport) -> None:
    """Fence the source for ``epoch``: from the exporter's reply on, it acknowledges no mutation that is not
    in what is read afterwards (the argument is in fencing.py)."""
    try:
        await request_fence(state.conn, epoch)
    except FenceRefused as e:
        raise FenceFailed(f"source {report.source}: cannot fence it for epoch {epoch}: {e}") from None


async def read_lists(state: SourceState, fsid: str, manifest: Manifest, report: RecoveryReport) -> None:
    """Read the header and both dirty lists into ``state`` (after the fence); check whose they are."""
    t = time.monotonic()
    try:
        read = await read_source_state(state.conn, state.catalog, report)
    except (TransportError, CorruptionError) as e:
        raise TransportFailed(f"reading the dirty lists from {report.source}: {e}") from None
    state.header, state.lists = read.header, read.lists
    if state.header.fsid != fsid:
        raise SourceFsidMismatch(f"source's dirty lists belong to filesystem {state.header.fsid}, not {fsid}")
    if state.header.epoch != manifest.epoch:
        raise EpochMismatch(f"the source's memory belongs to epoch {state.header.epoch}, but the backend is at "
                            f"epoch {manifest.epoch}: it was already recovered or remounted elsewhere")
    report.phase("lists").seconds = time.monotonic() - t


async def _rebuild(backend: BaselineStore, fsid: str, manifest: Manifest, state: SourceState | None,
                   planner: _Planner, region_dir: Path | None, opts: MountOptions,
                   report: RecoveryReport, *, dry_run: bool, verify: bool, on_progress: ProgressCallback | None,
                   t_total: float, source_again: Callable[[RegionWriter], PageSource] | None = None,
                   regions_ready: Callable[[Path, str], None] | None = None
                   ) -> tuple[Opened | None, RecoveryReport]:
    if dry_run:
        plan = fetch_plan(state, [])[0] if state else []
        report.dirty_pages_fetched = sum(n for _, _, n in plan)
        report.dirty_bytes_fetched = report.dirty_pages_fetched * PAGE_SIZE
        report.total_seconds = time.monotonic() - t_total
        return None, report

    # 3: new regions, shaped like the source's (it may have grown since the baseline).
    new_epoch = manifest.epoch + 1
    report.new_epoch = new_epoch
    assert region_dir is not None
    shape = dict(manifest.regions)
    if state is not None:
        shape.update({r.region_id: r.length for r in state.catalog.regions if r.role is not RegionRole.CTL})
    try:
        regions = fresh_regions(region_dir, fsid, _shaped(manifest, shape), opts)
    except OSError as e:
        raise RegionsFailed(f"cannot allocate regions in {region_dir}: {e}") from None
    if regions_ready:
        regions_ready(region_dir, fsid)

    # 4-6: the baseline from the backend and the dirty pages from the source, at the same time.
    plan, fetched = fetch_plan(state, []) if state is not None else ([], PageMaps())
    lazy = report.load == "lazy"
    data_ids = [rid for rid in regions.regions if rid not in (CTL_REGION_ID, META_REGION_ID)]
    write = region_file_writer(regions)
    fetcher = Fetcher(state, write, report) if state is not None else None
    if lazy:
        # Before the mount: the namespace region; the data regions' baseline pages come after it. Their dirty
        # pages need no plan (nothing is loaded under them before the mount): fetched while it is made.
        in_data = set(data_ids)
        data_runs = [r for r in plan if r[0] in in_data]
        if fetcher is not None and data_runs:
            pages = sum(n for _, _, n in data_runs)
            await fetcher.fetch(data_runs, Progress("dirty pages", pages * PAGE_SIZE, pages, on_progress))
        base_plan = await planner.get(manifest)
        load_plan = base_plan.cut({rid: bytearray(b"\x01") * regions[rid].pages for rid in data_ids})
        loaded = await _load_and_fetch(backend, load_plan, write, fetcher, [r for r in plan if r[0] not in in_data],
                                       report, on_progress)
    else:
        base_plan = await planner.get(manifest)
        load_plan = base_plan.cut(_long_runs(plan, regions))
        loaded = await _load_and_fetch(backend, load_plan, write, fetcher, plan, report, on_progress)
    corrupt = [(r, p, seg) for r, p, seg in loaded.corrupt if r not in fetched or not fetched[r][p]]
    if corrupt and fetcher is None:
        region_id, page, seg = corrupt[0]
        raise BackendFailed(f"baseline file {backend.describe(seg)} is corrupt (region {region_id} page "
                            f"{page}, {len(corrupt)} pages in all) and the source is not used")
    if corrupt and fetcher is not None:
        refetch = merge_runs([(r, p, 1) for r, p, _ in corrupt])
        await fetcher.fetch(refetch, Progress("corrupt pages", len(corrupt) * PAGE_SIZE, len(corrupt), on_progress),
                            phase="corrupt page fetch")
        plan = plan + refetch
        for region_id, first, n in refetch:      # the plan's map (fetch_plan's) gains these pages
            fetched.mark(region_id, first, n, regions[region_id].pages)

    # Verify the pages as recovered, before step 7: replay may legitimately write to the regions (freeing
    # orphans appends to the journal, zeroing), which re-reading the source would report as a mismatch.
    if verify:
        t = time.monotonic()
        report.verified_pages = await _verify(load_plan, fetcher, plan, regions, fetched)
        report.phase("verify").seconds = time.monotonic() - t

    background: BackgroundLoad | None = None
    residency: Residency | None = None
    if lazy:
        # What the background load writes: the data regions' baseline pages, except those fetched. The plan
        # is not cut by the fetched pages (at 1 % scattered that cut took 0.25 s of a 4 GiB mount): they are
        # resident from the start, and the loader asks the source only for missing pages.
        residency = Residency.missing_only(base_plan.covered, {rid: regions[rid].pages for rid in data_ids},
                                           resident=fetched)
        guarded = residency.guarded(write)
        baseline_source = BaselineSource(backend, base_plan, guarded)
        residency.fill_now = baseline_source.copy_now
        again = source_again(guarded) if source_again is not None else None     # connects on first use
        source: PageSource = FallbackSource(baseline_source, again)
        background = BackgroundLoad(LazyLoader(residency, source, bulk=baseline_source, rate_bytes=opts.load_rate),
                                    baseline_source, report)
        report.background_load = background.loader.stats()

    # 7: namespace; fetched pages go on the new current list so the first flush publishes them.
    t = time.monotonic()
    try:
        fs = Filesystem.load(regions, fsid, new_epoch, fresh_ctl_capacity=opts.dirty_capacity, residency=residency)
    except CorruptionError as e:
        raise NamespaceInconsistent(f"the rebuilt namespace is inconsistent: {e}") from None
    except OSError as e:       # the replay needed a baseline page neither the store nor the source delivered
        raise BackendFailed(f"the rebuilt namespace needs a baseline page that could not be loaded: {e}") from None
    if residency is not None:
        residency.fill_now = None     # from the mount on, a missing page is waited for (NotResident)
    try:
        fs.tracker.mark_runs(plan)
    except ListFull:
        raise CapacityExceeded(f"the {len(plan)} runs of fetched pages do not fit a dirty list of {opts.dirty_capacity} "
                               f"entries: recover again with -o dirty_capacity={2 * len(plan)}") from None
    fs.tracker.enabled = opts.tracking
    report.phase("namespace check").seconds = time.monotonic() - t
    report.files = sum(1 for i in fs.ns.inodes.values() if i.entries is None)
    report.directories = len(fs.ns.inodes) - report.files

    report.total_seconds = time.monotonic() - t_total
    return Opened(backend, manifest, fs, loaded.live, new_epoch, region_dir, "recovered", background), report


class BackgroundLoad:
    """A lazy recovery's load of the remaining baseline pages, run by the serving session once mounted.

    Every request that needs a page not in yet waits for it with priority (``Residency.ensure``); pages
    the store cannot deliver are asked of the fenced source. The new owner's dirty lists hold what it
    fetched from the source and what was written since, never pages loaded from the baseline: those
    are in the store already, so a third host can recover from the store plus this host's lists.
    """

    def __init__(self, loader: LazyLoader, baseline: BaselineSource, report: RecoveryReport) -> None:
        self.loader, self.baseline, self.report = loader, baseline, report
        self.on_complete: Callable[[], None] | None = None   # the serving session: rewrite the JSON report

    async def run(self, fs: Filesystem) -> None:
        try:
            await self.loader.run()
        finally:
            self.baseline.close()
            src = self.loader.source
            if isinstance(src, FallbackSource) and isinstance(src.fallback, ReconnectingSource):
                await src.fallback.aclose()
        fs.residency = None         # every page is in: requests take the plain path again
        self.report.background_load = self.loader.stats()
        if self.on_complete is not None:
            self.on_complete()


class ReconnectingSource:
    """The failed (fenced) source's exporter as a page source, connected on first use (only when the store
    fails a page). While it cannot be connected to, every page fails naming it and the next batch tries
    again. A connection the exporter closed between batches (dropped as idle, or the exporter restarted)
    is seen before the next batch is sent, which then goes over a fresh connection; one that breaks
    during a batch fails that batch (the load retries those pages) and the next connects afresh."""

    def __init__(self, transport: str, host: str, port: int, fsid: str, secret: bytes, timeout: float,
                 write: RegionWriter) -> None:
        self.args = (transport, host, port, fsid, secret, timeout)
        self.where = f"source {host}:{port}"
        self.conn: Connection | None = None
        self.remote: RemoteSource | None = None
        self.write = write
        self._lock = trio.Lock()     # lanes call concurrently: one connection, dropped once

    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        async with self._lock:       # costs no parallelism: RemoteSource reads one batch at a time anyway
            if self.conn is not None and self.conn.peer_closed():
                # Dropped while we held it (the exporter's idle timeout): reconnect now rather than
                # fail this batch and only connect again on the next.
                log.info("%s: the exporter closed the connection; reconnecting", self.where)
                await self.aclose()
            if self.remote is None:
                try:
                    self.conn, catalog = await connect_source(*self.args)
                except (TransportError, RecoveryError) as e:
                    return [PageFailure(rid, p, self.where, f"unreachable: {e}") for rid, first, n in runs
                            for p in range(first, first + n)]
                self.remote = RemoteSource(self.conn, catalog, self.write, self.where)
            failed = await self.remote.make_resident(runs)
            if self.remote.broken is not None:
                log.info("%s: connection lost (%s); the next batch reconnects", self.where, self.remote.broken)
                await self.aclose()
            return failed

    async def aclose(self) -> None:
        if self.conn is not None:
            await self.conn.aclose()
            self.conn = self.remote = None


class _Planner:
    """The baseline's load plan, made in a worker thread beside the source's catalog, liveness, fence and
    lists (and, for a lazy recovery, beside the data regions' dirty fetch): reading every segment index
    is what outlasts them on a big filesystem."""

    def __init__(self, backend: BaselineStore, report: RecoveryReport,
                 planned: tuple[int, LoadPlan] | None = None) -> None:
        """``planned``: (generation, plan) made ahead (a standby's ``PlanAhead``), used if that generation
        is still the one to load."""
        self.backend, self.report = backend, report
        self.plan: LoadPlan | None = None
        self.generation = -1
        self.done = trio.Event()
        if planned is not None:
            self.generation, self.plan = planned
            self.done.set()
            report.phase("baseline plan")       # in the report as every phase is: 0 s on the recovery's clock

    async def run(self, manifest: Manifest) -> None:
        if self.done.is_set() and self.generation == manifest.generation:
            return                     # planned ahead
        t = time.monotonic()
        try:
            self.plan = await trio.to_thread.run_sync(plan_load, self.backend, manifest)
        except (BackendError, CorruptionError) as e:     # a cluster that stopped answering is 16, not 1
            raise backend_failed(e) from None
        self.generation = manifest.generation
        self.report.phase("baseline plan").seconds += time.monotonic() - t
        self.done.set()

    async def get(self, manifest: Manifest) -> LoadPlan:
        """The plan of ``manifest``'s generation (planned again if a flush published a newer one meanwhile)."""
        await self.done.wait()
        if self.generation != manifest.generation:
            self.done = trio.Event()
            await self.run(manifest)
        assert self.plan is not None
        return self.plan


async def _load_and_fetch(backend: BaselineStore, load_plan: LoadPlan, write: RegionWriter, fetcher: Fetcher | None,
                          plan: list[Run], report: RecoveryReport,
                          on_progress: ProgressCallback | None) -> LoadResult:
    """Copy the baseline into the regions while the planned pages are fetched over it.

    Long dirty runs were cut out of ``load_plan``, so they are fetched beside the load. A scattered
    dirty page is loaded with its neighbours (cutting it out would cost a read and a write per gap)
    and fetched over its baseline copy as soon as the span of the load that writes it is in.
    """
    t_load = time.monotonic()
    bar = Progress("baseline", load_plan.bytes, load_plan.bytes // PAGE_SIZE, on_progress)
    fetch_pages = sum(n for _, _, n in plan)
    fetch_bar = Progress("dirty pages", fetch_pages * PAGE_SIZE, fetch_pages, on_progress)
    copied = SpanCounter()
    holder: list[LoadResult] = []

    async def load() -> None:
        token = trio.lowlevel.current_trio_token()
        faults.point("recover.load")
        source = BaselineSource(backend, load_plan, write)
        try:
            holder.append(await trio.to_thread.run_sync(lambda: source.load(
                lambda b, p: bar.update(b, p), spans_done=lambda n: token.run_sync_soon(copied.set, n))))
        except (BackendError, CorruptionError) as e:     # a cluster that stopped answering is 16, not 1
            raise backend_failed(e) from None
        finally:
            source.close()
        copied.set(len(load_plan.spans))
        bar.done()
        ph = report.phase("baseline load")
        ph.seconds = time.monotonic() - t_load
        ph.bytes = holder[0].bytes
        ph.pages = ph.bytes // PAGE_SIZE

    async def fetch(fetcher: Fetcher) -> None:
        beside_load, over_load = load_plan.split_covered(plan)
        await fetcher.fetch(beside_load, fetch_bar)
        needs = [need for need, _ in over_load]
        start = 0
        while start < len(over_load):
            await copied.wait_above(needs[start] - 1)
            end = bisect.bisect_right(needs, copied.value, start)
            await fetcher.fetch([run for _, run in over_load[start:end]], fetch_bar)
            start = end
        fetch_bar.done()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            if fetcher is not None:
                nursery.start_soon(fetch, fetcher)
    except BaseExceptionGroup as group:
        raise _first_quiet(group) from None
    loaded = holder[0]
    report.baseline_bytes, report.baseline_pages = loaded.bytes, loaded.bytes // PAGE_SIZE
    report.corrupt_baseline_pages = len(loaded.corrupt)
    return loaded


class Fetcher:
    """The dirty pages' fetch of a recovery: the source as a page source (``RemoteSource``, with a few
    bounce buffers so a batch is written while the next is read), where any page not delivered fails
    the recovery, and each fetch is timed into the report."""

    def __init__(self, state: SourceState, write: RegionWriter, report: RecoveryReport) -> None:
        self.report = report
        self.remote = RemoteSource(state.conn, state.catalog, write, f"source {report.source}",
                                   buffers=FETCH_BUFFERS, buffer_bytes=FETCH_BUFFER_BYTES)

    async def fetch(self, plan: list[Run], bar: Progress, phase: str = "page fetch") -> None:
        t = time.monotonic()
        nbytes = sum(n for _, _, n in plan) * PAGE_SIZE
        failed = await self.remote.make_resident(plan, progress=lambda b: bar.update(b))
        if failed:
            f = failed[0]
            raise TransportFailed(f"reading dirty pages from {self.report.source}: region {f.region_id} page "
                                  f"{f.page}: {f.why}")
        ph = self.report.phase(phase)
        ph.seconds += time.monotonic() - t
        ph.bytes += nbytes
        ph.pages += nbytes // PAGE_SIZE
        self.report.dirty_pages_fetched += nbytes // PAGE_SIZE
        self.report.dirty_bytes_fetched += nbytes

    async def compare(self, plan: list[Run], regions: RegionSet) -> int:
        """Re-read the plan's pages from the source and compare them with the rebuilt regions; returns the
        pages checked, raises VerifyFailed at the first mismatch."""
        try:
            return await self.remote.compare(plan, lambda rid: regions[rid].view)
        except TransportError as e:
            raise TransportFailed(f"verify: re-reading pages from {self.report.source}: {e}") from None
        except ValueError as e:
            raise VerifyFailed(f"verify: {e}") from None


def _page_marks(runs: list[Run], regions: RegionSet) -> PageMaps:
    """One byte per page of each region, 1 where ``runs`` name the page."""
    marks = PageMaps()
    for region_id, first, n in runs:
        marks.mark(region_id, first, n, regions[region_id].pages)
    return marks


def _long_runs(runs: list[Run], regions: RegionSet) -> PageMaps:
    """Page marks of the runs long enough to be worth cutting out of the baseline load."""
    return _page_marks([r for r in runs if r[2] >= SKIP_LOAD_PAGES], regions)


def _first_quiet(group: BaseExceptionGroup) -> BaseException:
    """The RecoveryError inside a nursery's exception group (else the group's first exception)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_quiet(exc)
        if isinstance(exc, RecoveryError):
            return exc
    return group.exceptions[0]


def _shaped(manifest: Manifest, regions: dict[int, int]) -> Manifest:
    return replace(manifest, regions=regions)


def _recovery_region_dir(opts: MountOptions, fsid: str, epoch: int) -> Path:
    """The configured region directory, unless a live exporter (a local source) still serves it:
    its memory is what we are reading, so the new regions go beside it."""
    chosen = opts.region_dir(fsid)
    if not exporter_alive(chosen):
        return chosen
    return chosen.with_name(f"{chosen.name}.e{epoch}")


async def _verify(load_plan: LoadPlan, fetcher: Fetcher | None, plan: list[Run],
                  regions: RegionSet, fetched: PageMaps) -> int:
    """Re-read every fetched page from the source and every baseline page's checksum; raise on a mismatch."""
    checked = await fetcher.compare(plan, regions) if fetcher is not None and plan else 0
    bad, baseline_pages = load_plan.check_regions(lambda rid: regions[rid].view, exclude=fetched)
    if bad:
        raise VerifyFailed(f"verify: region {bad[0][0]} page {bad[0][1]} does not match the baseline "
                           f"({len(bad)} pages in all)")
    return checked + baseline_pages


def write_report(path: Path, report: RecoveryReport) -> None:
    """Atomically: a lazy recovery's report is rewritten while a reader may be looking."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    os.replace(tmp, path)


