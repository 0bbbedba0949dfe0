"""The exporter: the source host's stand-in for an RDMA NIC, as a process of its own.

It maps the region files, registers them with each available
transport (software always; verbs when a device is present) on demand of the
registration handshake, and serves one-sided reads. It outlives the
filesystem process on purpose: when the filesystem dies, its memory stays
readable here, which is what recovery relies on.

It must never hold a ``/dev/fuse`` descriptor (that would keep a dead mount
hanging instead of failing with ENOTCONN), so ``rmemfs`` starts it before
mounting, with inherited descriptors closed.

Files it keeps in the region directory: ``exporter.sock`` (local status and
shutdown) and ``exporter.json`` (pid and address, for tools).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from . import PAGE_SIZE, control
from .dirty import parse_header, read_ctl_header
from .errors import CorruptionError
from .fencing import EXTENSION, FenceExtension
from .liveness import EXTENSION as LIVENESS, LivenessExtension, file_ids, maps_any, run_state
from .durable import atomic_write
from .secure import read_private
from .regions import CTL_REGION_ID, buffer_address, parse_region_file_name
from .store import STATE_CLEAN, BaselineStore, segment_epoch
from .transport import export_backend, load as load_transport
from .transport.software import IDLE_TIMEOUT, SoftwareExportBackend, serve as serve_software  # always served
from .transport.base import Catalog, ExportBackend, ExportedRegion, TransportError

log = logging.getLogger(__name__)

DEFAULT_PORT = 7470
SOCKET_NAME = "exporter.sock"
INFO_NAME = "exporter.json"


class RegionRegistry:
    """Shared mappings of the region files, registered per transport on request."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.regions: dict[int, ExportedRegion] = {}
        self._maps: dict[int, mmap.mmap] = {}

    def rescan(self) -> None:
        """Map region files that appeared since the last scan (regions never shrink or vanish while live)."""
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            parsed = parse_region_file_name(entry.name)
            if parsed is None or parsed[0] in self.regions:
                continue
            region_id, role = parsed
            # The directory is checked as ours (secure.py); O_NOFOLLOW is the second line.
            fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size == 0 or size % PAGE_SIZE:
                    log.warning("skipping %s: size %d is not a multiple of the page size", entry.name, size)
                    os.close(fd)
                    continue
                # Writable only because ibv_reg_mr on kernels before 6.2 pins pages for write
                # even for a remote-read-only MR; nothing here writes, and neither transport can.
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            view = memoryview(mm)
            self._maps[region_id] = mm
            # The fd stays open for the exporter's life: the software transport reads the file with
            # pread, which leaves holes unallocated.
            self.regions[region_id] = ExportedRegion(region_id, entry.name, role, view, buffer_address(view), fd)
            log.info("mapped %s (%d bytes)", entry.name, size)

    def ctl_header(self) -> dict[str, Any] | None:
        region = self.regions.get(CTL_REGION_ID)
        if region is None:
            return None
        try:
            h = parse_header(region.buffer[:PAGE_SIZE])
        except Exception as e:
            return {"error": str(e)}
        return {"fsid": h.fsid, "epoch": h.epoch, "heartbeat": h.heartbeat, "heartbeat_ns": h.heartbeat_ns,
                "pid": h.pid, "clean_generation": h.clean_generation, "swap_seq": h.swap_seq, "fence": h.fence}


class Exporter:
    def __init__(self, region_dir: Path, fsid: str, secret: bytes, listen: str, port: int,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.region_dir = region_dir
        self.fsid = fsid
        self.secret = secret
        self.listen = listen
        self.port = port
        self.idle_timeout = idle_timeout   # an authenticated connection silent this long is dropped
        self.registry = RegionRegistry(region_dir)
        self.backends: dict[str, ExportBackend] = {}
        self.started = time.time()
        self._cancel = trio.CancelScope()

    def _backend(self, transport: str) -> ExportBackend:
        backend = self.backends.get(transport)
        if backend is None:
            module = load_transport(transport)
            reason = module.available()
            if reason is not None:
                raise TransportError(f"exporter cannot register for {transport}: {reason}")
            backend = self.backends[transport] = export_backend(transport)
        return backend

    def catalog(self, transport: str) -> Catalog:
        """The registration handshake: register every region (filesystem and dirty lists) and describe them."""
        self.registry.rescan()
        backend = self._backend(transport)
        descs = tuple(backend.register(region) for _, region in sorted(self.registry.regions.items()))
        log.info("registered %d regions for %s", len(descs), transport)
        return Catalog(self.fsid, transport, descs)

    def extensions(self) -> dict[str, Any]:
        out: dict[str, Any] = {EXTENSION: FenceExtension(self.region_dir),
                               LIVENESS: LivenessExtension(self.region_dir)}
        try:
            verbs = self._backend("verbs")
        except (TransportError, ImportError) as e:
            log.info("verbs transport not offered: %s", e)
            return out
        for ext in verbs.extensions():
            out[ext.name] = ext
        return out

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            self.registry.rescan()
            return {"ok": True, "pid": os.getpid(), "fsid": self.fsid, "listen": self.listen, "port": self.port,
                    "uptime_s": time.time() - self.started, "ctl": self.registry.ctl_header(),
                    "regions": {r.name: len(r.buffer) for r in self.registry.regions.values()},
                    "transports": sorted(self.backends)}
        if op == "shutdown":
            self._cancel.cancel()
            return {"ok": True}
        raise ValueError(f"unknown request {op!r}")

    async def run(self, *, ready: trio.Event | None = None) -> None:
        self.registry.rescan()
        export = self._backend("software")
        assert isinstance(export, SoftwareExportBackend)
        with self._cancel:
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: serve_software(
                    host=self.listen, port=self.port, fsid=self.fsid, secret=self.secret, export=export,
                    catalog=self.catalog, extensions=self.extensions(), idle_timeout=self.idle_timeout,
                    task_status=task_status))
                await nursery.start(control.serve, self.region_dir / SOCKET_NAME, self._control)
                nursery.start_soon(self._signals)
                atomic_write(self.region_dir / INFO_NAME, json.dumps(
                    {"pid": os.getpid(), "start": process_start_time(os.getpid()), "listen": self.listen,
                     "port": self.port, "fsid": self.fsid}).encode())
                log.info("exporter for %s serving %s:%d", self.fsid, self.listen, self.port)
                if ready is not None:
                    ready.set()
                print(f"READY {self.port}", flush=True)
        for backend in self.backends.values():
            backend.close()
        log.info("exporter stopped")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                log.info("exporter: signal received, stopping")
                self._cancel.cancel()
                return


def exporter_info(region_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(read_private(region_dir / INFO_NAME))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def exporter_alive(region_dir: Path) -> bool:
    try:
        control.call(region_dir / SOCKET_NAME, {"op": "status"}, timeout=5)
        return True
    except (OSError, ValueError):
        return False


def stop_exporter(region_dir: Path, timeout: float = 10.0) -> None:
    """Ask a running exporter of this region directory to exit, and wait for it."""
    info = exporter_info(region_dir)
    try:
        control.call(region_dir / SOCKET_NAME, {"op": "shutdown"}, timeout=5)
    except (OSError, ValueError):
        pass
    pid = info.get("pid") if info else None
    if isinstance(pid, int) and pid > 0:
        if wait_exited(pid, timeout):
            return
        kill_our_exporter(pid, info.get("start"), region_dir)   # type: ignore[union-attr]


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def kill_our_exporter(pid: int, start: object, region_dir: Path) -> None:
    """SIGKILL ``pid`` only when it provably is the exporter that wrote exporter.json: a pidfd pins the
    process, then its start time must equal the recorded one (a reused pid has a later start time) and
    its command line must name this region directory. Anything else is left alone with a warning."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            argv = []
        ours = start is not None and process_start_time(pid) == start and serves(pid, argv, region_dir)
        if not ours:
            log.warning("not killing pid %d named in %s: it is not the exporter that wrote it",
                        pid, region_dir / INFO_NAME)
            return
        log.warning("exporter pid %d did not exit; killing it", pid)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


class RetireRefused(Exception):
    """retire() would free memory that a live process still uses (the message says which)."""


def _cmdline_of(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def mapping_processes(paths: list[Path], exclude: frozenset[int] = frozenset()) -> dict[int, str]:
    """Live processes (pid -> command line) that map any of ``paths``, found in /proc/*/maps by device
    and inode, so a process in another mount namespace (which names the file differently) counts too."""
    wanted = file_ids(paths)
    found: dict[int, str] = {}
    if not wanted:
        return found
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in exclude and maps_any(name, wanted):
            found[int(name)] = b" ".join(_cmdline_of(int(name))).decode(errors="replace").strip()
    return {pid: cmd for pid, cmd in found.items() if process_running(pid)}


def _our_exporter_pid(region_dir: Path) -> int | None:
    """The pid in exporter.json when it provably is that exporter (start time and command line)."""
    info = exporter_info(region_dir)
    pid = info.get("pid") if info else None
    if not isinstance(pid, int) or pid <= 0 or info is None:
        return None
    if (info.get("start") is not None and process_start_time(pid) == info.get("start")
            and serves(pid, _cmdline_of(pid), region_dir)):
        return pid
    return None


def serves(pid: int, argv: list[bytes], region_dir: Path) -> bool:
    """``pid`` (command line ``argv``) is an exporter of ``region_dir``: its command line names it, or it
    was prepared ahead by a standby (``--await-region-dir``) and, once handed it, works in it (its cwd)."""
    if b"rmemfs.cli.exporter" not in argv:
        return False
    if os.fsencode(str(region_dir)) in argv:
        return True
    try:
        return b"--await-region-dir" in argv and os.path.samefile(f"/proc/{pid}/cwd", region_dir)
    except OSError:
        return False


def _why_in_use(region_dir: Path, files: list[Path], exclude: frozenset[int]) -> str | None:
    # The ctl header's pid is the serving process's (set as it starts serving; before that, the loading
    # process's): the maps scan is what finds a live filesystem process, this only adds a clearer message.
    try:
        fs_pid = read_ctl_header(region_dir).pid
    except (OSError, CorruptionError):
        fs_pid = 0
    if fs_pid and fs_pid != os.getpid() and process_running(fs_pid) \
            and any(b"rmemfs" in arg for arg in _cmdline_of(fs_pid)):
        return f"its filesystem process (pid {fs_pid}) is still running: unmount it or let it exit first"
    users = mapping_processes(files, exclude)
    if users:
        named = "; ".join(f"pid {pid} ({cmd[:80]})" for pid, cmd in sorted(users.items())[:3])
        return f"{len(users)} live process(es) map its region files: {named}"
    return None


def retire(region_dir: Path) -> None:
    """Stop the exporter of a region directory and free its memory (remove the directory).

    Never while something still uses that memory: raises RetireRefused (and changes nothing) when the
    filesystem process the ctl region names is alive, or when any live process but the directory's own
    exporter maps a region file; after the exporter stopped, nothing at all may map one. (A process
    that maps a file after that last look would keep its pages: unlinking a mapped tmpfs file frees
    nothing under it.)"""
    files = [Path(e.path) for e in os.scandir(region_dir) if parse_region_file_name(e.name) is not None]
    exporter = _our_exporter_pid(region_dir)
    reason = _why_in_use(region_dir, files, frozenset({exporter} if exporter else ()))
    if reason is None:
        stop_exporter(region_dir)
        reason = _why_in_use(region_dir, files, frozenset())
    if reason is not None:
        raise RetireRefused(f"not retiring {region_dir}: {reason}")
    for entry in os.scandir(region_dir):
        os.unlink(entry.path)
    os.rmdir(region_dir)


def why_still_needed(backend: BaselineStore, region_dir: Path) -> str | None:
    """Why the memory in ``region_dir`` must not be freed yet, or None when nothing in it is the only
    copy of anything: the backend has moved to a newer owner that has published a baseline of its own,
    or this memory was unmounted cleanly into the published generation."""
    try:
        header = read_ctl_header(region_dir)
    except FileNotFoundError:
        return f"{region_dir} holds no rmemfs regions"
    except (OSError, CorruptionError) as e:
        return f"cannot read the ctl region in {region_dir}: {e}"
    manifest = backend.read_manifest()
    if header.fsid != manifest.fsid:
        return f"{region_dir} holds filesystem {header.fsid}, the backend holds {manifest.fsid}"
    if manifest.epoch <= header.epoch:
        if manifest.state == STATE_CLEAN and header.clean_generation == manifest.generation:
            return None
        return (f"this memory (epoch {header.epoch}) still owns the filesystem and may hold the only copy of "
                f"recent writes: recover it with rmemfs-recover first")
    if not any(segment_epoch(s.name) > header.epoch for s in manifest.segments):
        return (f"the new owner (epoch {manifest.epoch}) has not published a baseline of its own yet: "
                f"retry after its first flush")
    return None


def _mapped(directory: Path) -> bool:
    """Whether a live process maps a file in ``directory`` (by dev+inode, so in any mount namespace)."""
    files = [Path(e.path) for e in os.scandir(directory) if e.is_file(follow_symlinks=False)]
    return bool(mapping_processes(files))


def orphans(backend: BaselineStore, base: Path, *, settled_only: bool = False) -> list[Path]:
    """Region directories (``base`` and its ``<name>.e<epoch>`` siblings, real directories only) that no
    live process maps and that the published manifest does not need: a directory whose memory the
    backend still needs (``why_still_needed``), or the clean regions of the published epoch that the
    next mount reuses, are kept. With ``settled_only``, a directory with no ctl region (perhaps a
    recovery that is creating it) is not counted."""
    manifest = backend.read_manifest()
    found = []
    for path in sorted(base.parent.glob(f"{base.name}*")):
        suffix = path.name[len(base.name):]
        if not (suffix == "" or (suffix.startswith(".e") and suffix[2:].isdigit())):
            continue
        if path.is_symlink() or not path.is_dir() or _mapped(path):
            continue
        try:
            header = read_ctl_header(path)
        except FileNotFoundError:
            if not settled_only:
                found.append(path)      # no ctl region: nothing in it can be recovered or reused
            continue
        except (OSError, CorruptionError):
            continue                    # unreadable: not ours to judge
        if header.fsid != manifest.fsid or header.epoch >= manifest.epoch:
            continue                    # another filesystem's, or the published epoch's own regions
        # Unmounted cleanly into a generation the backend has since built on: all of it is in the backend.
        superseded = 0 < header.clean_generation <= manifest.generation
        if superseded or why_still_needed(backend, path) is None:
            found.append(path)
    return found


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process; one that exited but was not reaped (a zombie) is not."""
    return run_state(pid) not in (None, "Z")


def wait_exited(pid: int, timeout: float, poll: float = 0.05) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True
