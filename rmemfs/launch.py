"""Launching a mount's exporter process and undoing a start-up that fails.

``ExporterLaunch`` starts ``rmemfs.cli.exporter`` in its own session before FUSE exists and waits
for its READY line; ``StartUp`` and ``undo_failed_start`` decide whether a failed start-up stops
that exporter (yes, until the backend names this mount's memory as needed).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

from .errors import ExporterFailed
from .exporter import stop_exporter
from .options import MountOptions
from .store import store_argv

log = logging.getLogger(__name__)


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
