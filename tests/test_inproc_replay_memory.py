"""Journal replay must not redo old records' memory effects (extent release, tail zeroing).

Region memory already holds the final state when a filesystem is loaded; the
data written to an extent after it was freed and reused is not journaled, so
replaying the old free/truncate would wipe it. Found by the two-host test.
"""
from __future__ import annotations

import shutil
import stat
import uuid
from pathlib import Path

import pytest

from rmemfs.core import Filesystem
from rmemfs.namespace import ROOT_INO
from rmemfs.regions import RegionSet

REG = stat.S_IFREG | 0o644
CAP = 1 << 16


@pytest.fixture
def fs():
    directory = Path("/dev/shm") / f"rmemfs-test-{uuid.uuid4()}"
    fsid = str(uuid.uuid4())
    regions = Filesystem.create_regions(directory, fsid, capacity=CAP, data_region_size=16 << 20, meta_size=16 << 20)
    yield Filesystem.format(regions, fsid, 1, CAP)
    shutil.rmtree(directory, ignore_errors=True)


def reopen(fs: Filesystem) -> Filesystem:
    regions = RegionSet(fs.regions.directory, data_region_size=16 << 20)
    regions.open_existing()
    return Filesystem.load(regions, fs.fsid, 2)


@pytest.mark.parametrize("case", ["truncate-reuse", "unlink-reuse", "shrink-then-extend"])
def test_replay_keeps_data_written_after_a_free(fs: Filesystem, case: str) -> None:
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"a" * 300_000)                 # two extents
    if case == "shrink-then-extend":
        fs.setattr(f.ino, size=100)
        fs.write(f.ino, 50, b"c" * 1000)
        ino, want = f.ino, b"a" * 50 + b"c" * 1000
    else:
        if case == "truncate-reuse":
            fs.setattr(f.ino, size=0)
        else:
            fs.unlink(ROOT_INO, b"f", directory=False)
            fs.forget(f.ino, 1 << 30)
        g = fs.make(ROOT_INO, b"g", REG, 0, 0)
        fs.write(g.ino, 0, b"b" * 10_000)               # reuses a freed extent
        ino, want = g.ino, b"b" * 10_000
    fs.after_operation()
    assert fs.read(ino, 0, len(want)) == want
    assert reopen(fs).read(ino, 0, len(want)) == want


def test_replay_still_zeroes_past_the_end_after_a_shrink(fs: Filesystem) -> None:
    """A truncate cut off before it zeroed the tail: the reloaded file still reads zeros past the old end."""
    f = fs.make(ROOT_INO, b"f", REG, 0, 0)
    fs.write(f.ino, 0, b"a" * 10_000)
    region_id, ext = fs.inode(f.ino).extents[0]
    fs.setattr(f.ino, size=100)
    view = fs.regions[region_id].view
    start = ext * 256 * 1024
    view[start + 100:start + 10_000] = b"a" * 9_900      # as if the zeroing never ran
    again = reopen(fs)
    again.setattr(f.ino, size=10_000)
    assert again.read(f.ino, 0, 10_000) == b"a" * 100 + bytes(9_900)
