"""Process level on one host: a paused source that is taken over acknowledges nothing afterwards (issue 10)."""
from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import Rig, alive, cli, exporter_pid, run, wait_gone
from rmemfs.host import is_mounted
from rmemfs.store import open_store

pytestmark = pytest.mark.mount


def test_paused_source_taken_over_refuses_every_write_after_resume(rig: Rig) -> None:
    """The scenario at the top of issue 10: SIGSTOP the fs process, recover on a second mount, SIGCONT:
    the old mount refuses write+fsync and msync, and the new mount holds v2."""
    rig.mount(["flush_interval=3600"])
    m1 = rig.mountpoint
    (m1 / "a").write_bytes(b"v1\n")
    (m1 / "mapped").write_bytes(b"m" * 8192)
    rig.flush()
    with open(m1 / "a", "r+b") as f:
        f.write(b"v2\n")
        os.fsync(f.fileno())
    fs_pid = rig.daemon_pid()
    m2 = rig.root / "mnt2"
    m2.mkdir()
    recover = cli("recover") + ["--backend", str(rig.backend), "--transport", "software", "--source",
                                f"127.0.0.1:{rig.port}", "-o",
                                rig.opts(["port=0"]).replace(f"regiondir={rig.regiondir}",
                                                             f"regiondir={rig.regiondir}-hostB"), str(m2)]
    # Started (waiting on stdin) before the files below are opened: a fork made while this process holds
    # descriptors of M1 would close them in the child, and that close waits on the stopped daemon.
    starter = subprocess.Popen(["sh", "-c", 'read go && exec "$@"', "sh", *recover], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = open(m1 / "a", "r+b")                      # opened before the takeover, used after it
    mfile = open(m1 / "mapped", "r+b")
    mm = mmap.mmap(mfile.fileno(), 8192)
    os.kill(fs_pid, signal.SIGSTOP)
    try:
        out, err = starter.communicate("go\n", timeout=120)
        assert starter.returncode == 0, err
    finally:
        os.kill(fs_pid, signal.SIGCONT)
    m2_pid = int(open_store(rig.backend).read_manifest().owner["pid"])
    try:
        assert (m2 / "a").read_bytes() == b"v2\n"
        # write() itself may land in the page cache only if writeback caching is on; fsync must fail then.
        with pytest.raises(OSError) as e:
            held.seek(0)
            held.write(b"v3\n")
            held.flush()
            os.fsync(held.fileno())
        assert e.value.errno == errno.EROFS
        mm[0:2] = b"XX"
        with pytest.raises(OSError) as e:
            mm.flush()
        assert e.value.errno in (errno.EROFS, errno.EIO)
        with pytest.raises(OSError) as e:
            (m1 / "new").write_bytes(b"n")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.unlink(m1 / "a")
        assert e.value.errno == errno.EROFS
        # Reads are served from the fenced mount's own memory.
        assert (m1 / "a").read_bytes() == b"v2\n"
        assert (m2 / "a").read_bytes() == b"v2\n"
        assert not (m2 / "new").exists() and (m2 / "mapped").read_bytes() == b"m" * 8192
        stats = json.loads(run(cli("ctl") + ["stats", "--json", str(m1)]).stdout)
        assert stats["fenced"] is True and stats["fence_epoch"] == 2, stats
        log = (rig.regiondir / "rmemfs.log").read_text()
        assert sum("fenced: the filesystem was taken over by epoch 2" in ln for ln in log.splitlines()) == 1, log
    finally:
        mm.close()
        mfile.close()
        with contextlib.suppress(OSError):   # its buffered v3 is refused again at close
            held.close()
        # Both mounts really unmounted, and their daemons gone (a lazy unmount left dead mounts behind);
        # the rig's cleanup would only find the new owner, via the manifest.
        unmount_and_wait(m2, m2_pid)
        unmount_and_wait(m1, fs_pid)
    assert open_store(rig.backend).read_manifest().epoch == 2


def unmount_and_wait(mountpoint: Path, pid: int, timeout: float = 30) -> None:
    """Unmount (not lazily: retried while busy) and wait for the daemon to exit."""
    deadline = time.monotonic() + timeout
    while is_mounted(mountpoint):
        proc = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
        if proc.returncode == 0:
            break
        assert time.monotonic() < deadline, f"{mountpoint} stays busy: {proc.stderr.strip()}"
        time.sleep(0.1)
    wait_gone(pid, timeout)
    assert not is_mounted(mountpoint)


def _wait_for(cond, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_takeover_on_the_same_host_keeps_the_memory_a_live_fenced_mount_maps(rig: Rig) -> None:
    """Issue 15 item 5 / issue 10: a recovery from a paused source on the same host retires the old region
    directory once it is mounted; the old mount, fenced and resumed, still maps it, so it must stay (and
    `--retire` refuses) until that process is gone. Before the guard the directory was deleted."""
    rig.mount(["flush_interval=3600"])
    m1, old_dir = rig.mountpoint, rig.regiondir
    (m1 / "a").write_bytes(b"v1\n")
    rig.flush()
    (m1 / "a").write_bytes(b"v2\n")
    fs_pid, old_exporter = rig.daemon_pid(), exporter_pid(old_dir)
    m2 = rig.root / "mnt2"
    m2.mkdir()
    os.kill(fs_pid, signal.SIGSTOP)
    try:
        rec = run(cli("recover") + ["--backend", str(rig.backend), "--transport", "software", "--source",
                                    f"127.0.0.1:{rig.port}", "-o", rig.opts(["port=0"]), str(m2)])
    finally:
        os.kill(fs_pid, signal.SIGCONT)
    assert rec.returncode == 0, rec.stderr
    m2_pid = int(open_store(rig.backend).read_manifest().owner["pid"])
    new_log = Path(f"{old_dir}.e2") / "rmemfs.log"
    kept = f"not retiring {old_dir}: its filesystem process (pid {fs_pid}) is still running"
    try:
        assert (m2 / "a").read_bytes() == b"v2\n"
        _wait_for(lambda: not old_dir.exists() or (new_log.exists() and kept in new_log.read_text()))
        assert (old_dir / "ctl-0000.rgn").exists(), "the live old mount's memory was retired"
        assert (m1 / "a").read_bytes() == b"v2\n"              # still served from that memory
        retire = cli("ctl") + ["exporter", "--backend", str(rig.backend), "--regiondir", str(old_dir), "--retire"]
        refused = run(retire)
        assert refused.returncode == 6 and kept in refused.stderr and len(refused.stderr.splitlines()) == 1, \
            refused.stderr
        assert alive(old_exporter)                               # a refusal stops nothing
        unmount_and_wait(m1, fs_pid)
        done = run(retire)
        assert done.returncode == 0 and "retired" in done.stdout, done.stderr
        assert not old_dir.exists()
        wait_gone(old_exporter)
    finally:
        unmount_and_wait(m2, m2_pid)
        if is_mounted(m1):
            unmount_and_wait(m1, fs_pid)


def test_retire_refuses_while_any_process_maps_a_region_file(rig: Rig) -> None:
    """A cleanly unmounted filesystem's memory is not needed by the backend, but a process still mapping
    one of its region files (by dev+inode, whatever its mount namespace calls it) keeps it; the refusal
    names the pid. Before the guard `--retire` deleted the directory under the mapping."""
    rig.mount(["flush_interval=3600"])
    (rig.mountpoint / "a").write_bytes(b"x" * 10000)
    rig.unmount()
    retire = cli("ctl") + ["exporter", "--backend", str(rig.backend), "--regiondir", str(rig.regiondir),
                           "--retire"]
    data = sorted(rig.regiondir.glob("data-*.rgn"))[0]
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        refused = run(retire)
        assert refused.returncode == 6, (refused.returncode, refused.stdout, refused.stderr)
        assert f"pid {os.getpid()}" in refused.stderr and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert data.exists()
    done = run(retire)
    assert done.returncode == 0 and "retired" in done.stdout, done.stderr
    assert not rig.regiondir.exists()


def test_orphans_keeps_a_directory_mapped_from_another_mount_namespace(rig: Rig) -> None:
    """`rmemfs-ctl orphans` judged "mapped" by the path in /proc/*/maps; a process in another mount
    namespace (a netns host, a container) names the same file differently, so its mapping went unseen and
    `--remove` would free memory it maps. Now by dev+inode, as retire does. Fails before: listed."""
    rig.mount(["flush_interval=3600"])
    half = rig.regiondir.with_name(rig.regiondir.name + ".e9")    # no ctl region: otherwise an orphan
    half.mkdir(mode=0o700)
    (half / "data-0002.rgn").write_bytes(b"\0" * 8192)
    elsewhere = rig.root / "elsewhere"
    elsewhere.mkdir()
    script = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); "
              "print('ready', flush=True); sys.stdin.read()")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount --bind "$1" "$2" && exec "$3" -c "$4" "$2/data-0002.rgn"', "sh",
                               str(half), str(elsewhere), sys.executable, script],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        args = ["orphans", "--backend", str(rig.backend), "--regiondir", str(rig.regiondir)]
        assert rig.ctl(*args).stdout.strip() == "", "a directory mapped in another mount namespace is listed"
    finally:
        holder.communicate("", timeout=20)
    assert rig.ctl(*args).stdout.strip() == f"orphan {half}"
