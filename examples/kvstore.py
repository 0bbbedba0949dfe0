#!/usr/bin/env python3
"""A tiny key-value store that lives in one mmapped file and commits with msync.

Meant to run on rmemfs: the file's pages are the filesystem's memory, msync
pushes them into tracked memory, so after the host dies a recovery elsewhere
has every acknowledged commit. A commit is acknowledged (printed) only after
msync returns.

File layout (all little-endian)::

    page 0    header: b"RMKV0001", u32 slot_count, u32 slot_size, u64 commits, u32 crc32 of the preceding
    page 1..  slots of SLOT bytes, open addressing by crc32(key) with linear probing:
              u32 crc32(rest), u64 seq, u16 key_len, u16 value_len, key, value (zero padded)
              an all-zero slot is empty; anything else must carry a valid checksum

Usage: kvstore.py FILE {put KEY VALUE | get KEY | dump | check | load N [--seed S] [--batch B]}
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import struct
import sys
import zlib

PAGE = mmap.PAGESIZE
MAGIC = b"RMKV0001"
HEADER = struct.Struct("<8sIIQ")          # magic, slot_count, slot_size, commits; then u32 crc
SLOT = 256
REC = struct.Struct("<IQHH")              # crc, seq, key_len, value_len
MAX_KEY, MAX_VALUE = 64, SLOT - REC.size - 64
DEFAULT_SLOTS = 16384                     # 4 MiB of slots


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: str, slots: int = DEFAULT_SLOTS) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size == 0:                      # a new store: size it, then write and msync the header
                os.ftruncate(fd, PAGE + slots * SLOT)
            self.mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if size == 0:
            self._write_header(slots, 0)
            self.mm.flush(0, PAGE)
        magic, self.nslots, slot_size, self.commits = HEADER.unpack_from(self.mm, 0)
        (crc,) = struct.unpack_from("<I", self.mm, HEADER.size)
        if magic != MAGIC or slot_size != SLOT or crc != zlib.crc32(self.mm[:HEADER.size]):
            raise StoreError(f"{path}: not a kvstore file (bad header)")
        self.dirty: set[int] = set()          # pages touched since the last commit

    def _write_header(self, slots: int, commits: int) -> None:
        head = HEADER.pack(MAGIC, slots, SLOT, commits)
        self.mm[:HEADER.size + 4] = head + struct.pack("<I", zlib.crc32(head))

    def _slot_offset(self, i: int) -> int:
        return PAGE + i * SLOT

    def _read(self, i: int) -> tuple[bytes, bytes, int] | None:
        """(key, value, seq) of slot i, None if empty; raises StoreError on a bad checksum."""
        off = self._slot_offset(i)
        raw = self.mm[off:off + SLOT]
        if raw == bytes(SLOT):
            return None
        crc, seq, klen, vlen = REC.unpack_from(raw)
        if klen > MAX_KEY or vlen > MAX_VALUE or crc != zlib.crc32(raw[4:]):
            raise StoreError(f"slot {i}: checksum mismatch (torn or corrupt record)")
        body = raw[REC.size:]
        return body[:klen], body[MAX_KEY:MAX_KEY + vlen], seq

    def _find(self, key: bytes) -> tuple[int, bool]:
        """The slot holding key (found=True) or the empty slot where it would go."""
        start = zlib.crc32(key) % self.nslots
        for n in range(self.nslots):
            i = (start + n) % self.nslots
            rec = self._read(i)
            if rec is None:
                return i, False
            if rec[0] == key:
                return i, True
        raise StoreError("store is full")

    def put(self, key: bytes, value: bytes) -> None:
        if not 0 < len(key) <= MAX_KEY or len(value) > MAX_VALUE:
            raise StoreError(f"key must be 1..{MAX_KEY} bytes and value at most {MAX_VALUE}")
        i, _ = self._find(key)
        self.commits += 1
        rest = struct.pack("<QHH", self.commits, len(key), len(value)) + key.ljust(MAX_KEY, b"\0") + value
        rest = rest.ljust(SLOT - 4, b"\0")
        off = self._slot_offset(i)
        self.mm[off:off + SLOT] = struct.pack("<I", zlib.crc32(rest)) + rest
        self.dirty.add(off // PAGE)

    def commit(self) -> None:
        """msync the records, then the header (commit counter). Returns once both are durable.

        One msync over the span of touched pages (the kernel writes only the dirty ones), and the header
        after it, so a header never counts records that are not yet durable."""
        if self.dirty:
            first, last = min(self.dirty), max(self.dirty)
            self.mm.flush(first * PAGE, (last - first + 1) * PAGE)
        self._write_header(self.nslots, self.commits)
        self.mm.flush(0, PAGE)
        self.dirty.clear()

    def get(self, key: bytes) -> bytes | None:
        i, found = self._find(key)
        rec = self._read(i) if found else None
        return rec[1] if rec else None

    def items(self) -> list[tuple[bytes, bytes, int]]:
        return [rec for i in range(self.nslots) if (rec := self._read(i)) is not None]

    def check(self) -> int:
        """Every record's checksum, no duplicate keys, every key reachable by probing, seq <= commits."""
        items = self.items()
        keys = [k for k, _, _ in items]
        if len(set(keys)) != len(keys):
            raise StoreError("duplicate keys")
        for k, v, seq in items:
            if seq > self.commits:
                raise StoreError(f"record {k!r} has seq {seq} beyond the header's {self.commits} commits")
            if self.get(k) != v:
                raise StoreError(f"record {k!r} is not reachable from its hash slot")
        return len(items)

    def close(self) -> None:
        self.mm.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("put")
    s.add_argument("key")
    s.add_argument("value")
    sub.add_parser("get").add_argument("key")
    sub.add_parser("dump")
    sub.add_parser("check")
    s = sub.add_parser("load", help="put N random records, printing each committed one as KEY<TAB>VALUE")
    s.add_argument("n", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=16, help="records per msync (default 16)")
    s.add_argument("--keys", type=int, default=0, help="draw keys from this many (default N: mostly new keys)")
    args = p.parse_args(argv)
    try:
        store = Store(args.file)
    except (StoreError, OSError) as e:
        print(f"kvstore: {e}", file=sys.stderr)
        return 1
    try:
        if args.cmd == "put":
            store.put(args.key.encode(), args.value.encode())
            store.commit()
            print(f"committed {args.key}")
        elif args.cmd == "get":
            value = store.get(args.key.encode())
            if value is None:
                print(f"kvstore: {args.key}: no such key", file=sys.stderr)
                return 1
            print(value.decode())
        elif args.cmd == "dump":
            for k, v, _ in sorted(store.items()):
                print(f"{k.decode()}\t{v.decode()}")
        elif args.cmd == "check":
            print(f"ok: {store.check()} records, {store.commits} puts")
        elif args.cmd == "load":
            rng = random.Random(args.seed)
            nkeys = args.keys or args.n
            pending: list[str] = []
            for n in range(args.n):
                key, value = f"k{rng.randrange(nkeys):06d}", f"v{rng.getrandbits(64):016x}" * rng.randint(1, 8)
                store.put(key.encode(), value.encode())
                pending.append(f"{key}\t{value}")
                if len(pending) == args.batch or n == args.n - 1:
                    store.commit()          # only now are these records acknowledged
                    print("\n".join(pending), flush=True)
                    pending.clear()
    except StoreError as e:
        print(f"kvstore: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
