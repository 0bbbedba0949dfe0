"""Bringing a filesystem up from its backend, serving it, and taking it down cleanly.

``open_backend`` decides how a mount starts:

* empty backend: create a filesystem (id, secret, generation 0);
* clean backend whose region files are still there and match the published
  generation: reuse them as they are (fast);
* clean backend otherwise (a reboot emptied /dev/shm): load the baseline;
* backend whose owner died uncleanly: refuse, naming ``rmemfs-recover``.

``serve`` runs the FUSE session with its services (flusher, heartbeat,
control socket) in one trio nursery. On unmount or SIGTERM/SIGINT it writes a
final baseline marked clean and stops the exporter.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterator

import trio

from . import control, faults
from .core import DEFAULT_DIRTY_CAPACITY, Filesystem, RoomWaiter
from .dirty import read_ctl_header
from .errors import (BackendError, BackendFailed, BackendUnclean, BackendUnreachable, CorruptionError, ExporterFailed,
                     FencedError, FsError, HostUnfit, MountpointUnusable, RegionsFailed, StoreUnreachable, UsageError,
                     backend_failed)
from .secure import private_dir
from .exporter import DEFAULT_PORT, exporter_alive, orphans, stop_exporter
from .flusher import Flusher
from .loader import live_map, load, region_file_writer
from .regions import (CTL_REGION_ID, DEFAULT_DATA_REGION_SIZE, META_REGION_ID, META_REGION_SIZE, RegionSet,
                      check_region_directory, parse_region_file_name)
from .exits import EXIT_BACKEND
from .store import (STATE_CLEAN, STATE_MOUNTED, BaselineStore, LiveMap, Manifest, open_store, owner_info,
                    store_argv, store_option, store_option_names)

if TYPE_CHECKING:
    from .recovery import BackgroundLoad

log = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"



@dataclass
class MountOptions:
    """``-o`` options shared by rmemfs and rmemfs-recover."""

    flush_interval: float = 5.0
    regiondir: str = ""
    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    dirty_capacity: int = DEFAULT_DIRTY_CAPACITY
    region_size: int = DEFAULT_DATA_REGION_SIZE
    meta_size: int = META_REGION_SIZE
    heartbeat_interval: float = 0.02   # under a standby's default dead_after with room for stalls (tools/bench_heartbeat.py)
    allow_other: bool = False
    writeback_cache: bool = False
    fsid: str = ""
    tracking: bool = True
    fsname: str = "rmemfs"
    load_rate: float = 0.0             # a lazy recovery's background load limit, bytes/s (0: as fast as it goes)
    metrics: str = ""                  # ADDR:PORT of a Prometheus endpoint (metrics.py)
    extra_fuse: list[str] = field(default_factory=list)
    store: dict[str, str] = field(default_factory=dict)    # the backend's own options (ceph_conf, ceph_id)
    given: set[str] = field(default_factory=set)           # the options named on the command line

    def region_dir(self, fsid: str) -> Path:
        return Path(self.regiondir or f"/dev/shm/rmemfs-{fsid}")


OPTION_HELP: dict[str, str] = {
    "flush_interval": "seconds between incremental baselines (default 5; more than 0, at most 604800)",
    "regiondir": "directory of the region files (default /dev/shm/rmemfs-<fsid>; a DAX mount works too)",
    "listen": "address the exporter serves remote readers on (default 127.0.0.1)",
    "port": f"exporter TCP port (default {DEFAULT_PORT}; 0 picks a free one, recorded in the backend; at most 65535)",
    "dirty_capacity": f"entries per dirty page list (default {DEFAULT_DIRTY_CAPACITY}, 8 bytes each); "
                      "a full list forces a flush; 65536 to 2**27",
    "region_size": "bytes per data region, a multiple of 256K, 1M to 64G (default 256M; suffixes K, M, G, T). Sparse on "
                   "tmpfs, but the verbs transport pins (and so backs) a whole region when it registers it",
    "meta_size": "bytes of the namespace journal region, set when the filesystem is created (default 256M; "
                 "a multiple of 256K, 1M to 64G); given at a later mount, a larger value grows it (it never "
                 "shrinks)",
    "heartbeat_interval": "seconds between heartbeat increments (default 0.02; more than 0, at most 60)",
    "allow_other": "let users other than the mounter access the files (permission checks stay on)",
    "writeback_cache": "let the kernel buffer write() (faster, but write() then acknowledges before the "
                       "data reaches tracked memory; fsync/msync still do)",
    "fsid": "refuse to mount unless the backend holds this filesystem id",
    "tracking": "on|off: dirty page tracking; off only for benchmarks, it makes recovery impossible",
    "metrics": "ADDR:PORT: serve Prometheus metrics (heartbeat, dirty-list entries, flush figures, fencing)",
    "fsname": "name shown in the mount table (default rmemfs)",
    "load_rate": "rmemfs-recover --load lazy: limit the background load to this many bytes/s (suffixes K, M, G; "
                 "default 0, no limit), to leave the store and the network to requests",
    "ceph_conf": "rados: backends: the cluster's ceph.conf (default: librados's lookup, CEPH_CONF, "
                 "/etc/ceph/ceph.conf); its keyring setting says where the key is",
    "ceph_id": "rados: backends: the cephx user, without client. (default admin)",
}


SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``256M``, ``1.5G``, ``1048576``; a value that is not a finite number raises ValueError."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = 1
    if text and text[-1] in SIZE_UNITS:
        text, unit = text[:-1], SIZE_UNITS[text[-1]]
    try:
        return int(text) * unit
    except ValueError:
        value = float(text)       # "1e400" is inf, "nan" is nan: neither is a size
        if not math.isfinite(value):
            raise ValueError("not a finite number") from None
        return int(value * unit)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError("must be on or off")
    return text == "on"


def _text(text: str) -> str:
    if not text:
        raise ValueError("needs a value")
    return text


def _size_text(n: float) -> str:
    for suffix, unit in sorted(SIZE_UNITS.items(), key=lambda kv: -kv[1]):
        if n >= unit and n % unit == 0:
            return f"{int(n // unit)}{suffix}"
    return str(n)


@dataclass(frozen=True)
class OptionSpec:
    """How one ``-o name=value`` option parses and which values it accepts (``lo < value`` when
    ``open_lo``, else ``lo <= value``; ``value <= hi``)."""

    parse: Callable[[str], Any]
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    multiple: int = 0            # the value must be a multiple of this
    flag: bool = False           # takes no value
    show: Callable[[float], str] = str

    def check(self, key: str, value: Any) -> None:
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            raise UsageError(f"-o {key} must be {'more than' if self.open_lo else 'at least'} "
                             f"{self.show(self.lo)} (got {self.show(value)})")
        if self.hi is not None and value > self.hi:
            raise UsageError(f"-o {key} must be at most {self.show(self.hi)} (got {self.show(value)})")
        if self.multiple and value % self.multiple:
            raise UsageError(f"-o {key} must be a multiple of {self.show(self.multiple)}")


def _metrics_address(value: str) -> str:
    from .metrics import check_address
    check_address(value)
    return value


# Upper bounds keep what a mount allocates per option sane: a data region costs a byte per page in the
# dirty tracker's maps (64G: 16 MiB), a dirty list 8 bytes per entry in exported memory (2**27: 1 GiB).
MAX_REGION_SIZE = 64 << 30
MAX_DIRTY_CAPACITY = 1 << 27
MIN_DIRTY_CAPACITY = 4 * (1 << 14)
_SIZE = dict(parse=parse_size, lo=1 << 20, multiple=256 << 10, show=_size_text)

# One line per option: rmemfs and rmemfs-recover accept exactly these.
OPTIONS: dict[str, OptionSpec] = {
    "flush_interval": OptionSpec(_finite, lo=0, open_lo=True, hi=7 * 86400),
    "heartbeat_interval": OptionSpec(_finite, lo=0, open_lo=True, hi=60),
    "port": OptionSpec(int, lo=0, hi=65535),
    "dirty_capacity": OptionSpec(int, lo=MIN_DIRTY_CAPACITY, hi=MAX_DIRTY_CAPACITY),
    "region_size": OptionSpec(**_SIZE, hi=MAX_REGION_SIZE),              # type: ignore[arg-type]
    "meta_size": OptionSpec(**_SIZE, hi=MAX_REGION_SIZE),                # type: ignore[arg-type]
    "regiondir": OptionSpec(_text),
    "listen": OptionSpec(_text),
    "fsid": OptionSpec(_text),
    "fsname": OptionSpec(_text),
    "allow_other": OptionSpec(bool, flag=True),
    "writeback_cache": OptionSpec(bool, flag=True),
    "tracking": OptionSpec(_on_off),
    "load_rate": OptionSpec(parse_size, lo=0, hi=1 << 40, show=_size_text),
    "metrics": OptionSpec(_metrics_address),
}
FUSE_FLAGS = ("ro", "rw", "default_permissions", "noatime", "nosuid", "nodev", "dev", "suid")


def parse_options(items: list[str]) -> MountOptions:
    """Parse ``-o`` items; any bad one is a usage error (exit 2) naming the option and its bound."""
    opts = MountOptions()
    store_names = store_option_names()
    for item in ",".join(items).split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        if key in store_names:
            opts.store[key] = store_option(key, value)
            continue
        if key in FUSE_FLAGS:
            opts.extra_fuse.append(key)
            continue
        spec = OPTIONS.get(key)
        if spec is None:
            raise UsageError(f"unknown mount option {key!r}; see --help")
        if spec.flag:
            setattr(opts, key, True)
            continue
        try:
            parsed = spec.parse(value)
        except (ValueError, OverflowError) as e:
            raise UsageError(f"bad value for -o {key}: {value!r} ({e})") from None
        spec.check(key, parsed)
        setattr(opts, key, parsed)
        opts.given.add(key)
    return opts


# --- environment checks ------------------------------------------------------

def check_environment() -> None:
    if os.geteuid() != 0:
        raise HostUnfit("rmemfs must run as root (it mounts FUSE and maps shared memory regions)")
    if not os.path.exists("/dev/fuse"):
        raise HostUnfit("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE exists")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise HostUnfit(f"/dev/fuse cannot be opened: {e.strerror}") from None


def check_mountpoint(path: Path) -> None:
    if not path.exists():
        # A dead FUSE mount (ENOTCONN) also looks missing; say how to clear it.
        if is_mounted(path):
            raise MountpointUnusable(f"mountpoint {path} holds a dead mount: run fusermount3 -u -z {path}")
        raise MountpointUnusable(f"mountpoint {path} does not exist: create it first")
    if not path.is_dir():
        raise MountpointUnusable(f"mountpoint {path} is not a directory")
    if is_mounted(path):
        raise MountpointUnusable(f"mountpoint {path} is busy: something is already mounted there")


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


# --- opening a backend ---------------------------------------------------------

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
                result = load(backend, manifest, region_file_writer(regions))
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
                    "keeping %s", _size_text(length), _size_text(have), _size_text(have))
    elif length > have:
        try:
            fs.grow_journal(length)
        except OSError as e:
            raise RegionsFailed(f"cannot grow the namespace journal region to {_size_text(length)}: {e.strerror}") from None
        except FsError as e:     # no memory left in the region directory for the moved checkpoint
            raise RegionsFailed(f"cannot grow the namespace journal region to {_size_text(length)}: {e.args[1]}") from None
        log.info("namespace journal region grown from %s to %s", _size_text(have), _size_text(length))


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


# --- the exporter process -------------------------------------------------------------

class ExporterLaunch:
    """An exporter process, started in its own session before FUSE exists, with no inherited descriptors.

    Starting it is split from waiting for it so that recovery can start it as soon as the new
    regions exist and let the interpreter start-up overlap the rebuild.

    ``prepared``: the standby's, started long before a takeover with no region directory. Its interpreter,
    imports and backend are ready and it waits on stdin until ``hand`` names the new region directory, so a
    takeover does not wait for a Python start-up (a few hundred ms). It exits if the pipe closes unused.
    """

    def __init__(self, region_dir: Path, backend_path: str | os.PathLike[str], fsid: str, opts: MountOptions,
                 log_file: Path | None) -> None:
        self._spawn(["--region-dir", str(region_dir), "--backend", str(backend_path), "--listen", opts.listen,
                     "--port", str(opts.port), *store_argv(opts.store), *(["--log", str(log_file)] if log_file else [])])

    @classmethod
    def prepared(cls, backend_path: str | os.PathLike[str], opts: MountOptions) -> ExporterLaunch:
        launch = cls.__new__(cls)
        launch._spawn(["--await-region-dir", "--backend", str(backend_path), *store_argv(opts.store)])
        return launch

    def _spawn(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "rmemfs.cli.exporter", *argv],
                                     stdin=subprocess.PIPE if "--await-region-dir" in argv else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
                                     start_new_session=True)
        self.owner = os.getpid()      # only this process may wait for it
        self.handed = False

    def hand(self, region_dir: Path, opts: MountOptions, log_file: Path | None) -> None:
        """Give a prepared exporter its region directory; OSError if it is gone (start another)."""
        assert self.proc.stdin is not None and not self.handed
        self.proc.stdin.write(json.dumps({"region_dir": str(region_dir), "listen": opts.listen, "port": opts.port,
                                          "log": str(log_file) if log_file else None}).encode() + b"\n")
        self.proc.stdin.close()
        self.handed = True

    def ready(self, timeout: float = 30.0) -> int:
        """Wait for the exporter's READY line; returns its port. An exporter that dies closes its stdout,
        which is seen as end of file (waitpid is not used: it only works in the process that started it)."""
        proc = self.proc
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            try:
                chunk = os.read(proc.stdout.fileno(), 4096)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            buf += chunk
            if b"\n" in buf or not chunk:
                line = buf.split(b"\n", 1)[0].decode(errors="replace")
                if line.startswith("READY "):
                    proc.stdout.close()
                    proc.stderr.close()
                    return int(line.split()[1])
                if not line:
                    lines = [ln for ln in proc.stderr.read().decode(errors="replace").splitlines()
                             if ln.strip() and not ln.startswith((" ", "|", "+"))]
                    line = lines[-1] if lines else "it exited"
                raise ExporterFailed(f"exporter failed to start: {line}")
        proc.kill()
        raise ExporterFailed(f"exporter did not become ready within {timeout:.0f} s")

    def abort(self) -> None:
        """Stop an exporter whose filesystem will not be served after all (in the process that started it)."""
        if self.proc.pid and self.owner == os.getpid() and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class StartUp:
    """What a start-up that fails must undo. Until the backend names this mount's memory as needed
    (``exporter_needed``), a failure stops the exporter: the backend is as it was and the port is free.
    Once the backend is marked mounted by us the memory may hold the only copy of something (a
    recovery's fetched pages), and the exporter stays until a clean baseline is published."""

    region_dir: Path
    launch: ExporterLaunch | None = None
    exporter_needed: bool = False


@contextmanager
def undo_failed_start(startup: StartUp) -> Iterator[StartUp]:
    """Structural cleanup for every failure of a start-up after the exporter was launched."""
    try:
        yield startup
    except BaseException:
        if not startup.exporter_needed:
            log.info("start-up failed: stopping the exporter in %s", startup.region_dir)
            if startup.launch is not None:
                startup.launch.abort()
            stop_exporter(startup.region_dir)   # also from a forked daemon, where the launch is not our child
        raise


# --- serving ------------------------------------------------------------------------------

class _FlushRoom(RoomWaiter):
    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher

    async def wait_for_room(self) -> None:
        target = self.flusher.completed + 1
        self.flusher.trigger()
        async with self.flusher.done:
            while self.flusher.completed < target:
                await self.flusher.done.wait()


@dataclass
class Session:
    """A filesystem being served; ``serve`` fills in the services."""

    opened: Opened
    mountpoint: Path
    opts: MountOptions
    exporter_port: int
    startup: StartUp
    flusher: Flusher | None = None
    requests: dict[str, int] = field(default_factory=dict)    # FUSE request counters, shared with fs.py
    terminated: bool = False
    started_ns: int = field(default_factory=time.time_ns)

    def owner(self) -> dict[str, Any]:
        return owner_info(mountpoint=str(self.mountpoint), exporter_host=_advertised_host(self.opts.listen),
                          exporter_port=self.exporter_port, region_dir=str(self.opened.region_dir))

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.flusher is not None
        op = request.get("op")
        if op == "flush":
            generation = await self.flusher.flush()
            return {"ok": True, "generation": generation}
        if op == "stats":
            bg = self.opened.background
            return {"load": bg.loader.stats() if bg is not None else None,
                    "ok": True, "fsid": self.opened.fs.fsid, "epoch": self.opened.epoch, "pid": os.getpid(),
                    "backend": self.opened.backend.spec, "backend_options": self.opened.backend.options,
                    "mountpoint": str(self.mountpoint),
                    "core": self.opened.fs.statistics().__dict__,
                    "flush": self.flusher.statistics().__dict__, "requests": dict(self.requests),
                    "heartbeat": self.opened.fs.tracker.header().heartbeat,
                    "fenced": self.opened.fs.note_fenced(), "fence_epoch": self.opened.fs.tracker.fence}
        raise ValueError(f"unknown request {op!r}")


def _advertised_host(listen: str) -> str:
    if listen in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return listen


async def serve(session: Session, *, on_ready: Callable[[], None] = lambda: None) -> int:
    """Publish ownership, mount, serve until unmounted, then flush clean. Returns an exit code."""
    opened, opts = session.opened, session.opts
    fs = opened.fs
    flusher = Flusher(fs, opened.backend, opened.manifest, opened.live, opts.flush_interval)
    session.flusher = flusher
    fs.room_waiter = _FlushRoom(flusher)
    if opened.how == "recovered":
        session.startup.exporter_needed = True    # the fetched pages live only in this memory (and the fenced source's)
    try:
        await flusher.publish(replace(opened.manifest, epoch=opened.epoch, state=STATE_MOUNTED,
                                      owner=session.owner()), expect_epoch=opened.manifest.epoch)
        # Only now, as the owner of the newest epoch, may this host delete what no manifest names.
        await trio.to_thread.run_sync(opened.backend.collect_garbage)
        if fs.tracker.current.count and opened.how != "recovered":
            await flusher.flush()      # a new filesystem: publish its first pages before serving
        # A recovered filesystem mounts first: the pages it fetched are marked on its current list, so
        # they are as protected as any write (this host's exporter serves them) until the flush
        # triggered below makes them part of a baseline.
    except FencedError as e:
        raise BackendFailed(str(e)) from None
    except (OSError, BackendError, CorruptionError) as e:
        # A publish that failed after its rename (a directory fsync) did mark the backend ours.
        session.startup.exporter_needed |= _published_epoch(opened.backend) != opened.manifest.epoch
        kind = BackendUnreachable if isinstance(e, StoreUnreachable) else BackendFailed
        raise kind(f"cannot publish to backend {opened.backend.spec}: {e}") from None
    # The backend says "mounted" by us: only a clean baseline releases the memory (see _abandon_start).
    session.startup.exporter_needed = True
    ready = False

    def mounted() -> None:
        nonlocal ready
        ready = True
        on_ready()

    try:
        return await _mount_and_serve(session, mounted)
    except BaseException:
        if not ready:
            with trio.CancelScope(shield=True):
                await _abandon_start(session)
        raise


def _published_epoch(backend: BaselineStore) -> int | None:
    try:
        return backend.read_manifest().epoch
    except Exception:       # unreadable: assume the worst (it may be ours)
        return None


async def _abandon_start(session: Session) -> None:
    """A start-up that failed after the backend was marked mounted, before the mount was usable: publish
    a clean baseline (nothing was acknowledged to an application since the last one, but a recovery's
    fetched pages were) so the backend is clean again, as before; then the exporter may go."""
    assert session.flusher is not None
    try:
        generation = await session.flusher.flush(state=STATE_CLEAN)
    except Exception as e:
        log.error("start-up failed and the clean baseline that undoes it failed too (%s): the backend stays "
                  "marked in use and the exporter keeps serving; recover with rmemfs-recover", e)
        return
    session.opened.fs.tracker.set_clean_generation(generation)
    session.startup.exporter_needed = False
    log.info("start-up failed: backend marked clean again at generation %d", generation)


async def _mount_and_serve(session: Session, on_ready: Callable[[], None]) -> int:
    from . import fs as fuse      # loads pyfuse3: only the serving process needs it

    opened, opts, flusher = session.opened, session.opts, session.flusher
    assert flusher is not None
    fs = opened.fs
    control_path = opened.region_dir / CONTROL_SOCKET
    ops = fuse.Operations(fs, writeback_cache=opts.writeback_cache)
    session.requests = ops.counters
    try:
        faults.fail("mount.fuse", RuntimeError)
        fuse.mount(ops, str(session.mountpoint),
                   fuse.mount_options(opts.fsname, allow_other=opts.allow_other, extra=opts.extra_fuse))
    except RuntimeError as e:
        raise MountpointUnusable(f"cannot mount {session.mountpoint}: {e}") from None
    unmounted = False
    registered = None
    try:
        registered = control.register_mount(session.mountpoint, control_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(flusher.run)
            await nursery.start(control.serve, control_path, session.control)
            nursery.start_soon(_heartbeat, fs, opts.heartbeat_interval)
            nursery.start_soon(_signals, session)
            if opened.background is not None:
                nursery.start_soon(opened.background.run, fs)
            on_ready()
            log.info("mounted %s at %s", fs.fsid, session.mountpoint)
            nursery.start_soon(_remove_orphans, session)
            if fs.tracker.current.count:
                flusher.trigger()
            await fuse.serve_requests()
            unmounted = True
            flusher.stop()
            nursery.cancel_scope.cancel()
    finally:
        control.unregister_mount(registered, control_path)
        fuse.close(unmount=session.terminated or not unmounted)
    return await _shutdown(session)


async def _remove_orphans(session: Session) -> None:
    """Free the region directories beside ours that nothing needs any more, such as a recovered epoch's
    ``.e<N>`` that was unmounted cleanly and is now superseded by this mount (issue 15 item 8). Once
    serving, in a thread: it reads every process's memory maps."""
    base = session.opts.region_dir(session.opened.fs.fsid)
    try:
        found = await trio.to_thread.run_sync(partial(orphans, session.opened.backend, base, settled_only=True))
        for path in found:
            if path != session.opened.region_dir:
                await trio.to_thread.run_sync(shutil.rmtree, path)
                log.info("removed %s: an older epoch's region directory that nothing needs", path)
    except Exception as e:       # never a reason to stop serving; rmemfs-ctl orphans can do it later
        log.warning("could not remove orphaned region directories beside %s: %s", base, e)


async def _shutdown(session: Session) -> int:
    """Final baseline marked clean; only then may the exporter go."""
    assert session.flusher is not None
    fs = session.opened.fs
    try:
        # The heartbeat goes on through the final flush: a standby must not take a stopping source for dead.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_heartbeat, fs, session.opts.heartbeat_interval)
            generation = await session.flusher.flush(state=STATE_CLEAN)
            if fs.times_pending:     # a full dirty list had no room for them before the first flush's swap
                generation = await session.flusher.flush(state=STATE_CLEAN)
            nursery.cancel_scope.cancel()
    except Exception as e:
        log.error("final flush failed (%s): the backend stays marked in use and the exporter keeps serving; "
                  "recover with rmemfs-recover", e)
        return EXIT_BACKEND
    if fs.residency is not None and not fs.residency.complete:
        # Unmounted before a lazy load finished: the baseline is clean, but these region files are not whole,
        # so they must not be taken for it (the next mount loads the baseline).
        log.info("unmounted before the background load finished: the next mount loads from the baseline")
    else:
        fs.tracker.set_clean_generation(generation)
    stop_exporter(session.opened.region_dir)
    log.info("unmounted cleanly at generation %d", generation)
    return 0


async def _heartbeat(fs: Filesystem, interval: float) -> None:
    fs.tracker.set_heartbeat_interval(interval)
    while True:
        fs.tracker.beat()
        fs.note_fenced()   # so the fenced mount says so even when nothing writes
        await trio.sleep(interval)


async def _signals(session: Session) -> None:
    from . import fs as fuse
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            session.terminated = True
            fuse.terminate()
