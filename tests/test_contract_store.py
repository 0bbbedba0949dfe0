"""Contract suite: every baseline store implementation passes the same cases.

Each kind in ``STORES`` gives an opener (each call is a new instance: another
process or host on the same store) and a ``Tamper`` for raw access that the
interface deliberately lacks (corrupting objects, leaving crash leftovers,
planting foreign objects). A new store (e.g. RADOS) joins by appending a
``StoreKind`` here, or without editing this file by naming a factory in
``RMEMFS_CONTRACT_STORES=module:function`` (the function returns a list of
``StoreKind``; it may skip when its service is absent).

Cases: round trips (manifest, segments, readinto, readv), corruption detection
(a flipped page byte, a truncated segment, bad header fields, a bad or
ill-typed manifest), crashes between steps (aborted writers, partial objects,
a publish or claim that dies at each step), concurrent publishers of two
epochs with pauses injected between the compare-and-swap steps, and garbage
collection never deleting another epoch's segments or foreign objects.
"""
from __future__ import annotations

import importlib
import os
import random
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
import xxhash

from rmemfs import PAGE_SIZE
from rmemfs.errors import BackendError, CorruptionError, FencedError
from rmemfs.store.base import BaselineStore
from rmemfs.store.directory import DirectoryStore
from rmemfs.store.format import (SEG_HEAD, STATE_MOUNTED, Manifest, next_manifest, segment_name,
                                 with_checksum)

REGION = 2
REGION_PAGES = 32


class Tamper:
    """Raw access to one store's objects, for tests only."""

    def read_segment(self, store: BaselineStore, name: str) -> bytes:
        raise NotImplementedError

    def write_segment(self, store: BaselineStore, name: str, data: bytes) -> None:
        """Replace segment ``name`` with ``data`` as it is (no format, no checksum)."""
        raise NotImplementedError

    def read_manifest(self, store: BaselineStore) -> bytes:
        raise NotImplementedError

    def write_manifest(self, store: BaselineStore, data: bytes) -> None:
        raise NotImplementedError

    def add_foreign(self, store: BaselineStore) -> Callable[[], bool]:
        """Plant objects that are not the store's (next to its segments); returns 'are they all still there'."""
        raise NotImplementedError


class DirectoryTamper(Tamper):
    def read_segment(self, store: BaselineStore, name: str) -> bytes:
        assert isinstance(store, DirectoryStore)
        return (store.segdir / name).read_bytes()

    def write_segment(self, store: BaselineStore, name: str, data: bytes) -> None:
        assert isinstance(store, DirectoryStore)
        (store.segdir / name).write_bytes(data)

    def read_manifest(self, store: BaselineStore) -> bytes:
        assert isinstance(store, DirectoryStore)
        return store.manifest_path.read_bytes()

    def write_manifest(self, store: BaselineStore, data: bytes) -> None:
        assert isinstance(store, DirectoryStore)
        store.manifest_path.write_bytes(data)

    def add_foreign(self, store: BaselineStore) -> Callable[[], bool]:
        assert isinstance(store, DirectoryStore)
        store.segdir.mkdir(exist_ok=True)
        planted = [store.segdir / "thesis.txt", store.segdir / "seg-notes.rseg", store.segdir / ".hidden.tmp"]
        for p in planted:
            p.write_text("not rmemfs's")
        (store.segdir / "chapters").mkdir()
        planted.append(store.segdir / "chapters")
        return lambda: all(p.exists() for p in planted)


@dataclass(frozen=True)
class StoreKind:
    name: str
    make: Callable[[Path], Callable[[], BaselineStore]]    # tmp_path -> opener of one fresh store
    tamper: Tamper


def _directory(tmp_path: Path) -> Callable[[], BaselineStore]:
    root = tmp_path / "backend"
    root.mkdir()
    return lambda: DirectoryStore(root)


class RadosTamper(Tamper):
    """Raw access through the store's own ioctx: a segment is rewritten as one part plus a matching head."""

    def read_segment(self, store: BaselineStore, name: str) -> bytes:
        buf = bytearray(store.open_segment(name).size)
        store.open_segment(name).readinto(0, memoryview(buf))
        return bytes(buf)

    def write_segment(self, store: BaselineStore, name: str, data: bytes) -> None:
        import json
        s: Any = store
        s.delete_segment(name)
        s.io.write_full(s._o(f"part.{name}.00000"), data)
        s.io.write_full(s._o(f"seg.{name}"), json.dumps({"size": len(data), "parts": 1,
                                                           "part_size": max(len(data), 1)}).encode())

    def _newest(self, store: BaselineStore) -> str:
        s: Any = store
        return s._o(f"epoch.{s._epochs()[0]:010d}")

    def read_manifest(self, store: BaselineStore) -> bytes:
        s: Any = store
        return bytes(s.io.read(self._newest(store), 1 << 20))

    def write_manifest(self, store: BaselineStore, data: bytes) -> None:
        s: Any = store
        s.io.write_full(self._newest(store), data)

    def add_foreign(self, store: BaselineStore) -> Callable[[], bool]:
        s: Any = store
        planted = [s._o(n) for n in ("thesis.txt", "seg.notes", "part.x")]
        for key in planted:
            s.io.write_full(key, b"not rmemfs's")

        def there() -> bool:
            try:
                return all(s.io.stat(key) for key in planted)
            except Exception:
                return False
        return there


_CEPH: list[Any] = []      # the session's cluster, set by the kind fixture when a rados case runs


def _rados(tmp_path: Path) -> Callable[[], BaselineStore]:
    from rmemfs.store.rados import RadosStore
    c = _CEPH[0]
    prefix = f"contract-{uuid.uuid4().hex[:12]}"
    return lambda: RadosStore(f"{c.pool}/{prefix}", ceph_conf=str(c.conf), ceph_id=c.admin_id)


STORES: list[StoreKind] = [StoreKind("directory", _directory, DirectoryTamper()),
                           StoreKind("rados", _rados, RadosTamper())]
for spec in filter(None, os.environ.get("RMEMFS_CONTRACT_STORES", "").split(",")):
    module, _, func = spec.partition(":")
    STORES.extend(getattr(importlib.import_module(module), func)())


@pytest.fixture(params=STORES, ids=[k.name for k in STORES])
def kind(request: pytest.FixtureRequest) -> StoreKind:
    if request.param.name == "rados":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
        import cephcluster
        missing = cephcluster.missing_packages()
        if missing:
            pytest.skip(f"ceph packages missing ({', '.join(missing)}): tools/setup installs them")
        request.applymarker(pytest.mark.ceph)
        if not _CEPH:
            _CEPH.append(request.getfixturevalue("ceph_cluster"))
    return request.param


@pytest.fixture
def opener(kind: StoreKind, tmp_path: Path) -> Callable[[], BaselineStore]:
    return kind.make(tmp_path)


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def create(opener: Callable[[], BaselineStore]) -> tuple[BaselineStore, Manifest]:
    store = opener()
    assert store.is_empty()
    return store, store.create({"dirty_capacity": 64}, regions={REGION: REGION_PAGES * PAGE_SIZE})


def flush(store: BaselineStore, prev: Manifest, pages: dict[int, bytes], *, full: bool = False,
          gc: bool = False) -> Manifest:
    """One flush of the owner: a segment of ``pages`` (page number -> content), then publish."""
    generation = prev.generation + 1
    w = store.new_segment(prev.fsid, prev.epoch, generation)
    for p in sorted(pages):
        w.add(REGION, p, memoryview(pages[p]))
    info = w.finish()
    new = next_manifest(prev, generation=generation, segments=((info,) if full else prev.segments + (info,)))
    store.publish(new, expect_epoch=prev.epoch)
    if gc:
        store.collect_garbage(new)
    return new


def takeover(store: BaselineStore, base: Manifest) -> Manifest:
    new = next_manifest(base, epoch=base.epoch + 1, generation=base.generation + 1, state=STATE_MOUNTED,
                        owner={"host": "other", "pid": 1})
    store.publish(new, expect_epoch=base.epoch)
    return new


# --- round trips --------------------------------------------------------------------

def test_manifest_round_trip_and_identity(opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    other = opener()
    assert other.read_manifest() == m and other.fsid() == m.fsid and str(uuid.UUID(m.fsid)) == m.fsid
    assert len(other.secret()) == 32 and other.secret() == store.secret()
    assert not other.is_empty()


def test_segment_round_trip_readinto_and_readv(opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1), 1: page(2), 5: bytes(PAGE_SIZE), 6: page(3)})
    info = m.segments[0]
    assert info.data_pages == 3 and info.entries == 4
    reader_store = opener()
    assert reader_store.list_segments() == [info.name]
    entries = reader_store.read_index(info)
    assert [e[0] & 0xFFFF for e in entries] == [0, 1, 5, 6]
    with reader_store.open_segment(info.name) as r:
        assert r.size == info.bytes
        one = bytearray(PAGE_SIZE)
        r.readinto(entries[1][2], memoryview(one))
        assert bytes(one) == page(2)
        a, b = bytearray(PAGE_SIZE), bytearray(10)
        r.readv([(entries[3][2], memoryview(a)), (entries[0][2] + 5, memoryview(b))])
        assert bytes(a) == page(3) and bytes(b) == page(1)[:10]
        with pytest.raises(CorruptionError, match=info.name):
            r.readinto(info.bytes - 4, memoryview(bytearray(8)))           # past the end: never short data
    buf = bytearray(PAGE_SIZE)
    reader_store.readinto(info.name, entries[0][2], memoryview(buf))
    assert bytes(buf) == page(1)
    assert reader_store.verify() == []


def test_missing_segment_is_named(opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    with pytest.raises(CorruptionError, match="seg-000000-0000000009.rseg"):
        store.open_segment(segment_name(0, 9))


# --- corruption -------------------------------------------------------------------

def test_flipped_page_byte_is_found(kind: StoreKind, opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {3: page(7), 4: page(8)})
    name = m.segments[0].name
    raw = bytearray(kind.tamper.read_segment(store, name))
    raw[PAGE_SIZE + 100] ^= 0xFF
    kind.tamper.write_segment(store, name, bytes(raw))
    problems = opener().verify()
    assert len(problems) == 1 and name in problems[0] and "page 3" in problems[0]


def test_truncated_segment_is_refused(kind: StoreKind, opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {3: page(7)})
    name = m.segments[0].name
    raw = kind.tamper.read_segment(store, name)
    for size in (len(raw) - 1, PAGE_SIZE + 10, 20, 0):
        kind.tamper.write_segment(store, name, raw[:size])
        with pytest.raises(CorruptionError, match=name):
            opener().read_index(m.segments[0])
        m2 = replace(m, segments=(replace(m.segments[0], bytes=size),))      # even if the manifest agreed
        with pytest.raises(CorruptionError, match=name):
            opener().read_index(m2.segments[0])


def _rewrite_header(raw: bytes, **fields: object) -> bytes:
    """The segment with header fields changed and a valid header checksum (in the footer too)."""
    names = ("magic", "version", "page_size", "fsid", "epoch", "generation", "time_ns")
    values = dict(zip(names, SEG_HEAD.unpack_from(raw), strict=True))
    values.update(fields)
    head = SEG_HEAD.pack(*(values[n] for n in names))
    head_xxh = xxhash.xxh3_64_intdigest(head)
    out = bytearray(raw)
    out[:SEG_HEAD.size + 8] = head + struct.pack("<Q", head_xxh)
    foot_at = len(raw) - 56
    struct.pack_into("<Q", out, foot_at + 40, head_xxh)                    # footer field: header xxh3
    struct.pack_into("<Q", out, foot_at + 48, xxhash.xxh3_64_intdigest(bytes(out[foot_at:foot_at + 48])))
    return bytes(out)


@pytest.mark.parametrize("field,value", [("version", 2), ("page_size", 8192), ("fsid", uuid.uuid4().bytes),
                                         ("epoch", 7), ("generation", 99)])
def test_bad_header_field_is_refused(kind: StoreKind, opener: Callable[[], BaselineStore], field: str,
                                     value: object) -> None:
    """Issue 10.5b: the header's version, page size, fsid and epoch were written but never checked."""
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    name = m.segments[0].name
    kind.tamper.write_segment(store, name, _rewrite_header(kind.tamper.read_segment(store, name), **{field: value}))
    with pytest.raises(CorruptionError, match=f"{name}.*bad header"):
        opener().read_index(m.segments[0])
    assert opener().verify()


def test_bad_magic_is_refused(kind: StoreKind, opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    name = m.segments[0].name
    kind.tamper.write_segment(store, name, _rewrite_header(kind.tamper.read_segment(store, name), magic=b"GARBAGE!"))
    with pytest.raises(CorruptionError, match="header"):
        opener().read_index(m.segments[0])


def test_bad_manifest_checksum_is_refused(kind: StoreKind, opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    raw = kind.tamper.read_manifest(store)
    kind.tamper.write_manifest(store, raw.replace(b'"generation": 1', b'"generation": 9'))
    with pytest.raises(CorruptionError, match="MANIFEST.*checksum"):
        opener().read_manifest()


@pytest.mark.parametrize("change", [
    lambda doc: doc.replace(b'"generation": 1', b'"generation": "1"'),
    lambda doc: doc.replace(b'"epoch": 0', b'"epoch": null'),
    lambda doc: doc.replace(b'"state": "clean"', b'"state": "maybe"'),
    lambda doc: doc.replace(b'"format": 1', b'"format": 7'),
    lambda doc: b"[1, 2]",
    lambda doc: b"{not json",
])
def test_manifest_that_checksums_but_does_not_parse_is_named(kind: StoreKind, opener: Callable[[], BaselineStore],
                                                             change: Callable[[bytes], bytes]) -> None:
    """Issue 15.6: contents with a valid checksum but of the wrong shape are a CorruptionError naming the file."""
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    body = kind.tamper.read_manifest(store).rstrip(b"\n").rpartition(b"\nxxh3:")[0]
    changed = change(body)
    assert changed != body
    kind.tamper.write_manifest(store, with_checksum(changed))
    with pytest.raises(CorruptionError, match="MANIFEST"):
        opener().read_manifest()


# --- crashes between steps ------------------------------------------------------------

def test_aborted_and_abandoned_writers_leave_the_published_generation(opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    w = store.new_segment(m.fsid, m.epoch, 2)
    w.add(REGION, 1, memoryview(page(2)))
    w.abort()
    w = store.new_segment(m.fsid, m.epoch, 3)             # a crash: never finished, never aborted
    w.add(REGION, 1, memoryview(page(3)))
    w._drain()
    again = opener()
    assert again.list_segments() == [m.segments[0].name]
    assert again.read_manifest() == m and again.verify() == []
    finished = store.new_segment(m.fsid, m.epoch, 4)       # finished, but its publish never happened
    finished.add(REGION, 1, memoryview(page(4)))
    finished.finish()
    assert opener().read_manifest() == m
    assert store.collect_garbage(m) >= 1                   # the owner removes what no manifest names
    assert sorted(opener().list_segments()) == [m.segments[0].name] and opener().verify() == []


class Crash(Exception):
    pass


PUBLISH_STEPS = ("publish.read", "publish.written", "publish.renamed")
CLAIM_STEPS = ("publish.read", "claim.built", "claim.renamed")


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_flush_publish_dying_at_each_step(opener: Callable[[], BaselineStore], step: str) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})

    def die(name: str) -> None:
        if name == step:
            raise Crash(name)
    store.step = die
    with pytest.raises(Crash):
        flush(store, m, {1: page(2)})
    after = opener().read_manifest()
    assert after.generation in (1, 2) and after.epoch == m.epoch   # old, or new if the swap was done
    assert opener().verify() == []
    new_owner = takeover(opener(), after)                          # and the filesystem can be taken over
    assert opener().read_manifest() == new_owner


@pytest.mark.parametrize("step", CLAIM_STEPS)
def test_takeover_dying_at_each_step(opener: Callable[[], BaselineStore], step: str) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    claimer = opener()

    def die(name: str) -> None:
        if name == step:
            raise Crash(name)
    claimer.step = die
    with pytest.raises(Crash):
        takeover(claimer, m)
    after = opener().read_manifest()
    assert (after.epoch, after.generation) in ((m.epoch, m.generation), (m.epoch + 1, m.generation + 1))
    assert opener().verify() == []
    if after.epoch == m.epoch:                  # the claim never landed: another host can take over
        assert takeover(opener(), after).epoch == m.epoch + 1
        with pytest.raises(FencedError):
            flush(store, m, {1: page(2)})       # and the old owner is fenced


# --- concurrent publishers of two epochs -------------------------------------------------

def test_two_claimers_of_one_epoch_one_wins(opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    results: list[str] = []
    start = threading.Barrier(2)

    def claim(host: str) -> None:
        s = opener()
        s.step = lambda name: time.sleep(random.random() * 0.002)
        start.wait()
        try:
            takeover(s, m)
            results.append("won")
        except FencedError:
            results.append("fenced")
    for _ in range(20):
        results.clear()
        m = opener().read_manifest()
        start.reset()
        run_threads(lambda: claim("b"), lambda: claim("c"))
        assert sorted(results) == ["fenced", "won"]
        assert opener().read_manifest().epoch == m.epoch + 1


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in a thread of its own; re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _race_round(opener: Callable[[], BaselineStore], rng: random.Random) -> tuple[int, int]:
    """The old owner flushes (full flushes with GC) while another host takes over, each pausing at random
    between its steps. Returns (the old owner's acknowledged generations, takeovers that won)."""
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    owner_state = {"m": m, "acked": [m.generation], "fenced_at": None}
    taken: list[Manifest] = []

    def pause(name: str) -> None:
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.003)

    def old_owner() -> None:
        store.step = pause
        prev = owner_state["m"]
        for i in range(12):
            try:
                prev = flush(store, prev, {i % REGION_PAGES: page(i + 2)}, full=True, gc=True)
            except FencedError:
                owner_state["fenced_at"] = prev.generation + 1
                return
            owner_state["m"] = prev
            owner_state["acked"].append(prev.generation)     # acknowledged: its dirty marks are dropped

    def new_owner() -> None:
        time.sleep(rng.random() * 0.01)
        for _ in range(20):            # an operator re-runs a takeover that found the backend moving on
            s = opener()
            s.step = pause
            base = s.read_manifest()
            try:
                taken.append(takeover(s, base))
                return
            except FencedError:
                continue

    run_threads(old_owner, new_owner)
    final = opener().read_manifest()
    assert opener().verify(final) == [], "the newest generation must verify (GC kept what it names)"
    if taken:
        won = taken[-1]
        assert final == won, "the newer epoch's generation survives"
        # Nothing the old owner acknowledged is missing from what the new owner was based on.
        assert max(owner_state["acked"]) <= won.generation - 1, (owner_state, won.generation)
        with pytest.raises(FencedError):                       # and the old owner stays fenced
            flush(store, owner_state["m"], {0: page(9)})
    else:
        assert final.epoch == m.epoch
    return len(owner_state["acked"]), len(taken)


@pytest.mark.allow_log(r"withdrew this host's claim of epoch")
def test_concurrent_publishers_of_two_epochs(kind: StoreKind, tmp_path: Path) -> None:
    """Issue 10.4: many rounds of an old owner and a taker-over racing, pauses between every CAS step."""
    rng = random.Random(1234)
    won = 0
    for i in range(30):
        (tmp_path / f"round{i}").mkdir()
        _acked, taken = _race_round(kind.make(tmp_path / f"round{i}"), rng)
        won += taken
    assert won > 0


# --- garbage collection -------------------------------------------------------------

def test_gc_of_an_old_owner_deletes_nothing_of_the_new_epoch(opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    m = flush(store, m, {1: page(2)})
    new = opener()
    mine = takeover(new, m)
    mine = flush(new, mine, {2: page(3)}, full=True)    # names only its own segment now
    assert store.collect_garbage() == 0 and store.collect_garbage(m) == 0     # the old owner may not
    assert set(opener().list_segments()) >= {s.name for s in mine.segments}
    assert opener().verify() == []
    assert new.collect_garbage(mine) >= 2                # the new owner may: the old epoch's, unnamed
    assert opener().list_segments() == [mine.segments[0].name] and opener().verify() == []


@pytest.mark.allow_log(r"is not an rmemfs file; it is left alone")
def test_gc_keeps_named_old_epoch_segments_and_foreign_objects(kind: StoreKind,
                                                               opener: Callable[[], BaselineStore]) -> None:
    store, m = create(opener)
    m = flush(store, m, {0: page(1)})
    m = flush(store, m, {1: page(2)})
    still_there = kind.tamper.add_foreign(store)
    new = opener()
    mine = flush(new, takeover(new, m), {2: page(3)})
    new.collect_garbage(mine)
    assert sorted(opener().list_segments()) == sorted(s.name for s in mine.segments)   # every one still named
    assert still_there() and opener().verify() == []
    mine = flush(new, mine, {3: page(4)}, full=True)
    assert new.collect_garbage(mine) >= 3
    assert still_there() and opener().list_segments() == [mine.segments[0].name]


def test_empty_store_and_foreign_objects(kind: StoreKind, opener: Callable[[], BaselineStore]) -> None:
    store = opener()
    assert store.is_empty()
    kind.tamper.add_foreign(store)
    with pytest.raises(BackendError, match="not an rmemfs file"):
        opener().is_empty()


def test_read_manifest_of_an_empty_store_says_so(opener: Callable[[], BaselineStore]) -> None:
    with pytest.raises(BackendError):
        opener().read_manifest()
    with pytest.raises(BackendError):
        opener().fsid()

