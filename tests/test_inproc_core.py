"""In-process level: the filesystem core and the flusher, without FUSE (as s3ql's t3_fs_api)."""
from __future__ import annotations

import errno
import logging
import os
import random
import stat
import subprocess
import time
import threading
import uuid
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import cast

import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness import private_tmpfs
from rmemfs import PAGE_SIZE
from rmemfs import core as core_module
from rmemfs import fs as fuse
from rmemfs.core import Filesystem
from rmemfs.errors import FsError
from rmemfs.flusher import Flusher
from rmemfs.loader import view_writer
from rmemfs.sources.baseline import load_baseline
from rmemfs.journal import iter_records
from rmemfs.namespace import (RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, SET_CTIME, SET_MTIME, SET_SIZE, SETATTR,
                              rec_setattr)
from rmemfs.regions import EXTENT_PAGES, EXTENT_SIZE, META_REGION_ID, Region, RegionSet
from rmemfs.sources.lazy import Residency
from rmemfs.store.directory import DirectoryStore
from rmemfs.store.live import LiveMap
import trio.lowlevel

REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
CAP = 1 << 16


def new_fs(directory: Path) -> Filesystem:
    fsid = str(uuid.uuid4())
    regions = Filesystem.create_regions(directory, fsid, capacity=CAP, data_region_size=16 << 20,
                                        meta_size=16 << 20)
    return Filesystem.format(regions, fsid, 1, CAP)


def reopen(fs: Filesystem) -> Filesystem:
    """What a restart sees: the region files alone."""
    regions = RegionSet(fs.regions.directory, data_region_size=16 << 20)
    regions.open_existing()
    return Filesystem.load(regions, fs.fsid, 2)


@pytest.fixture
def fs(tmp_path: Path) -> Filesystem:
    return new_fs(shm_dir())


_SHM_MADE: list[Path] = []          # region directories this process's tests made


def shm_dir() -> Path:
    """A new region directory name on tmpfs, removed after the test. Only the ones made here: another
    test process (a second session, a helper's) has directories of its own in /dev/shm, in use."""
    path = Path("/dev/shm") / f"rmemfs-test-{uuid.uuid4()}"
    _SHM_MADE.append(path)
    return path


@pytest.fixture(autouse=True)
def _cleanup_shm() -> Iterator[None]:
    yield
    while _SHM_MADE:
        subprocess.run(["rm", "-rf", str(_SHM_MADE.pop())], check=False)


def err(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


def test_names_and_lookups(fs: Filesystem) -> None:
    with pytest.raises(FsError) as e:
        fs.make(ROOT_INO, b"x" * 256, REG, 0, 0)
    assert err(e) == errno.ENAMETOOLONG
    fs.make(ROOT_INO, b"x" * 255, REG, 0, 0)
    with pytest.raises(FsError) as e:
        fs.make(ROOT_INO, b"x" * 255, REG, 0, 0)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        fs.lookup(ROOT_INO, b"missing")
    assert err(e) == errno.ENOENT


def test_unlinked_open_file_keeps_data_until_last_reference(fs: Filesystem) -> None:
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.open(f.ino)
    fs.write(f.ino, 0, b"data" * 1000)
    used = fs.regions.used_extents()
    fs.unlink(ROOT_INO, b"f", directory=False)
    assert fs.inode(f.ino).nlink == 0 and fs.read(f.ino, 0, 4) == b"data"
    fs.release(f.ino)
    assert fs.regions.used_extents() == used      # the kernel still holds a lookup reference
    fs.forget(f.ino, 1)
    assert f.ino not in fs.ns.inodes and fs.regions.used_extents() == used - 1


def test_rename_rules(fs: Filesystem) -> None:
    a = fs.make(ROOT_INO, b"a", REG, 0, 0)
    b = fs.make(ROOT_INO, b"b", REG, 0, 0)
    d = fs.make(ROOT_INO, b"d", DIR, 0, 0)
    sub = fs.make(d.ino, b"sub", DIR, 0, 0)
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)                 # over an existing file
    assert fs.lookup(ROOT_INO, b"b").ino == a.ino
    # The replaced inode has no name left; it lives on only while the kernel holds a lookup of it.
    replaced = fs.ns.inodes.get(b.ino)
    assert replaced is not None and replaced.nlink == 0 and replaced.lookups > 0
    fs.forget(b.ino, replaced.lookups)
    assert b.ino not in fs.ns.inodes
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"d", sub.ino, b"loop", 0)
    assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"b", ROOT_INO, b"d", 0)
    assert err(e) == errno.EISDIR
    c = fs.make(ROOT_INO, b"c", REG, 0, 0)
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"c", ROOT_INO, b"b", RENAME_NOREPLACE)
    assert err(e) == errno.EEXIST
    fs.rename(ROOT_INO, b"c", ROOT_INO, b"b", RENAME_EXCHANGE)
    assert fs.lookup(ROOT_INO, b"b").ino == c.ino and fs.lookup(ROOT_INO, b"c").ino == a.ino
    fs.rename(d.ino, b"sub", ROOT_INO, b"sub2", 0)
    assert fs.inode(d.ino).nlink == 2 and fs.inode(ROOT_INO).nlink == 4 and fs.inode(sub.ino).parent == ROOT_INO
    with pytest.raises(FsError) as e:
        fs.unlink(ROOT_INO, b"d", directory=False)
    assert err(e) == errno.EISDIR
    fs.make(d.ino, b"x", REG, 0, 0)
    with pytest.raises(FsError) as e:
        fs.unlink(ROOT_INO, b"d", directory=True)
    assert err(e) == errno.ENOTEMPTY
    assert fs.ns.check() == []


class _MarkWitness:
    """A tracker preserver (called at every mark, before the marked pages change): keeps each marked
    page's bytes as they were at its mark."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.seen: dict[tuple[int, int], bytes] = {}

    def preserve(self, region_id: int, first_page: int, npages: int) -> None:
        view = self.fs.regions[region_id].view
        for page in range(first_page, first_page + npages):
            self.seen.setdefault((region_id, page), bytes(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]))


@pytest.mark.parametrize("offset, length", [
    (5 * PAGE_SIZE, PAGE_SIZE),                          # one page inside an extent (the fast path)
    (5 * PAGE_SIZE + 100, 50),                           # part of one page
    (EXTENT_SIZE - PAGE_SIZE, 2 * PAGE_SIZE),            # across two extents the file has
    (3 * EXTENT_SIZE - 10, 20),                          # into an extent not allocated yet (grows the file)
])
def test_every_written_page_is_marked_before_its_bytes_land(fs: Filesystem, offset: int, length: int) -> None:
    ino = fs.make(ROOT_INO, b"f", REG, 0, 0).ino
    fs.write(ino, 0, b"\x11" * (2 * EXTENT_SIZE))
    fs.tracker.swap()
    fs.tracker.flushing.clear()
    witness = _MarkWitness(fs)
    fs.tracker.preserver = witness
    fs.write(ino, offset, b"\x22" * length)
    data_pages = {page for (region_id, page) in witness.seen if region_id != META_REGION_ID}
    inode = fs.inode(ino)
    changed = set()
    for pos in (offset, offset + length - 1):
        region_id, ext = inode.extents[pos // EXTENT_SIZE]
        changed.add((region_id, (ext * EXTENT_SIZE + pos % EXTENT_SIZE) // PAGE_SIZE))
    assert {p for _, p in changed} <= data_pages
    for key in changed:      # at its mark, no byte of the write had landed yet
        assert b"\x22" not in witness.seen[key], key
    listed = {(r, p) for r, first, n in fs.tracker.current.runs() for p in range(first, first + n)}
    assert changed <= listed


def test_pages_written_in_order_widen_one_list_entry(fs: Filesystem) -> None:
    ino = fs.make(ROOT_INO, b"f", REG, 0, 0).ino
    fs.write(ino, 0, bytes(EXTENT_SIZE))
    fs.tracker.swap()
    fs.tracker.flushing.clear()
    for page in (3, 4, 5, 9, 10, 4):
        fs.write(ino, page * PAGE_SIZE, b"x" * PAGE_SIZE)
    region_id, ext = fs.inode(ino).extents[0]
    first = ext * EXTENT_PAGES
    data_runs = [run for run in fs.tracker.current.runs() if run[0] == region_id]
    assert data_runs == [(region_id, first + 3, 3), (region_id, first + 9, 2)]
    assert fs.tracker.current.count == 2          # one entry per run: no journal record either (lazy times)


def test_truncate_and_sparse(fs: Filesystem) -> None:
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.setattr(f.ino, size=1 << 40)                               # LMDB-style huge ftruncate
    assert fs.regions.used_extents() == 0 and fs.read(f.ino, 123 << 30, 8) == bytes(8)
    fs.write(f.ino, 5 << 30, b"z" * 10)
    assert fs.regions.used_extents() == 1
    fs.write(f.ino, 0, b"a" * 10_000)
    fs.setattr(f.ino, size=100)
    fs.setattr(f.ino, size=10_000)
    assert fs.read(f.ino, 0, 10_000) == b"a" * 100 + bytes(9_900)  # the cut tail reads back as zeros
    assert fs.regions.used_extents() == 1


@pytest.mark.parametrize("size,length", [(100, 3000), (EXTENT_SIZE - 5000, 2 * EXTENT_SIZE)],
                         ids=["in-its-extent", "new-extents"])
def test_a_failed_write_past_the_end_leaves_zeros_there(fs: Filesystem, monkeypatch: pytest.MonkeyPatch,
                                                        size: int, length: int) -> None:
    """A write past the end whose size record fails (a full journal) after its bytes landed: a later
    extension, by truncate or by a write further out, reads zeros there (POSIX), also after a replay."""
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"a" * size)
    real_log = fs._log

    def log_all_but_sizes(rtype: int, payload: bytes) -> None:
        if rtype == SETATTR:
            raise FsError(errno.ENOSPC, "the namespace journal region is full (test)")
        real_log(rtype, payload)

    monkeypatch.setattr(fs, "_log", log_all_but_sizes)
    with pytest.raises(FsError) as e:
        fs.write(f.ino, size, b"b" * length)
    assert err(e) == errno.ENOSPC
    monkeypatch.undo()
    assert fs.inode(f.ino).size == size
    fs.setattr(f.ino, size=size + length // 2)
    fs.write(f.ino, size + length + 50, b"c")
    expected = b"a" * size + bytes(length + 50) + b"c"
    assert fs.read(f.ino, 0, 2 * len(expected)) == expected
    again = reopen(fs)
    assert again.read(f.ino, 0, 2 * len(expected)) == expected


def test_a_write_that_fails_part_way_in_a_lazy_load_keeps_the_bytes_of_the_pages_it_claimed(
        fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """During a lazy load, a write claims the whole pages it covers (the loader will not bring them in).
    When a later piece fails (a full region tmpfs), the pieces before it must still be copied, or their
    pages would read as the holes they are, neither the old bytes nor the new."""
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"a" * EXTENT_SIZE)
    region_id, ext = f.extents[0]
    fs.regions[region_id].punch(ext * EXTENT_SIZE, EXTENT_SIZE)   # as after a lazy mount: not loaded yet
    fs.residency = Residency({r.region_id: r.pages for r in fs.regions.data_regions()})
    real_back = fs.regions.back_extent

    def full_but_that_extent(rid: int, e: int) -> None:
        if (rid, e) != (region_id, ext):
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        real_back(rid, e)

    monkeypatch.setattr(fs.regions, "back_extent", full_but_that_extent)
    with pytest.raises(FsError) as e:
        fs.write(f.ino, 0, b"b" * (EXTENT_SIZE + PAGE_SIZE))
    assert err(e) == errno.ENOSPC
    assert fs.residency.is_resident(region_id, ext * EXTENT_PAGES, EXTENT_PAGES)     # claimed
    assert fs.read(f.ino, 0, 2 * EXTENT_SIZE) == b"b" * EXTENT_SIZE


def test_hard_links(fs: Filesystem) -> None:
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.link(f.ino, ROOT_INO, b"g")
    assert fs.inode(f.ino).nlink == 2
    fs.unlink(ROOT_INO, b"f", directory=False)
    assert fs.lookup(ROOT_INO, b"g").ino == f.ino and fs.inode(f.ino).nlink == 1


def test_torn_rename_is_all_or_nothing(fs: Filesystem) -> None:
    d = fs.make(ROOT_INO, b"d", DIR, 0, 0)
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"payload")
    before = fs.journal.pos
    fs.rename(ROOT_INO, b"f", d.ino, b"moved", 0)
    # A crash in the middle of copying the rename record into the meta region:
    end = fs.journal.pos
    fs.regions[META_REGION_ID].view[before + (end - before) // 2:end] = bytes(end - before - (end - before) // 2)
    again = reopen(fs)
    assert b"f" in again.inode(ROOT_INO).entries and not again.inode(d.ino).entries
    assert again.read(f.ino, 0, 7) == b"payload" and again.ns.check() == []


def snapshot(fs: Filesystem) -> dict:
    out = {}
    for ino, i in fs.ns.inodes.items():
        data = fs.read(ino, 0, i.size) if stat.S_ISREG(i.mode) else b""
        out[ino] = (i.mode, i.nlink, i.size, i.mtime_ns, i.parent, i.target, dict(i.entries or {}), data)
    return out


def named(state: dict) -> dict:
    """``snapshot``'s state without the inodes that have no name left (nlink 0)."""
    return {ino: v for ino, v in state.items() if v[1]}


op_strategy = st.lists(st.tuples(
    st.sampled_from(["create", "mkdir", "write", "truncate", "unlink", "rename", "link", "rmdir", "symlink"]),
    st.integers(0, 7), st.integers(0, 3), st.integers(0, 600_000), st.integers(1, 70_000)), max_size=60)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=op_strategy)
@example(ops=[("create", 0, 0, 0, 1), ("write", 0, 0, 0, 5000), ("truncate", 0, 0, 0, 1),   # frees an extent
              ("create", 0, 1, 0, 1), ("write", 0, 1, 0, 5000)])                            # which is reused
def test_replay_rebuilds_exactly_the_live_state(ops: list) -> None:
    fs = new_fs(shm_dir())
    try:
        apply_ops(fs, ops)
        for ino in list(fs.ns.inodes):      # what the kernel would forget after the run
            fs.forget(ino, 1 << 30)
        assert fs.ns.check() == []
        fs.sync_times()                     # as a close, fsync or flush does (overwrites' times are lazy)
        # Take the live state first: the reopened filesystem maps the same region files,
        # so anything its replay wrongly changes in memory would show up on both sides.
        live = snapshot(fs)
        assert snapshot(reopen(fs)) == live
    finally:
        subprocess.run(["rm", "-rf", str(fs.regions.directory)], check=False)


def apply_ops(fs: Filesystem, ops: list, between: Callable[[], None] = lambda: None) -> None:
    """Run op_strategy's operations (each one that fails, as POSIX says, changes nothing); ``between``
    runs after each."""
    names = [f"n{i}".encode() for i in range(8)]
    for kind, a, b, off, length in ops:
        dirs = [i for i, n in fs.ns.inodes.items() if n.is_dir and n.nlink]
        parent = dirs[a % len(dirs)]
        entries = fs.inode(parent).entries or {}
        try:
            if kind == "create":
                # Forgotten at once, as the kernel may: an unlink then frees (and reuse follows).
                fs.forget(fs.make(parent, names[b], REG, 0, 0).ino, 1)
            elif kind == "mkdir":
                fs.make(parent, names[b], DIR, 0, 0)
            elif kind == "symlink":
                fs.make(parent, names[b], stat.S_IFLNK | 0o777, 0, 0, target=b"t" * (length % 300 + 1))
            elif kind in ("write", "truncate") and names[b] in entries:
                ino = entries[names[b]]
                if kind == "write":
                    fs.write(ino, off, bytes([b + 1]) * length)
                else:
                    fs.setattr(ino, size=off)
            elif kind in ("unlink", "rmdir") and names[b] in entries:
                fs.unlink(parent, names[b], directory=kind == "rmdir")
            elif kind == "rename" and names[b] in entries:
                fs.rename(parent, names[b], dirs[(a + 1) % len(dirs)], names[(b + off) % 8], 0)
            elif kind == "exchange" and names[b] in entries:
                fs.rename(parent, names[b], dirs[(a + 1) % len(dirs)], names[(b + off) % 8], RENAME_EXCHANGE)
            elif kind == "link" and names[b] in entries:
                fs.link(entries[names[b]], dirs[(a + 1) % len(dirs)], names[(b + 3) % 8])
            elif kind == "overwrite" and names[b] in entries:      # times kept in memory (TIMES_LAG_S)
                fs.write(entries[names[b]], 0, b"o")
            elif kind == "chmod" and names[b] in entries:
                fs.setattr(entries[names[b]], mode=off & 0o777, uid=length)
        except FsError:
            pass
        fs.after_operation()
        between()


def checkpoint_model(payload: bytes | memoryview) -> tuple[int, dict[int, bytes]]:
    """A checkpoint payload as (next inode number, each inode's serialized part), whatever its order."""
    from rmemfs.namespace import ExtentStore, Namespace, _ck_inode
    ns = Namespace(ExtentStore(lambda *a: None, lambda *a: None, lambda *a: None), EXTENT_SIZE)
    ns.load(memoryview(payload))
    return ns.next_ino, {ino: _ck_inode(i) for ino, i in ns.inodes.items()}


OP_KINDS = ["create", "mkdir", "write", "truncate", "unlink", "rename", "exchange", "link", "rmdir", "symlink",
            "chmod", "overwrite"]


@pytest.mark.parametrize("seed", range(4))
def test_checkpoint_built_in_slices_is_the_namespace_at_its_end(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: a compaction serializes the namespace in slices between operations (so the heartbeat
    keeps beating); whatever the operations in between change, the finished checkpoint is the namespace
    as it is when it is written, inode by inode. Slices of one inode after every operation; 2,000 random
    operations, a checkpoint begun every few and finished after a random number of them."""
    from rmemfs import journal, namespace
    monkeypatch.setattr(namespace, "SLICE_INODES", 1)
    rng = random.Random(seed)
    fs = new_fs(shm_dir())
    try:
        checked = 0
        while checked < 25:
            apply_ops(fs, [(rng.choice(OP_KINDS), rng.randrange(8), rng.randrange(4), rng.randrange(600_000),
                            rng.randrange(1, 70_000)) for _ in range(rng.randrange(1, 10))])
            building = fs.ns.start_checkpoint()
            ops = [(rng.choice(OP_KINDS), rng.randrange(8), rng.randrange(4), rng.randrange(600_000),
                    rng.randrange(1, 70_000)) for _ in range(rng.randrange(1, 80))]
            apply_ops(fs, ops, lambda: fs.ns.building is not None and fs.ns.building.step(0.0))
            assert fs.ns.building is building
            expected = checkpoint_model(fs.ns.serialize())
            fs._checkpoint()
            assert fs.ns.building is None and building.parts
            sb = fs.journal.sb
            assert sb is not None and fs.journal.used_bytes() == fs.journal.checkpoint_bytes
            _, rtype, payload = next(journal.iter_records(fs.journal.view, sb))
            assert checkpoint_model(payload) == expected
            checked += 1
        for ino in list(fs.ns.inodes):      # orphans kept for the kernel's references go at a restart
            fs.forget(ino, 1 << 30)
        live = snapshot(fs)
        assert snapshot(reopen(fs)) == live
    finally:
        subprocess.run(["rm", "-rf", str(fs.regions.directory)], check=False)


def test_a_crash_between_any_two_compaction_slices_replays_the_live_state(
        fs: Filesystem, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Issue 12: the mount's compactor (``compact_journal``) yields the event loop between slices, and
    operations run in between. A crash at any of those points (the region files copied, as a SIGKILL
    leaves them) replays to exactly the state the operations had reached: nothing is written to the
    journal until the checkpoint is whole."""
    import rmemfs.journal as journal
    from rmemfs import namespace
    monkeypatch.setattr(journal, "MIN_LOG_BEFORE_COMPACTION", 64 << 10)
    monkeypatch.setattr(namespace, "SLICE_INODES", 4)
    monkeypatch.setattr(core_module, "COMPACTION_SLICE_S", 0.0)
    d = fs.make(ROOT_INO, b"d", DIR, 0, 0)
    for i in range(300):
        fs.make(d.ino, f"keep{i}".encode(), REG, 0, 0)
    images: list[tuple[bool, Path, dict]] = []
    first_seq = fs.journal.sb.seq

    def take_image(image: Path) -> None:
        """The region files as a SIGKILL now would leave them, and the state a restart must find: the
        named inodes (an unlinked one still open is freed at a restart)."""
        subprocess.run(["cp", "-a", "--sparse=always", str(fs.regions.directory), str(image)], check=True)
        images.append((fs.ns.building is not None, image, named(snapshot(fs))))

    async def operations() -> None:
        for i in range(600):
            f = fs.make(d.ino, f"churn{i}".encode(), REG, 0, 0)
            fs.write(f.ino, 0, b"x" * (i % 5000 + 1))
            fs.after_operation()
            if i % 3 == 0:
                fs.rename(d.ino, f"churn{i}".encode(), ROOT_INO, f"moved{i}".encode(), 0)
            elif i % 3 == 1:
                fs.unlink(d.ino, f"churn{i}".encode(), directory=False)
            fs.after_operation()
            if i % 7 == 0:
                take_image(tmp_path / f"image{i}")
            await trio.lowlevel.checkpoint()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.compact_journal)
            await operations()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert fs.journal.sb.seq > first_seq                   # a compaction was written
    mid_build = [img for img in images if img[0]]
    assert len(mid_build) >= 5, f"only {len(mid_build)} images were taken while a checkpoint was being built"
    for _, image, state in images:
        regions = RegionSet(image, data_region_size=16 << 20)
        regions.open_existing()
        assert named(snapshot(Filesystem.load(regions, fs.fsid, 2))) == state
    assert named(snapshot(reopen(fs))) == named(snapshot(fs))


def test_overwrite_times_are_journaled_lazily_but_never_lost_at_sync_points(
        fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: an overwrite's new mtime/ctime stay in memory (a journal record per write was half of a
    4 KiB write's cost). A restart from the region files alone then sees the data and size exactly and
    the times of the last journaled point; fsync, close, a flush, or any operation once TIMES_LAG_S has
    passed journals them."""
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"a" * 10000)                     # extends the file: journaled at once
    journaled = fs.inode(f.ino).mtime_ns
    time.sleep(0.002)
    fs.write(f.ino, 4096, b"b" * 100)                    # an overwrite
    fs.after_operation()
    assert fs.times_pending and fs.inode(f.ino).mtime_ns > journaled
    crashed = reopen(fs)
    node = crashed.inode(f.ino)
    assert (node.size, node.mtime_ns) == (10000, journaled)
    assert crashed.read(f.ino, 4096, 100) == b"b" * 100
    assert fs.sync_times(f.ino) and not fs.times_pending          # fsync and close do this
    assert reopen(fs).inode(f.ino).mtime_ns == fs.inode(f.ino).mtime_ns
    monkeypatch.setattr(core_module, "TIMES_LAG_S", 0.0)
    fs.write(f.ino, 1, b"c")                             # due at once now
    assert fs.times_pending
    fs.after_operation()
    assert not fs.times_pending and reopen(fs).inode(f.ino).mtime_ns == fs.inode(f.ino).mtime_ns


def test_checkpoint_compaction_keeps_state(fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmemfs.journal as journal
    monkeypatch.setattr(journal, "MIN_LOG_BEFORE_COMPACTION", 4096)
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    first_seq = fs.journal.sb.seq
    for i in range(300):
        fs.write(f.ino, i * 100, b"x" * 100)
        fs.after_operation()
    assert fs.journal.sb.seq > first_seq              # at least one checkpoint compacted the log
    live = snapshot(fs)
    assert snapshot(reopen(fs)) == live


# --- flusher ------------------------------------------------------------------------------


def test_flush_snapshot_from_the_lists_page_maps_is_the_one_from_its_entries(fs: Filesystem) -> None:
    """Issue 12: the flush's atomic section takes the flushing list's pages from its dedup map (a memory
    copy) instead of sorting its entries (120,000 scattered entries: 0.6 s of the event loop); both give
    the same snapshot and the same runs. A list adopted from an earlier process (its entries not in the
    dedup map) has no such copy: the flush sorts its entries, as before."""
    from rmemfs.dirty import DirtyTracker
    from rmemfs.flusher import Snapshot, _clipped
    from rmemfs.regions import CTL_REGION_ID
    rng = random.Random(7)
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"x" * (8 << 20))
    fs.setattr(f.ino, size=2 << 20)                 # frees extents: their pages go to the zero map
    tracker = fs.tracker
    data = max(fs.regions.regions)
    for _ in range(500):
        tracker.mark(data, rng.randrange(4000), rng.randrange(1, 40))
    tracker.swap()
    regions = {rid: r.length for rid, r in fs.regions.regions.items() if rid != CTL_REGION_ID}
    by_entries = Snapshot(_clipped(tracker.flushing.runs(), regions), fs.regions)
    named = tracker.flushing.pages_named()
    assert named is not None
    by_maps = Snapshot(named.copy(), fs.regions)
    assert by_maps.pending == by_entries.pending and by_maps.zero == by_entries.zero and by_maps.zero
    assert named.runs() == _clipped(tracker.flushing.runs(), regions)
    adopted = DirtyTracker(fs.regions[CTL_REGION_ID].view, tracker.capacity)    # as a restart finds the lists
    assert adopted.flushing.count and adopted.flushing.pages_named() is None
    adopted.flushing.clear()
    assert adopted.flushing.pages_named() == {}


def _hold_the_loop_for_a_while() -> None:
    time.sleep(0.4)


async def test_stall_trace_logs_every_threads_stack_once_per_stall(fs: Filesystem, tmp_path: Path) -> None:
    """-o stall_trace: a loop held past the threshold leaves the stacks in the log, naming what held it
    (faulthandler's watchdog runs without the GIL); a loop that beats on in time writes nothing."""
    from rmemfs.session import _heartbeat
    from rmemfs.stalls import Lateness
    log_path = tmp_path / "rmemfs.log"
    root = logging.getLogger()
    handler = logging.StreamHandler(open(log_path, "a", buffering=1))   # noqa: ASYNC230 - the test's own setup
    old_handlers = root.handlers[:]
    root.handlers[:] = [handler]        # the trace goes to the log's file, as a daemon's does
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_heartbeat, fs, 0.01, Lateness(), 0.15)
            await trio.sleep(0.3)                                       # beating in time: nothing
            assert "Timeout" not in log_path.read_text()
            _hold_the_loop_for_a_while()
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    finally:
        root.handlers[:] = old_handlers
        handler.stream.close()
    text = log_path.read_text()
    assert text.count("Timeout (0:00:00.150000)!") == 1, text
    assert "_hold_the_loop_for_a_while" in text


def backend_for(fs: Filesystem, path: Path) -> tuple[DirectoryStore, Flusher]:
    path.mkdir(exist_ok=True)
    backend = DirectoryStore(path)
    manifest = backend.create({}, regions={})
    # Adopt the filesystem under the backend's id, as a mount does.
    fs.fsid = manifest.fsid
    return backend, Flusher(fs, backend, manifest, LiveMap(), interval=3600)


def baseline_image(backend: DirectoryStore, fs: Filesystem) -> dict[int, bytearray]:
    images = {rid: bytearray(r.length) for rid, r in fs.regions.regions.items()}
    result = load_baseline(backend, backend.read_manifest(), view_writer(lambda rid: memoryview(images[rid])))
    assert result.corrupt == []
    return images


async def test_flush_writes_only_dirty_pages_and_verifies(fs: Filesystem, tmp_path: Path) -> None:
    backend, flusher = backend_for(fs, tmp_path / "b")
    await flusher.flush()
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, os.urandom(64 * PAGE_SIZE))
    await flusher.flush()
    for p in (3, 17, 40):
        fs.write(f.ino, p * PAGE_SIZE + 5, b"!")
    fs.sync_times()                 # the flush would journal the overwrites' times first
    marked = fs.tracker.current.runs()
    await flusher.flush()
    stats = flusher.statistics()
    data_pages = [r for r in marked if r[0] >= 2]
    assert sorted((f_, n) for _, f_, n in data_pages) == [(3, 1), (17, 1), (40, 1)]
    assert stats.last_pages == sum(n for _, _, n in marked)
    assert fs.tracker.current.count == 0 and fs.tracker.flushing.count == 0
    assert backend.verify() == []
    images = baseline_image(backend, fs)
    for rid, region in fs.regions.regions.items():
        if rid != 0:
            assert images[rid] == region.view, f"region {rid} differs from its baseline"


async def test_full_flush_rewrites_every_live_page_and_the_dirty_ones_in_one_segment(
        fs: Filesystem, tmp_path: Path) -> None:
    """A full flush (the compaction of a backend's segments) publishes one segment holding every live page
    and every dirty one, taken from page maps in the atomic section (issue 12: merging the live map's runs
    on the event loop held it for 60-80 ms); the baseline is the filesystem, page for page."""
    backend, flusher = backend_for(fs, tmp_path / "b")
    rng = random.Random(3)
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, os.urandom(4 << 20))
    await flusher.flush()
    for _ in range(200):                       # dirty pages beside (and over) the live ones, and past them
        fs.write(f.ino, rng.randrange(6 << 20), os.urandom(rng.randrange(1, 3 * PAGE_SIZE)))
    fs.sync_times()
    live_before = flusher.live.count
    dirty = {(r, p) for r, first, n in fs.tracker.current.runs() for p in range(first, first + n)}
    await flusher.flush(full=True)
    m = backend.read_manifest()
    stats = flusher.statistics()
    assert len(m.segments) == 1 and stats.last_full
    live = {(r, a + i) for r, a, n in flusher.live.runs() for i in range(n)}
    assert stats.last_pages >= max(live_before, len(dirty)) and dirty - live <= {
        (r, p) for r, p in dirty if not any(fs.regions[r].view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])}
    assert backend.verify() == []
    images = baseline_image(backend, fs)
    for rid, region in fs.regions.regions.items():
        if rid != 0:
            assert images[rid] == region.view, f"region {rid} differs from its baseline"


async def test_write_during_flush_lands_on_new_list_and_baseline_is_the_swap_instant(
        fs: Filesystem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, flusher = backend_for(fs, tmp_path / "b")
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"A" * (8 * PAGE_SIZE))
    go, inside = threading.Event(), threading.Event()
    real = flusher._write_segment

    def paused(*args: object) -> object:
        inside.set()
        assert go.wait(10)
        return real(*args)

    monkeypatch.setattr(flusher, "_write_segment", paused)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.flush)
        await trio.to_thread.run_sync(inside.wait)
        fs.write(f.ino, 2 * PAGE_SIZE, b"B" * PAGE_SIZE)        # during the flush
        region_id, ext = f.extents[0]
        page = ext * EXTENT_PAGES + 2
        assert any(r[0] == region_id and r[1] <= page < r[1] + r[2] for r in fs.tracker.current.runs())
        go.set()
    images = baseline_image(backend, fs)
    (region_id, ext) = f.extents[0]
    base = ext * 64 * PAGE_SIZE
    # The published generation is the filesystem as it was at the swap: no "B" yet.
    assert bytes(images[region_id][base + 2 * PAGE_SIZE:base + 3 * PAGE_SIZE]) == b"A" * PAGE_SIZE
    assert fs.read(f.ino, 2 * PAGE_SIZE, 1) == b"B"
    assert fs.tracker.current.count > 0                          # kept for the next generation
    monkeypatch.setattr(flusher, "_write_segment", real)
    await flusher.flush()
    images = baseline_image(backend, fs)
    assert bytes(images[region_id][base + 2 * PAGE_SIZE:base + 3 * PAGE_SIZE]) == b"B" * PAGE_SIZE


@pytest.fixture
def tiny_backend(tmp_path: Path) -> Iterator[Path]:
    with private_tmpfs(tmp_path / "tiny", "1M", mode="0755") as path:
        yield path


async def test_full_backend_keeps_marks_and_retries(fs: Filesystem, tiny_backend: Path) -> None:
    backend, flusher = backend_for(fs, tiny_backend)
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    payload = os.urandom(2 << 20)
    fs.write(f.ino, 0, payload)
    with pytest.raises(OSError) as e:
        await flusher.flush()
    assert e.value.errno == errno.ENOSPC
    assert fs.tracker.flushing.count > 0 and flusher.statistics().failures == 1
    assert backend.read_manifest().generation == 0 and backend.verify() == []
    fs.write(f.ino, 4 << 20, b"late")                              # keeps working meanwhile
    subprocess.run(["mount", "-o", "remount,size=64M", str(tiny_backend)], check=True)  # noqa: ASYNC221 - the test's own step
    await flusher.flush()
    assert fs.tracker.flushing.count == 0 and fs.tracker.current.count == 0
    images = baseline_image(backend, fs)
    region_id, ext = f.extents[0]
    assert bytes(images[region_id][ext * 64 * PAGE_SIZE:ext * 64 * PAGE_SIZE + 100]) == payload[:100]
    assert backend.verify() == []


async def test_flush_records_freed_pages_as_zeros_without_bringing_their_memory_back(
        fs: Filesystem, tmp_path: Path) -> None:
    backend, flusher = backend_for(fs, tmp_path / "b")
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, os.urandom(40 * EXTENT_SIZE))
    await flusher.flush()
    resident = fs.regions.stats().resident_bytes
    region_id, ext = f.extents[0]
    fs.unlink(ROOT_INO, b"f", directory=False)
    fs.forget(f.ino, f.lookups)                          # the kernel's last reference: freed now
    assert f.ino not in fs.ns.inodes
    freed = fs.regions.stats().resident_bytes
    assert freed <= resident - 39 * EXTENT_SIZE          # (the journal grew by a page or two)
    await flusher.flush()                               # writes the freed pages as zero pages
    assert fs.regions.stats().resident_bytes == freed   # without reading them back into memory
    images = baseline_image(backend, fs)
    assert bytes(images[region_id][ext * EXTENT_SIZE:(ext + 40) * EXTENT_SIZE]) == bytes(40 * EXTENT_SIZE)


# --- a full journal region ----------------------------------------------------------------

def full_journal() -> tuple[Filesystem, list[bytes]]:
    """A filesystem with a 1 MiB journal region filled with long names until a create got ENOSPC."""
    fsid = str(uuid.uuid4())
    directory = shm_dir()
    regions = Filesystem.create_regions(directory, fsid, capacity=CAP, data_region_size=16 << 20,
                                        meta_size=1 << 20)
    fs = Filesystem.format(regions, fsid, 1, CAP)
    names = []
    with pytest.raises(FsError) as e:
        for i in range(100_000):
            name = f"{i:06d}".encode() + b"n" * 249
            fs.make(ROOT_INO, name, REG, 0, 0)
            fs.after_operation()
            names.append(name)
    assert err(e) == errno.ENOSPC and len(names) > 100
    return fs, names


def test_full_journal_refuses_growth_but_deletes_and_checkpoints_keep_working() -> None:
    """Issue 15 item 7: long names once filled a 1 MiB journal so that nothing worked, not even unlink."""
    fs, names = full_journal()
    # Every existing name can still go, and what is freed can be used again.
    for name in names[:len(names) // 2]:
        fs.unlink(ROOT_INO, name, directory=False)
        fs.after_operation()
    f = fs.make(ROOT_INO, b"after", REG, 0, 0)
    fs.write(f.ino, 0, b"still works")
    for name in names[len(names) // 2:]:
        fs.unlink(ROOT_INO, name, directory=False)
        fs.after_operation()
    again = reopen(fs)
    assert again.read(again.lookup(ROOT_INO, b"after").ino, 0, 100) == b"still works"
    assert [n for n, _ in again.readdir(ROOT_INO)] == [b"after"]


@pytest.mark.parametrize("active_area", [0, 1])
@pytest.mark.parametrize("new_size", [1 << 21, (1 << 20) + (256 << 10)], ids=["2M", "1.25M"])
def test_a_full_journal_region_grows_and_every_moved_byte_is_marked(active_area: int, new_size: int) -> None:
    """Issue 15 item 7: a full journal region can be made longer (``-o meta_size`` at a mount). The active
    area moves into the new layout by checkpoints; every page that changed is on the dirty list (so a
    recovery from this host gets it), the namespace replays from the grown region, and the room freed
    takes new names. Both old areas as the active one, and growth by less than double."""
    fs, names = full_journal()
    fsid = fs.fsid
    if (fs.journal.sb.area_offset != fs.journal.areas[0][0]) != bool(active_area):
        fs.journal.checkpoint(fsid, fs.ns.serialize())
    assert fs.journal.sb.area_offset == fs.journal.areas[active_area][0]
    meta = fs.regions[META_REGION_ID]
    before = bytes(meta.view)
    fs.tracker.swap()            # start from an empty current list: what the growth marks is all it holds
    fs.tracker.flushing.clear()
    fs.grow_journal(new_size)
    after = bytes(meta.view)
    changed = {p for p in range(new_size // PAGE_SIZE)
               if after[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] != before[p * PAGE_SIZE:(p + 1) * PAGE_SIZE].ljust(PAGE_SIZE, b"\0")}
    marked = {p for rid, first, n in fs.tracker.current.runs() if rid == META_REGION_ID for p in range(first, first + n)}
    assert changed and changed <= marked
    assert fs.journal.sb.area_offset == fs.journal.areas[1][0]
    more = [f"more{i:06d}".encode() + b"m" * 245 for i in range(len(names) // 10)]
    for name in more:                           # the grown journal takes names again
        fs.make(ROOT_INO, name, REG, 0, 0)
        fs.after_operation()
    again = reopen(fs)
    assert sorted(n for n, _ in again.readdir(ROOT_INO)) == sorted(names + more)


async def test_failed_flushes_do_not_fill_the_list_with_the_same_pages(fs: Filesystem, tiny_backend: Path) -> None:
    """Issue 10 item 5a: each failed flush folded the current list into the flushing one without
    deduplicating, so a writer rewriting the same pages during a backend outage filled the list for good."""
    backend, flusher = backend_for(fs, tiny_backend)
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    pages = range(0, 3000, 2)                      # scattered: one list entry each
    rounds = fs.tracker.current.capacity // len(pages) + 5
    for round_no in range(rounds):
        for page in pages:
            fs.write(f.ino, page * PAGE_SIZE, (round_no + 1).to_bytes(4, "little"))   # never a zero page
        with pytest.raises(OSError) as e:          # the backend is full: the flush fails, marks are kept
            await flusher.flush()
        assert e.value.errno == errno.ENOSPC
        assert fs.tracker.flushing.count <= 2 * len(pages)
    subprocess.run(["mount", "-o", "remount,size=64M", str(tiny_backend)], check=True)  # noqa: ASYNC221 - the test's own step
    await flusher.flush()
    assert fs.tracker.flushing.count == 0 and fs.tracker.current.count == 0
    images = baseline_image(backend, fs)
    region_id, ext = f.extents[0]
    base = ext * EXTENT_SIZE
    assert all(bytes(images[region_id][base + p * PAGE_SIZE:base + p * PAGE_SIZE + 4]) ==
               rounds.to_bytes(4, "little") for p in pages[:10])
    assert backend.verify() == []


# --- freed extents kept backed for reuse (issue 14: SQLite's DELETE journal) -----------------------------

def _extent_bytes(fs: Filesystem, loc: tuple[int, int]) -> bytes:
    return bytes(fs.regions[loc[0]].view[loc[1] * EXTENT_SIZE:(loc[1] + 1) * EXTENT_SIZE])


def test_a_small_freed_extent_is_zeroed_and_reused_without_allocating_again(
        fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    f = fs.make(ROOT_INO, b"journal", REG, 0, 0)
    fs.write(f.ino, 0, b"a" * 512)
    fs.write(f.ino, 4096, os.urandom(4620))          # up to 8716: three pages, as a commit's journal
    loc = f.extents[0]
    fs.unlink(ROOT_INO, b"journal", directory=False)
    fs.forget(f.ino, f.lookups)
    assert f.ino not in fs.ns.inodes
    assert fs.regions.reusable_extents() == 1
    assert _extent_bytes(fs, loc) == bytes(EXTENT_SIZE)
    assert (loc[0], loc[1] * EXTENT_PAGES) in {(r, p) for r, p, _ in fs.tracker.current.runs()}
    allocations: list[tuple[int, int]] = []
    real = Region.allocate
    monkeypatch.setattr(Region, "allocate", lambda self, off, n: (allocations.append((off, n)), real(self, off, n))[1])
    g = fs.make(ROOT_INO, b"journal", REG, 0, 0)
    fs.write(g.ino, 0, b"b")
    assert g.extents[0] == loc and allocations == [] and fs.regions.reusable_extents() == 0
    fs.setattr(g.ino, size=EXTENT_SIZE)                 # what the old file wrote reads as zeros
    assert fs.read(g.ino, 0, EXTENT_SIZE) == b"b" + bytes(EXTENT_SIZE - 1)


def test_a_large_freed_extent_and_one_loaded_in_use_are_punched_not_kept(fs: Filesystem) -> None:
    big = fs.make(ROOT_INO, b"big", REG, 0, 0)
    fs.write(big.ino, 0, os.urandom(EXTENT_SIZE))    # more of it used than is worth zeroing
    fs.unlink(ROOT_INO, b"big", directory=False)
    fs.forget(big.ino, big.lookups)
    assert fs.regions.reusable_extents() == 0
    small = fs.make(ROOT_INO, b"small", REG, 0, 0)
    fs.write(small.ino, 0, b"s" * 100)
    fs2 = reopen(fs)                                  # an extent in use at a load is not known to be fresh
    fs2.unlink(ROOT_INO, b"small", directory=False)
    assert small.ino not in fs2.ns.inodes
    assert fs2.regions.reusable_extents() == 0


def test_a_failed_write_past_the_end_leaves_its_extent_zeros_past_the_size_for_reuse(
        fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"x" * 4096)
    loc = f.extents[0]

    def full(rtype: int, payload: bytes) -> None:
        raise FsError(errno.ENOSPC, "journal full")
    monkeypatch.setattr(fs, "_log", full)
    with pytest.raises(FsError):
        fs.write(f.ino, 8192, b"y" * 4096)           # the data is in, the size record is not
    monkeypatch.undo()
    assert f.size == 4096
    fs.unlink(ROOT_INO, b"f", directory=False)
    fs.forget(f.ino, f.lookups)
    assert fs.regions.reusable_extents() == 1         # the failed write's bytes were zeroed again
    assert _extent_bytes(fs, loc) == bytes(EXTENT_SIZE)


def test_extents_kept_for_reuse_are_punched_by_a_load(fs: Filesystem) -> None:
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"x" * 100)
    fs.unlink(ROOT_INO, b"f", directory=False)
    fs.forget(f.ino, f.lookups)
    assert fs.regions.reusable_extents() == 1
    resident = fs.regions.stats().resident_bytes
    fs2 = reopen(fs)
    assert fs2.regions.reusable_extents() == 0
    assert fs2.regions.stats().resident_bytes <= resident - EXTENT_SIZE


def test_a_write_past_the_end_journals_the_setattr_record_of_its_size_and_times(fs: Filesystem) -> None:
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"abc")
    fs.write(f.ino, 3, b"defg")
    *_, (_, rtype, payload) = iter_records(fs.journal.view, fs.journal.sb)
    assert (rtype, bytes(payload)) == rec_setattr(f.ino, SET_SIZE | SET_MTIME | SET_CTIME, size=7,
                                                  mtime=f.mtime_ns, ctime=f.ctime_ns)
    assert reopen(fs).read(f.ino, 0, 100) == b"abcdefg"


async def test_a_missing_name_is_a_negative_entry_the_kernel_may_cache(fs: Filesystem) -> None:
    ops = fuse.Operations(fs)
    ctx = cast(pyfuse3.RequestContext, None)
    missing = await ops.lookup(ROOT_INO, b"x.sqlite-journal", ctx)
    assert missing.st_ino == 0 and missing.entry_timeout > 0
    f = fs.make(ROOT_INO, b"x.sqlite-journal", REG, 0, 0)
    found = await ops.lookup(ROOT_INO, b"x.sqlite-journal", ctx)
    assert found.st_ino == f.ino and f.lookups == 2
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(f.ino, b"x", ctx)                # not a directory: still an error
    assert e.value.errno == errno.ENOTDIR
