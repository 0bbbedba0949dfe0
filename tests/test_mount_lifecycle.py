"""Real-mount level: dirty tracking as the kernel drives it, clean and unclean endings, crashes inside a flush,
and the mount command's answers to bad input."""
from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from harness import Rig, alive, cli, exporter_pid, run, wait_gone
from rmemfs import PAGE_SIZE
from rmemfs.dirty import list_offset, merge_runs, parse_entries, parse_header, parse_list_count
from rmemfs.regions import EXTENT_PAGES, FIRST_DATA_REGION_ID
from rmemfs.store import open_store
from rmemfs.store.format import with_checksum

pytestmark = pytest.mark.mount


def dirty_runs(regiondir: Path) -> dict[str, list[tuple[int, int, int]]]:
    """Both lists, read straight from the exported ctl region file."""
    raw = (regiondir / "ctl-0000.rgn").read_bytes()
    header = parse_header(raw[:PAGE_SIZE])
    out = {}
    for label, index in (("current", header.active), ("flushing", header.flushing)):
        off = list_offset(index, header.capacity)
        count = parse_list_count(raw[off:off + PAGE_SIZE], header.capacity)
        out[label] = merge_runs(list(parse_entries(raw[off + PAGE_SIZE:off + PAGE_SIZE + 8 * count])))
    return out


def data_pages(runs: list[tuple[int, int, int]]) -> set[tuple[int, int]]:
    return {(r, p) for r, f, n in runs if r >= FIRST_DATA_REGION_ID for p in range(f, f + n)}


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = xxhash.xxh3_64_hexdigest(path.read_bytes())
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root)) + "/"] = "dir"
    return out


def populate(mnt: Path) -> None:
    (mnt / "dir" / "sub").mkdir(parents=True)
    (mnt / "dir" / "sub" / "a").write_bytes(os.urandom(300_000))
    (mnt / "b").write_bytes(b"b" * 5000)
    os.symlink("b", mnt / "link")
    with open(mnt / "mm", "w+b") as f:
        f.truncate(1 << 20)
        with mmap.mmap(f.fileno(), 1 << 20) as m:
            m[4096:4100] = b"mmap"
            m.flush()


def test_msync_of_scattered_pages_marks_exactly_those_pages(rig: Rig) -> None:
    rig.mount(["flush_interval=3600"])
    npages = 256
    path = rig.mountpoint / "f"
    path.write_bytes(os.urandom(npages * PAGE_SIZE))
    rig.flush()
    assert data_pages(dirty_runs(rig.regiondir)["current"]) == set()
    pages = [3, 4, 77, 130, 200, 255]
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), npages * PAGE_SIZE) as m:
        for p in pages:
            m[p * PAGE_SIZE + 10:p * PAGE_SIZE + 20] = b"0123456789"
        m.flush()
    runs = dirty_runs(rig.regiondir)
    marked = data_pages(runs["current"])
    # The file sits in the first 256 pages' extents, in order: map file pages to region pages.
    region, ext0 = FIRST_DATA_REGION_ID, min(p for _, p in marked) // EXTENT_PAGES
    assert marked == {(region, ext0 * EXTENT_PAGES + p) for p in pages}
    assert all(r in (1, FIRST_DATA_REGION_ID) for r, _, _ in runs["current"])    # plus journal pages
    assert runs["flushing"] == []
    # A flush writes exactly the marked pages, then the baseline verifies.
    expected = sum(n for _, _, n in runs["current"])
    rig.flush()
    stats = rig.stats()["flush"]
    assert stats["last_pages"] == expected and stats["last_bytes"] < (expected + 4) * PAGE_SIZE
    assert rig.ctl("verify", "--backend", str(rig.backend)).returncode == 0
    assert dirty_runs(rig.regiondir) == {"current": [], "flushing": []}


def test_clean_unmount_remount_from_regions_then_from_baseline(rig: Rig) -> None:
    rig.mount()
    populate(rig.mountpoint)
    want = digest_tree(rig.mountpoint)
    rig.unmount()
    assert rig.manifest().state == "clean"
    assert not alive(exporter_pid(rig.regiondir))          # a clean unmount also stops the exporter
    proc = rig.mount()
    assert digest_tree(rig.mountpoint) == want
    assert "opened from regions" in proc.stderr
    pid = rig.daemon_pid()
    os.kill(pid, signal.SIGTERM)                          # SIGTERM unmounts cleanly too
    wait_gone(pid)
    assert rig.manifest().state == "clean"
    subprocess.run(["rm", "-rf", str(rig.regiondir)], check=True)   # what a reboot does to /dev/shm
    proc = rig.mount()
    assert digest_tree(rig.mountpoint) == want
    assert "opened from baseline" in proc.stderr


def test_sigkill_leaves_regions_lists_and_exporter_then_recover_remounts(rig: Rig) -> None:
    rig.mount(["flush_interval=3600"])
    populate(rig.mountpoint)
    rig.flush()
    (rig.mountpoint / "after-baseline").write_bytes(b"only in memory")
    want = digest_tree(rig.mountpoint)
    exporter = exporter_pid(rig.regiondir)
    rig.kill()
    assert alive(exporter)
    assert dirty_runs(rig.regiondir)["current"] != []
    assert {p.name for p in rig.regiondir.glob("*.rgn")} >= {"ctl-0000.rgn", "meta-0001.rgn", "data-0002.rgn"}
    status = rig.ctl("exporter", "--backend", str(rig.backend), "--regiondir", str(rig.regiondir))
    assert '"ok": true' in status.stdout
    refused = rig.mount(check=False)
    assert refused.returncode == 11 and "rmemfs-recover" in refused.stderr and len(refused.stderr.splitlines()) == 1
    rig.recover("--no-liveness-check", extra=["port=0"])
    assert digest_tree(rig.mountpoint) == want
    wait_gone(exporter, timeout=10)                       # the old memory is retired once the new mount is up


@pytest.mark.parametrize("point", ["flush.swapped", "flush.segment-partial", "flush.segment-written",
                                   "flush.published", "flush.cleared"])
def test_sigkill_inside_a_flush_keeps_the_last_baseline(rig: Rig, point: str) -> None:
    rig.mount(["flush_interval=3600"])
    populate(rig.mountpoint)
    rig.unmount()
    rig.mount(["flush_interval=3600"], env={"RMEMFS_FAULT": point})
    generation = rig.manifest().generation
    (rig.mountpoint / "big").write_bytes(os.urandom(3 << 20))
    want = digest_tree(rig.mountpoint)
    flush = rig.ctl("flush", str(rig.mountpoint), check=False)
    assert flush.returncode != 0                          # the daemon died inside the flush
    wait_gone(rig.daemon_pid())
    subprocess.run(["fusermount3", "-u", "-z", str(rig.mountpoint)], capture_output=True)
    verify = rig.ctl("verify", "--backend", str(rig.backend), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    published = rig.manifest().generation
    assert published == (generation + 1 if point in ("flush.published", "flush.cleared") else generation)
    rig.recover("--no-liveness-check", "--verify", extra=["port=0"])
    assert digest_tree(rig.mountpoint) == want


# --- bad input -----------------------------------------------------------------------------

def mount_cmd(rig: Rig, backend: Path | None = None, mountpoint: Path | None = None,
              opts: str | None = None) -> list[str]:
    return cli("mount") + ["--backend", str(backend or rig.backend), "-o", opts or rig.opts(),
                           str(mountpoint or rig.mountpoint)]


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr


def test_backend_problems(rig: Rig, tmp_path: Path) -> None:
    one_line_error(run(mount_cmd(rig, backend=tmp_path / "nope")), 10, "does not exist")
    (tmp_path / "file").write_text("x")
    one_line_error(run(mount_cmd(rig, backend=tmp_path / "file")), 10, "not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(ro)], check=True)
    try:
        one_line_error(run(mount_cmd(rig, backend=ro)), 10, str(ro))
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    rig.mount()
    rig.unmount()
    other = run(mount_cmd(rig, opts=rig.opts(["fsid=00000000-0000-0000-0000-000000000000"])))
    one_line_error(other, 10, "holds filesystem")


def test_foreign_backend_directory_is_refused_and_left_alone(rig: Rig) -> None:
    """Issue 15.4: a directory holding someone else's files was adopted, and GC deleted them."""
    (rig.backend / "segments").mkdir()
    thesis = rig.backend / "segments" / "thesis.txt"
    thesis.write_text("years of work")
    one_line_error(rig.mount(check=False), 10, "thesis.txt", "empty directory")
    assert thesis.read_text() == "years of work"
    thesis.unlink()
    (rig.backend / "notes").mkdir()
    one_line_error(rig.mount(check=False), 10, "notes")


def test_backend_files_are_private(rig: Rig) -> None:
    """Issue 15.2: segments were 0644 in a 0755 segments/: any local user could read any file's data."""
    rig.mount()
    (rig.mountpoint / "secret-file").write_bytes(b"x" * 10000)
    rig.flush()
    rig.unmount()
    for dirpath, dirnames, filenames in os.walk(rig.backend):
        for name in dirnames:
            assert os.stat(Path(dirpath) / name).st_mode & 0o777 == 0o700, (dirpath, name)
        for name in filenames:
            assert os.stat(Path(dirpath) / name).st_mode & 0o777 == 0o600, (dirpath, name)


def test_half_created_backend_is_finished_at_the_next_mount(rig: Rig) -> None:
    """Issue 15.11: a backend that filled up between fs.json and MANIFEST said "MANIFEST is missing" forever."""
    rig.mount()
    rig.unmount()
    fsid = open_store(rig.backend).fsid()
    for entry in rig.backend.iterdir():          # keep fs.json and secret: no manifest, no segments
        if entry.name not in ("fs.json", "secret"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    rig.mount()
    assert rig.manifest().fsid == fsid
    (rig.mountpoint / "a").write_bytes(b"works")
    rig.unmount()


def test_missing_or_bad_secret_is_a_backend_error(rig: Rig) -> None:
    """Issue 15.11: a missing or bad secret gave exit 15 (the exporter failed), not 10 (the backend)."""
    rig.mount()
    rig.unmount()
    secret = rig.backend / "secret"
    good = secret.read_bytes()
    secret.unlink()
    one_line_error(rig.mount(check=False), 10, "secret")
    secret.write_bytes(b"zz-not-hex\n")
    os.chmod(secret, 0o600)
    one_line_error(rig.mount(check=False), 10, "secret")
    secret.write_bytes(good[:20] + b"\n")
    one_line_error(rig.mount(check=False), 10, "secret")


def test_manifest_that_checksums_but_does_not_parse_is_named(rig: Rig) -> None:
    """Issue 15.6: a MANIFEST with a valid checksum whose generation is a string left a half-started daemon."""
    rig.mount()
    rig.unmount()
    path = open_store(rig.backend).manifest_path
    body = path.read_bytes().rstrip(b"\n").rpartition(b"\nxxh3:")[0]
    gen = json.loads(body)["generation"]
    path.write_bytes(with_checksum(body.replace(f'"generation": {gen}'.encode(), f'"generation": "{gen}"'.encode())))
    one_line_error(rig.mount(check=False), 10, "MANIFEST", "generation")


def test_mountpoint_problems(rig: Rig, tmp_path: Path) -> None:
    one_line_error(run(mount_cmd(rig, mountpoint=tmp_path / "missing")), 12, "does not exist")
    rig.mount()
    second = Rig(tmp_path / "second")
    try:
        one_line_error(run(mount_cmd(second, mountpoint=rig.mountpoint)), 12, "busy")
    finally:
        second.cleanup()


def test_region_directory_not_in_memory_warns(rig: Rig, tmp_path: Path) -> None:
    rig.regiondir = tmp_path / "regions-on-disk"
    proc = rig.mount()
    assert "not on tmpfs or a DAX mount" in proc.stderr


def test_not_root_and_no_fuse(rig: Rig) -> None:
    os.chmod(rig.root, 0o755)
    as_nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + mount_cmd(rig),
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(
                                   Path(__file__).resolve().parent.parent)}, timeout=60)
    one_line_error(as_nobody, 13, "root")
    hidden = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             "mount -t tmpfs tmpfs /dev && exec \"$@\"", "sh"] + mount_cmd(rig),
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    one_line_error(hidden, 13, "/dev/fuse")


def test_bad_options(rig: Rig) -> None:
    one_line_error(run(mount_cmd(rig, opts="bogus=1")), 2, "bogus")
    one_line_error(run(mount_cmd(rig, opts="flush_interval=abc")), 2, "flush_interval")
    assert sys.executable


def test_ctl_umount_returns_only_once_the_final_baseline_is_published(rig: Rig) -> None:
    rig.mount(["flush_interval=3600"])
    with open(rig.mountpoint / "big", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))              # 64 MiB the final flush has to write
    want = digest_tree(rig.mountpoint)
    pid = rig.daemon_pid()
    proc = run(cli("ctl") + ["umount", str(rig.mountpoint)])
    assert proc.returncode == 0 and "final baseline generation" in proc.stdout, proc.stderr
    assert not alive(pid) and rig.manifest().state == "clean"   # at once: no waiting here
    one_line_error(run(cli("ctl") + ["umount", str(rig.mountpoint)]), 3, "not the root of an rmemfs mount")
    rig.mount()
    assert digest_tree(rig.mountpoint) == want


def test_a_full_journal_region_refuses_creates_but_never_deletes(rig: Rig) -> None:
    """Issue 15 item 7: 1612 long names once made a 1 MiB journal refuse everything, unlink included,
    and the state survived a remount."""
    rig.mount(["meta_size=1M"])
    made = []
    with pytest.raises(OSError) as e:
        for i in range(100_000):
            path = rig.mountpoint / (f"{i:06d}" + "n" * 249)
            path.touch()
            made.append(path)
    assert e.value.errno == errno.ENOSPC and len(made) > 100
    made.pop().unlink()                              # deletes still work while full
    rig.unmount()
    rig.mount(["meta_size=1M"])                      # and after a remount
    for path in made[: len(made) // 2]:
        path.unlink()
    (rig.mountpoint / "after").write_bytes(b"usable again")
    rig.unmount()
    rig.mount(["meta_size=1M"])
    assert (rig.mountpoint / "after").read_bytes() == b"usable again"
    assert len(os.listdir(rig.mountpoint)) == len(made) - len(made) // 2 + 1


def test_a_full_journal_region_grows_at_a_mount_and_recovers(rig: Rig) -> None:
    """Issue 15 item 7: a journal region full of names is made longer by a mount with a larger
    ``-o meta_size``; the moved journal is dirty-tracked, so a SIGKILL right after and a recovery give
    back every name and byte. A smaller value leaves the region as it is."""
    rig.mount(["meta_size=1M", "flush_interval=3600"])
    (rig.mountpoint / "data").write_bytes(b"d" * 50_000)
    made = 0
    with pytest.raises(OSError) as e:
        for made in range(100_000):
            (rig.mountpoint / (f"{made:06d}" + "n" * 249)).touch()
    assert e.value.errno == errno.ENOSPC
    rig.unmount()
    rig.mount(["meta_size=4M", "flush_interval=3600"])
    assert (rig.regiondir / "meta-0001.rgn").stat().st_size == 4 << 20
    for i in range(made):                          # as many again: room the 1M region did not have
        (rig.mountpoint / (f"more{i:06d}" + "m" * 245)).touch()
    want = digest_tree(rig.mountpoint)
    rig.kill()                                     # nothing flushed since the mount: all of it is dirty pages
    rig.recover("--no-liveness-check", extra=["port=0"])
    assert digest_tree(rig.mountpoint) == want and len(os.listdir(rig.mountpoint)) == 2 * made + 1
    rig.unmount()
    shrink = rig.mount(["meta_size=1M"])
    assert "never shrinks" in shrink.stderr
    assert (rig.regiondir / "meta-0001.rgn").stat().st_size == 4 << 20
    assert digest_tree(rig.mountpoint) == want
    rig.unmount()
