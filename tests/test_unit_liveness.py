"""Unit level, with real processes: the exporter's watch of the filesystem process (``liveness``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rmemfs.dirty import DirtyTracker
from rmemfs.liveness import EXITED, RUNNING, STOPPED, UNKNOWN, ProcessWatch
from rmemfs.regions import CTL_REGION_ID, region_file_name

from test_inproc_core import new_fs

MAPPER = ("import mmap, sys, time\n"
          "f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096)\n"
          "print('mapped', flush=True); time.sleep(120)\n")


def child(ctl: Path | None) -> subprocess.Popen[str]:
    """A process that maps ``ctl`` (as a filesystem process maps its ctl region), or maps nothing."""
    code = MAPPER if ctl is not None else "import time; print('mapped', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(ctl)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "mapped"
    return proc


@pytest.fixture
def region_dir() -> Iterator[tuple[Path, DirtyTracker]]:
    fs = new_fs(Path("/dev/shm") / f"rmemfs-test-liveness-{uuid.uuid4()}")
    try:
        yield fs.regions.directory, fs.tracker
    finally:
        fs.regions.close()
        for f in fs.regions.directory.iterdir():
            f.unlink()
        fs.regions.directory.rmdir()


def wait_state(watch: ProcessWatch, want: str) -> str:
    deadline = time.monotonic() + 10
    while (state := watch.state()[1]) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return state


def test_a_watched_process_is_running_stopped_and_then_exited_before_it_is_reaped(
        region_dir: tuple[Path, DirtyTracker]) -> None:
    directory, tracker = region_dir
    proc = child(directory / region_file_name(CTL_REGION_ID))
    tracker.set_pid(proc.pid)
    watch = ProcessWatch(directory)
    try:
        assert watch.state() == (proc.pid, RUNNING)
        os.kill(proc.pid, signal.SIGSTOP)
        assert wait_state(watch, STOPPED) == STOPPED
        os.kill(proc.pid, signal.SIGCONT)
        assert wait_state(watch, RUNNING) == RUNNING
        os.kill(proc.pid, signal.SIGKILL)
        assert wait_state(watch, EXITED) == EXITED        # a zombie: not reaped yet
        proc.wait()
        assert watch.state() == (proc.pid, EXITED)
    finally:
        proc.kill()
        proc.wait()
        watch.close()


def test_exited_is_never_said_of_a_process_not_seen_alive_mapping_the_ctl_region(
        region_dir: tuple[Path, DirtyTracker]) -> None:
    directory, tracker = region_dir
    other = child(None)                  # alive, but not the filesystem: a recycled pid, say
    tracker.set_pid(other.pid)
    watch = ProcessWatch(directory)
    try:
        assert watch.state() == (other.pid, UNKNOWN)
        other.kill()
        other.wait()
        assert watch.state() == (other.pid, UNKNOWN)     # gone, and never seen as the filesystem
        gone = child(directory / region_file_name(CTL_REGION_ID))
        gone.kill()
        gone.wait()
        tracker.set_pid(gone.pid)                         # exited before it was first looked at
        assert watch.state() == (gone.pid, UNKNOWN)
    finally:
        watch.close()


def test_the_watch_follows_the_pid_the_header_names(region_dir: tuple[Path, DirtyTracker]) -> None:
    """A daemon's header names the loading process until the serving child sets its own pid: the watch
    moves to the new pid, and the loading process's exit is then no one's death."""
    directory, tracker = region_dir
    ctl = directory / region_file_name(CTL_REGION_ID)
    loader, server = child(ctl), child(ctl)
    watch = ProcessWatch(directory)
    try:
        tracker.set_pid(loader.pid)
        assert watch.state() == (loader.pid, RUNNING)
        tracker.set_pid(server.pid)
        loader.kill()
        loader.wait()
        assert watch.state() == (server.pid, RUNNING)
    finally:
        for p in (loader, server):
            p.kill()
            p.wait()
        watch.close()

