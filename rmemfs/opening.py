"""Opening a backend for a mount: everything before FUSE and the exporter.

``open_backend`` decides how a mount starts:

* empty backend: create a filesystem (id, secret, generation 0);
* clean backend whose region files are still there and match the published
  generation: reuse them as they are (fast);
* clean backend otherwise (a reboot emptied /dev/shm): load the baseline;
* backend whose owner died uncleanly: refuse, naming ``rmemfs-recover``.

``read_backend`` (identity, manifest and secret, checked) and ``fresh_regions`` (empty region files
shaped like a manifest's) are shared with recovery and the standby.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .core import Filesystem
from .dirty import read_ctl_header
from .errors import (BackendError, BackendFailed, BackendUnclean, CorruptionError, FsError, RegionsFailed,
                     backend_failed)
from .exporter import DEFAULT_PORT, exporter_alive, stop_exporter
from .loader import live_map, region_file_writer
from .sources.baseline import load_baseline
from .options import MountOptions, size_text
from .regions import CTL_REGION_ID, META_REGION_ID, RegionSet, check_region_directory, parse_region_file_name
from .secure import private_dir
from .store import STATE_CLEAN, BaselineStore, LiveMap, Manifest, open_store

if TYPE_CHECKING:
    from .recovery import BackgroundLoad

log = logging.getLogger(__name__)


@dataclass
class Opened:
    backend: BaselineStore
    manifest: Manifest          # as published before this mount
    fs: Filesystem
    live: LiveMap
    epoch: int
    region_dir: Path
    how: str                    # "new", "regions", "baseline", "recovered"
    background: BackgroundLoad | None = None    # a lazy recovery's load, still to run once mounted


def read_backend(backend_path: str | os.PathLike[str], opts: MountOptions,
                 backend: BaselineStore | None = None) -> tuple[BaselineStore, str, Manifest]:
    try:
        backend = backend or open_store(backend_path, opts.store)
        backend.check_usable()
        fsid = backend.fsid()
        manifest = backend.read_manifest()
        backend.secret()        # checked here: the exporter needs it, and would fail later with another code
    except (BackendError, CorruptionError) as e:
        raise backend_failed(e) from None
    if opts.fsid and opts.fsid != fsid:
        raise BackendFailed(f"backend {backend_path} holds filesystem {fsid}, not {opts.fsid}")
    return backend, fsid, manifest


def refuse_unclean(backend_path: str | os.PathLike[str], manifest: Manifest, mountpoint: Path) -> None:
    owner = manifest.owner
    host = owner.get("host", "?")
    if host == socket.gethostname() and _pid_alive(owner.get("pid", 0)):
        raise BackendUnclean(f"backend {backend_path} is in use by rmemfs pid {owner['pid']} on this host "
                             f"(mounted at {owner.get('mountpoint', '?')})")
    source = owner.get("exporter_host") or host
    raise BackendUnclean(
        f"backend {backend_path} was not unmounted cleanly (owner {host} pid {owner.get('pid')}, epoch "
        f"{manifest.epoch}, generation {manifest.generation}): recover it with rmemfs-recover --source "
        f"{source}:{owner.get('exporter_port', DEFAULT_PORT)} --backend {backend_path} {mountpoint}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"rmemfs" in f.read()
    except OSError:
        return False


def open_backend(backend_path: str | os.PathLike[str], opts: MountOptions, mountpoint: Path) -> Opened:
    """Everything before FUSE: returns a filesystem ready to serve (not yet published as ours)."""
    try:
        backend = open_store(backend_path, opts.store)
        backend.check_usable()
        if backend.is_empty():
            backend.create({"dirty_capacity": opts.dirty_capacity, "region_size": opts.region_size},
                           regions={})
    except BackendError as e:
        raise backend_failed(e) from None
    except OSError as e:
        raise BackendFailed(f"cannot create a filesystem in {backend_path}: {e.strerror}") from None
    backend, fsid, manifest = read_backend(backend_path, opts, backend)
    if manifest.state != STATE_CLEAN:
        refuse_unclean(backend_path, manifest, mountpoint)
    region_dir = opts.region_dir(fsid)
    try:
        private_dir(region_dir)   # before anything in it is read, signalled or written
    except OSError as e:
        raise RegionsFailed(f"region directory {region_dir}: {e}") from None
    warn = check_region_directory(region_dir)
    if warn:
        log.warning("%s", warn)
    epoch = manifest.epoch + 1
    if exporter_alive(region_dir):
        log.info("stopping a leftover exporter in %s", region_dir)
        stop_exporter(region_dir)
    try:
        if _regions_match(region_dir, fsid, manifest):
            regions = RegionSet(region_dir, data_region_size=opts.region_size)
            regions.open_existing()
            regions.back_whole(CTL_REGION_ID)
            fs = Filesystem.load(regions, fsid, epoch)
            live, how = live_map(backend, manifest), "regions"
        else:
            regions = fresh_regions(region_dir, fsid, manifest, opts)
            regions.back_whole(CTL_REGION_ID)     # a full tmpfs fails the mount here (exit 14), not a write later
            if manifest.generation == 0:
                fs = Filesystem.format(regions, fsid, epoch, opts.dirty_capacity)
                live, how = LiveMap(), "new"
            else:
                result = load_baseline(backend, manifest, region_file_writer(regions))
                if result.corrupt:
                    region_id, page, seg = result.corrupt[0]
                    raise CorruptionError(f"baseline file {backend.describe(seg)} is corrupt (region "
                                          f"{region_id} page {page} and {len(result.corrupt) - 1} more pages)")
                fs = Filesystem.load(regions, fsid, epoch, fresh_ctl_capacity=opts.dirty_capacity)
                live, how = result.live, "baseline"
    except (BackendError, CorruptionError) as e:     # loading the baseline (a RADOS cluster may time out)
        raise backend_failed(e) from None
    except OSError as e:
        raise RegionsFailed(f"region directory {region_dir}: {e}") from None
    fs.tracker.enabled = opts.tracking
    if "meta_size" in opts.given:
        _resize_journal(fs, opts.meta_size)
    log.info("filesystem %s opened from %s (epoch %d, generation %d)", fsid, how, epoch, manifest.generation)
    return Opened(backend, manifest, fs, live, epoch, region_dir, how)


def _resize_journal(fs: Filesystem, length: int) -> None:
    """``-o meta_size`` at a mount of an existing filesystem: a full journal is made roomier this way."""
    have = fs.regions[META_REGION_ID].length
    if length < have:
        log.warning("-o meta_size=%s is smaller than the namespace journal region (%s), which never shrinks; "
                    "keeping %s", size_text(length), size_text(have), size_text(have))
    elif length > have:
        try:
            fs.grow_journal(length)
        except OSError as e:
            raise RegionsFailed(f"cannot grow the namespace journal region to {size_text(length)}: {e.strerror}") from None
        except FsError as e:     # no memory left in the region directory for the moved checkpoint
            raise RegionsFailed(f"cannot grow the namespace journal region to {size_text(length)}: {e.args[1]}") from None
        log.info("namespace journal region grown from %s to %s", size_text(have), size_text(length))


def _regions_match(region_dir: Path, fsid: str, manifest: Manifest) -> bool:
    """Region files left by a clean unmount of exactly the published generation."""
    try:
        header = read_ctl_header(region_dir)
    except Exception:   # unreadable, short or foreign: not regions we can trust
        return False
    present = RegionSet(region_dir).existing_files()
    wanted = {rid: n for rid, n in manifest.regions.items() if rid != CTL_REGION_ID}
    return (header.fsid == fsid and header.clean_generation == manifest.generation and manifest.generation > 0
            and header.epoch == manifest.epoch
            and all(present.get(rid) == n for rid, n in wanted.items()))


def fresh_regions(region_dir: Path, fsid: str, manifest: Manifest, opts: MountOptions) -> RegionSet:
    """Remove any old region files and create empty ones shaped like the manifest's. (A stale socket
    may stay: the next server to bind that name replaces it.)"""
    if region_dir.is_dir():
        for entry in os.scandir(region_dir):
            if parse_region_file_name(entry.name):
                os.unlink(entry.path)
    region_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    meta = manifest.regions.get(META_REGION_ID, opts.meta_size)
    data = {rid: n for rid, n in manifest.regions.items() if rid not in (CTL_REGION_ID, META_REGION_ID)}
    return Filesystem.create_regions(region_dir, fsid, capacity=opts.dirty_capacity,
                                     data_region_size=opts.region_size, meta_size=meta, extra=data)
