"""Unit level: the baseline store's byte formats, pinned by golden files under tests/golden/.

Each format (fs.json, MANIFEST, segment) is encoded from known inputs and
compared with its golden bytes, and the golden bytes are decoded back to those
inputs, so any format change shows up in review as a changed golden file.
``RMEMFS_REGEN_GOLDEN=1`` rewrites them (only for a deliberate format change,
together with a version bump). ``golden/backend-v1`` is a backend written by
the code before the store package (MANIFEST at the top): it must still load.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from rmemfs import PAGE_SIZE
from rmemfs.errors import CorruptionError
from rmemfs.loader import view_writer
from rmemfs.sources.baseline import load_baseline
from rmemfs.store.base import SegmentSink, SegmentWriter
from rmemfs.store.directory import DirectoryStore
from rmemfs.store.format import (FS_FORMAT, MANIFEST_FORMAT, SEGMENT_VERSION, STATE_CLEAN, STATE_MOUNTED,
                                 Identity, Manifest, SegmentFooter, SegmentHeader, SegmentInfo, decode_secret,
                                 encode_secret, next_manifest)

GOLDEN = Path(__file__).parent / "golden"
FSID = "3b0c3f0e-5a2d-4c1b-9f7e-0123456789ab"
IDENTITY = Identity(FSID, 1_700_000_000_000_000_000)
SECRET = bytes(range(32))


class MemorySink(SegmentSink):
    """A segment written into memory: the smallest SegmentSink there is."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.data = bytearray()
        self.finished = False

    def write(self, data: memoryview) -> None:
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.data.clear()


def golden_segment() -> tuple[bytes, SegmentInfo]:
    sink = MemorySink("seg-000003-0000000007.rseg")
    w = SegmentWriter(sink, FSID, 3, 7, time_ns=1_700_000_000_123_456_789)
    w.add(2, 0, bytes([0xA5]) * PAGE_SIZE + bytes(PAGE_SIZE))          # a data page, then a zero page
    w.add(4, 9, bytes(range(256)) * (PAGE_SIZE // 256))
    info = w.finish()
    assert sink.finished
    return bytes(sink.data), info


def golden_manifest(info: SegmentInfo) -> Manifest:
    return Manifest(FSID, 3, 7, STATE_MOUNTED, {"host": "hostA", "pid": 4242, "exporter_port": 7470},
                    1_700_000_000_999_000_000, {1: 1 << 20, 2: 256 << 20, 4: 256 << 20}, (info,), 2,
                    {"dirty_capacity": 1048576, "region_size": 268435456})


def check_golden(name: str, data: bytes) -> bytes:
    path = GOLDEN / name
    if os.environ.get("RMEMFS_REGEN_GOLDEN"):
        path.write_bytes(data)
    golden = path.read_bytes()
    assert data == golden, f"{name}: the encoding changed; bump its version and regenerate (see the docstring)"
    return golden


def test_versions_are_separate_and_known() -> None:
    assert (FS_FORMAT, MANIFEST_FORMAT, SEGMENT_VERSION) == (1, 1, 1)


def test_fs_json_golden() -> None:
    golden = check_golden("fs.json", IDENTITY.to_bytes())
    assert Identity.from_bytes(golden, "fs.json") == IDENTITY


def test_secret_golden() -> None:
    golden = check_golden("secret", encode_secret(SECRET))
    assert decode_secret(golden, "secret") == SECRET
    with pytest.raises(CorruptionError, match="secret"):
        decode_secret(golden[:40], "secret")


def test_segment_golden() -> None:
    data, info = golden_segment()
    golden = check_golden("seg-000003-0000000007.rseg", data)
    header = SegmentHeader.from_bytes(golden, "golden")
    assert header == SegmentHeader(FSID, 3, 7, 1_700_000_000_123_456_789)
    header.check("golden", FSID, info)
    footer = SegmentFooter.from_bytes(golden[-56:], "golden", len(golden), golden)
    assert (footer.index_offset, footer.entries, footer.data_pages) == (3 * PAGE_SIZE, 3, 2)
    assert (info.bytes, info.entries, info.data_pages) == (len(golden), 3, 2)


def test_manifest_golden() -> None:
    _, info = golden_segment()
    manifest = golden_manifest(info)
    golden = check_golden("MANIFEST", manifest.to_bytes())
    assert Manifest.from_bytes(golden, "MANIFEST") == manifest


def test_golden_segment_loads_through_a_store(tmp_path: Path) -> None:
    """The golden bytes are a segment any store serves: put them in a directory store and load them."""
    data, info = golden_segment()
    root = tmp_path / "b"
    root.mkdir()
    (root / "fs.json").write_bytes(IDENTITY.to_bytes())
    (root / "segments").mkdir()
    (root / "segments" / info.name).write_bytes(data)
    store = DirectoryStore(root)
    images = {2: bytearray(2 * PAGE_SIZE), 4: bytearray(10 * PAGE_SIZE)}
    result = load_baseline(store, golden_manifest(info), view_writer(lambda rid: memoryview(images[rid])))
    assert result.corrupt == [] and result.live.count == 2
    assert images[2][:PAGE_SIZE] == bytes([0xA5]) * PAGE_SIZE
    assert images[4][9 * PAGE_SIZE:] == bytes(range(256)) * (PAGE_SIZE // 256)


def test_backend_written_before_the_store_package_still_loads(tmp_path: Path) -> None:
    root = tmp_path / "backend"
    shutil.copytree(GOLDEN / "backend-v1", root)
    store = DirectoryStore(root)
    assert not store.is_empty()
    m = store.read_manifest()
    assert (m.epoch, m.generation, m.state) == (0, 2, STATE_CLEAN) and store.verify() == []
    region = bytearray(16 * PAGE_SIZE)
    assert load_baseline(store, m, view_writer(lambda rid: memoryview(region))).corrupt == []
    assert region[:PAGE_SIZE] == bytes([0x11]) * PAGE_SIZE and region[2 * PAGE_SIZE:3 * PAGE_SIZE] == bytes([0x44]) * PAGE_SIZE
    mounted = next_manifest(m, epoch=1, generation=3, state=STATE_MOUNTED)
    store.publish(mounted, expect_epoch=0)                # the next mount takes epoch 1 in the new layout
    assert DirectoryStore(root).read_manifest() == mounted
    store.collect_garbage(mounted)
    assert not (root / "MANIFEST").exists() and DirectoryStore(root).verify() == []
