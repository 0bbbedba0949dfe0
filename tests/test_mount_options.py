"""Real CLI runs: every bad -o value (and rmemfs-recover's --timeout) is a one-line usage error, and a
start-up that fails after the exporter started leaves no exporter and a backend the next mount takes."""
from __future__ import annotations

import os
import time
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Rig, alive, cli, private_tmpfs, run

pytestmark = pytest.mark.mount

BAD_OPTIONS = [
    ("flush_interval=nan", "flush_interval"),
    ("heartbeat_interval=nan", "heartbeat_interval"),
    ("heartbeat_interval=inf", "heartbeat_interval"),
    ("port=70000", "65535"),
    ("region_size=64T", "at most 64G"),
    ("dirty_capacity=1099511627776", "at most 134217728"),   # 2**40
    ("region_size=1e400M", "finite"),
    ("meta_size=nanM", "finite"),
    ("metrics=nope", "ADDR:PORT"),
    ("metrics=127.0.0.1:99999", "ADDR:PORT"),
    ("writeback_cache=yes", "on or off"),
    ("stall_trace=-1", "stall_trace"),
]


def usage_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and all(w in lines[0] for w in words), proc.stderr


def exporters_of(regiondir: Path) -> list[int]:
    """Every process whose command line names this region directory (an exporter serving it)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"rmemfs.cli.exporter" in cmd and str(regiondir).encode() in cmd:
                out.append(int(pid))
    return out


@pytest.mark.parametrize("option,words", BAD_OPTIONS)
def test_bad_option_is_a_usage_error_for_both_commands(rig: Rig, option: str, words: str) -> None:
    usage_error(rig.mount([option], check=False), option.split("=")[0], words)
    assert not exporters_of(rig.regiondir)
    # the backend is untouched: a good mount still works (no exit 11, the port is free)
    rig.mount()
    rig.unmount()
    usage_error(run(cli("recover") + ["--backend", str(rig.backend), "-o", rig.opts([option]), str(rig.mountpoint)]),
                option.split("=")[0], words)


@pytest.mark.parametrize("timeout", ["-1", "nan", "0", "inf"])
def test_recover_timeout_must_be_positive_and_finite(rig: Rig, timeout: str) -> None:
    """Issue 15.11: --timeout -1 or nan on a real source gave an unexpected error."""
    rig.mount()
    (rig.mountpoint / "a").write_bytes(b"a" * 5000)
    rig.kill()
    usage_error(rig.recover("--timeout", timeout, check=False), "--timeout")
    rig.recover("--timeout", "10", "--no-liveness-check", extra=["port=0"],
                regiondir=rig.regiondir.with_name(rig.regiondir.name + "-new"))
    assert (rig.mountpoint / "a").read_bytes() == b"a" * 5000


def test_failure_after_the_exporter_started_stops_it_and_leaves_the_backend_clean(rig: Rig) -> None:
    """Issue 15.6: a failure after the exporter started left it running (holding the port) and the backend
    "mounted", so the next mount got exit 11."""
    rig.mount()
    (rig.mountpoint / "kept").write_bytes(b"k" * 10000)
    rig.unmount()
    failed = rig.mount(env={"RMEMFS_FAULT": "raise:mount.fuse"}, check=False)
    assert failed.returncode == 12, failed.stderr
    errors = [ln for ln in failed.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "fault injected" in errors[0] and "Traceback" not in failed.stderr, failed.stderr
    assert not exporters_of(rig.regiondir)
    assert rig.manifest().state == "clean"
    rig.mount()                                   # same port, same backend: no exit 11, no "port in use"
    assert (rig.mountpoint / "kept").read_bytes() == b"k" * 10000
    (rig.mountpoint / "more").write_bytes(b"m")
    rig.unmount()


def test_failure_of_a_first_mount_leaves_a_backend_that_mounts(rig: Rig) -> None:
    failed = rig.mount(env={"RMEMFS_FAULT": "raise:mount.fuse"}, check=False)
    assert failed.returncode == 12, failed.stderr
    assert not exporters_of(rig.regiondir)
    rig.mount()
    (rig.mountpoint / "a").write_bytes(b"a")
    pid = rig.daemon_pid()
    assert alive(pid)
    rig.unmount()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with private_tmpfs(tmp_path / "small-shm", "8m") as d:
        yield d


def test_full_region_tmpfs_answers_enospc_and_the_mount_lives(rig: Rig, small_tmpfs: Path) -> None:
    """Issue 15.3: a full region tmpfs killed the filesystem with SIGBUS (exit 135) at page 2001."""
    rig.regiondir = small_tmpfs / "regions"
    rig.mount(["dirty_capacity=65536", "meta_size=1M", "region_size=4M", "flush_interval=3600"])
    pid = rig.daemon_pid()
    written = 0
    with pytest.raises(OSError) as full:
        for i in range(64):
            with open(rig.mountpoint / f"f{i}", "wb") as f:
                for _ in range(64):
                    f.write(os.urandom(4096))          # small writes: the mapped path
                    f.flush()
                    written += 4096
    assert full.value.errno == 28, full.value
    assert alive(pid) and written > 0
    assert (rig.mountpoint / "f0").read_bytes()[:4096]      # reads still served
    # the journal goes through the mapping too: names until it has no memory either
    with pytest.raises(OSError) as names_full:
        for i in range(100_000):
            (rig.mountpoint / f"{i:06d}-{'n' * 200}").touch()
    assert names_full.value.errno == 28, names_full.value
    assert alive(pid)
    for i in range(64):
        (rig.mountpoint / f"f{i}").unlink(missing_ok=True)   # deletes fit in the journal's reserve
    for entry in os.scandir(rig.mountpoint):
        os.unlink(entry.path)
    (rig.mountpoint / "again").write_bytes(b"x" * 200_000)  # deleting freed space: writes resume
    assert (rig.mountpoint / "again").read_bytes() == b"x" * 200_000
    assert alive(pid)
    rig.unmount()


def test_refused_recovery_leaves_no_region_directory(rig: Rig) -> None:
    """Issue 15.8: a refused recovery (exit 23) left its .e<epoch> directory, with the loaded baseline."""
    rig.mount()
    (rig.mountpoint / "a").write_bytes(os.urandom(1 << 20))
    rig.flush()
    before = set(Path("/dev/shm").glob(rig.regiondir.name + "*"))
    other = rig.root / "mnt-b"
    other.mkdir()
    refused = run(cli("recover") + ["--backend", str(rig.backend), "--transport", "software", "--source",
                                    f"127.0.0.1:{rig.port}", "-o", rig.opts(["port=0"]), str(other)])
    assert refused.returncode == 23, refused.stderr
    assert set(Path("/dev/shm").glob(rig.regiondir.name + "*")) == before


def test_orphans_lists_and_removes_only_what_nothing_needs(rig: Rig) -> None:
    """Issue 15.8: after a clean unmount a recovered filesystem's .e<epoch> directory was orphaned when the
    next mount loaded into the configured directory. That mount now removes it once it serves; what it
    leaves (a directory without a ctl region, which may be a recovery in progress) rmemfs-ctl orphans
    lists and removes."""
    rig.mount()
    (rig.mountpoint / "a").write_bytes(b"a" * 10000)
    live = rig.regiondir
    rig.kill()
    rig.recover("--no-liveness-check", extra=["port=0"])   # a local source: the new regions go beside it, in .e2
    recovered = live.with_name(live.name + ".e2")
    assert recovered.is_dir()
    rig.unmount()
    half = live.with_name(live.name + ".e9")        # a recovery that stopped before its ctl region
    half.mkdir(mode=0o700)
    rig.regiondir = live
    rig.mount()                                     # loads the baseline into the configured directory
    deadline = time.monotonic() + 10
    while recovered.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not recovered.exists(), "the mount left the superseded .e2 directory"
    assert half.is_dir()
    args = ["orphans", "--backend", str(rig.backend), "--regiondir", str(live)]
    listed = rig.ctl(*args).stdout.splitlines()
    assert listed == [f"orphan {half}"], listed
    rig.ctl(*args, "--remove")
    assert not half.exists() and live.is_dir()
    assert (rig.mountpoint / "a").read_bytes() == b"a" * 10000
    assert rig.ctl(*args).stdout.strip() == ""
    rig.unmount()
    assert rig.ctl(*args).stdout.strip() == ""       # the clean regions the next mount reuses are kept
    rig.mount()
    assert rig.stats()["core"]["inodes"] >= 2


@pytest.mark.parametrize("command,option", [("recover", "fence_cmd"), ("standby", "dead_after")])
def test_a_commands_own_option_without_a_value_is_a_usage_error(rig: Rig, command: str, option: str) -> None:
    """rmemfs-recover's and rmemfs-standby's own -o options are taken out of the mount options by one helper
    (cli/common.take_options); a bare key is one line and exit 2 for both."""
    usage_error(run(cli(command) + ["--backend", str(rig.backend), "--source", "127.0.0.1:1", "-o",
                                    f"port=0,{option}", str(rig.mountpoint)]), option, "needs a value")
