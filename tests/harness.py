"""Real processes for the mount-level tests: rmemfs daemons, rmemfs-recover, rmemfs-ctl.

Everything runs the code of this checkout (``python -m rmemfs.cli.*`` with the
repository on PYTHONPATH), each test with its own backend, mountpoint, region
directory and exporter port.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rmemfs.store import open_store
from rmemfs.exporter import process_running, wait_exited
from rmemfs.host import is_mounted

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def cli(name: str) -> list[str]:
    return [sys.executable, "-m", f"rmemfs.cli.{name}"]


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
        check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# Ports for test daemons come from below the kernel's ephemeral range (32768-60999 by default), so no
# outgoing connection is handed one between our check and the daemon's bind, and each is reserved across
# parallel test processes by a lock file held for this process's life (bind-then-close alone races).
PORT_RANGE = range(20000, 30000)
PORT_LOCKS = Path("/tmp/rmemfs-test-ports")
_held_ports: list[int] = []     # lock descriptors, kept open on purpose


def free_port() -> int:
    PORT_LOCKS.mkdir(exist_ok=True)
    start = (os.getpid() * 37) % len(PORT_RANGE)
    for i in range(len(PORT_RANGE)):
        port = PORT_RANGE[(start + i) % len(PORT_RANGE)]
        fd = os.open(PORT_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:          # in use by something that is not a test of ours
                os.close(fd)
                continue
        _held_ports.append(fd)
        return port
    raise RuntimeError(f"no free test port in {PORT_RANGE}")


@dataclass
class Rig:
    """One filesystem under test: a backend, a mountpoint, a region directory and a port."""

    root: Path
    backend: Path = field(init=False)
    mountpoint: Path = field(init=False)
    regiondir: Path = field(init=False)
    port: int = field(default_factory=free_port)
    options: list[str] = field(default_factory=list)
    spec: str = ""          # a --backend other than the directory ``backend`` (rados:POOL/PREFIX)
    store: list[str] = field(default_factory=list)     # that backend's -o options (ceph_conf=..., ceph_id=...)
    used_regiondirs: set[Path] = field(default_factory=set)     # every one this rig pointed at, for cleanup

    def __post_init__(self) -> None:
        self.backend = self.root / "backend"
        self.mountpoint = self.root / "mnt"
        self.regiondir = Path("/dev/shm") / f"rmemfs-test-{uuid.uuid4()}"
        self.used_regiondirs.add(self.regiondir)
        self.backend.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)

    @property
    def backend_arg(self) -> str:
        return self.spec or str(self.backend)

    def backend_args(self) -> list[str]:
        """--backend and its store options, as rmemfs-ctl verify/orphans/exporter take them."""
        return ["--backend", self.backend_arg, *(["-o", ",".join(self.store)] if self.store else [])]

    def store_options(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.store)

    def opts(self, extra: list[str] | None = None) -> str:
        return ",".join([f"regiondir={self.regiondir}", f"port={self.port}", *self.store, *self.options,
                         *(extra or [])])

    def mount(self, extra: list[str] | None = None, env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(cli("mount") + ["--backend", self.backend_arg, "-o", self.opts(extra), str(self.mountpoint)],
                   env=env, check=check)

    def recover(self, *args: str, extra: list[str] | None = None, regiondir: Path | None = None,
                check: bool = True, transport: str = "software") -> subprocess.CompletedProcess[str]:
        opts = self.opts(extra)
        if regiondir is not None:
            opts = opts.replace(f"regiondir={self.regiondir}", f"regiondir={regiondir}")
            self.regiondir = regiondir
            self.used_regiondirs.add(regiondir)
        return run(cli("recover") + ["--backend", self.backend_arg, "--transport", transport,
                                     "--source", f"127.0.0.1:{self.port}", "-o", opts, *args,
                                     str(self.mountpoint)], check=check)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(cli("ctl") + list(args), check=check)

    def flush(self) -> None:
        self.ctl("flush", str(self.mountpoint))

    def stats(self) -> dict:
        return json.loads(self.ctl("stats", "--json", str(self.mountpoint)).stdout)

    def manifest(self):  # type: ignore[no-untyped-def]
        return open_store(self.backend_arg, self.store_options()).read_manifest()

    def daemon_pid(self) -> int:
        return int(self.manifest().owner["pid"])

    def kill(self) -> None:
        """SIGKILL the filesystem process (the exporter lives on) and clear the dead mount."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)

    def unmount(self) -> None:
        pid = self.daemon_pid()
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True)
        wait_gone(pid)

    def cleanup(self) -> None:
        if is_mounted(self.mountpoint):
            try:
                pid = self.daemon_pid()
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError, Exception):
                pass
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        # Every region directory this rig used (a recovery into another one left the first one's exporter
        # running, and its memory allocated, after the test), and their recovery (.e<epoch>) siblings.
        dirs = {d for used in self.used_regiondirs | {self.regiondir}
                for d in (used, *Path("/dev/shm").glob(f"{used.name.split('.e')[0]}*"))}
        for d in dirs:
            info = d / "exporter.json"
            if info.exists():
                try:
                    os.kill(json.loads(info.read_text())["pid"], signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass
            subprocess.run(["rm", "-rf", str(d)], check=False)


@contextlib.contextmanager
def private_tmpfs(path: Path, size: str, mode: str = "0700") -> Iterator[Path]:
    """A small tmpfs of our own at ``path`` (created), lazily unmounted after: for tests that fill one."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def wait_gone(pid: int, timeout: float = 20) -> None:
    if not wait_exited(pid, timeout, poll=0.02):
        raise AssertionError(f"pid {pid} still running after {timeout} s")


def exporter_pid(regiondir: Path) -> int:
    return int(json.loads((regiondir / "exporter.json").read_text())["pid"])


alive = process_running


def prepared_exporters(backend: Path) -> list[int]:
    """Exporters started ahead by a standby of ``backend`` (waiting, or serving since a takeover)."""
    out = subprocess.run(["pgrep", "-f", f"rmemfs.cli.exporter --await-region-dir --backend {backend}( |$)"],
                         capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]
