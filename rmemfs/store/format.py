"""The baseline store's byte formats: fs.json, MANIFEST, segments. Pure encode/decode, no I/O.

Each format has its own version constant, written into it and checked on read;
a change to any of them shows in ``tests/golden/`` (see test_unit_formats.py).

fs.json (``FS_FORMAT`` 1)::

    {"format": 1, "fsid": "<uuid>", "created_ns": <int>} + "\\nxxh3:<hex>\\n" trailer; never rewritten

secret: 64 hex digits (32 random bytes) and a newline: the HMAC key of the transports.

MANIFEST (``MANIFEST_FORMAT`` 1): the published generation, JSON (indent 1, sorted keys) +
"\\nxxh3:<hex>\\n" trailer::

    format, fsid, epoch, generation, state ("mounted" | "clean"), owner {host, pid, ...}, time_ns,
    page_size, regions {"<id>": length}, segments [SegmentInfo...], live_pages, settings {}

A segment (``SEGMENT_VERSION`` 1; name ``seg-<epoch:06>-<generation:010>.rseg``) holds the pages one
flush wrote, page images of regions::

    header page   <8s "RMEMSEG1", I version, I page_size, 16s fsid, Q epoch, Q generation, q time_ns>
                  + Q xxh3 of those bytes, zero padded to one page
    data          the non-zero pages, PAGE_SIZE each, in index order
    index         entries <Q region_id << 48 | page_no, Q xxh3 of the page, Q data offset>;
                  data offset ZERO_PAGE means "this page is now all zeros" (no data stored)
    footer        <8s "RMEMSEGF", Q index offset, Q entries, Q data pages, Q index xxh3,
                   Q header xxh3, Q xxh3 of the preceding footer bytes>

A page's content in the baseline is its entry in the newest segment that has one.
Every decoder raises ``CorruptionError`` naming ``where`` (the file or object) on
any mismatch: checksum, version, a field of the wrong type, a header that names
another filesystem, epoch or generation.
"""
from __future__ import annotations

import json
import re
import struct
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import xxhash

from .. import PAGE_SIZE
from ..errors import CorruptionError

FS_FORMAT = 1
MANIFEST_FORMAT = 1
SEGMENT_VERSION = 1

SEG_MAGIC = b"RMEMSEG1"
FOOT_MAGIC = b"RMEMSEGF"
SEG_HEAD = struct.Struct("<8sII16sQQq")
HEADER_SIZE = SEG_HEAD.size + 8            # the packed header and its xxh3
ENTRY = struct.Struct("<QQQ")
FOOT = struct.Struct("<8sQQQQQ")
FOOTER_SIZE = FOOT.size + 8
ZERO_PAGE = 0xFFFFFFFFFFFFFFFF
ZERO_BYTES = bytes(PAGE_SIZE)
ZERO_HASH = xxhash.xxh3_64_intdigest(ZERO_BYTES)
STATE_MOUNTED, STATE_CLEAN = "mounted", "clean"
SECRET_BYTES = 32

_SEGMENT_NAME = re.compile(r"seg-(\d{6,})-(\d{10,})\.rseg")


def segment_name(epoch: int, generation: int) -> str:
    return f"seg-{epoch:06d}-{generation:010d}.rseg"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """(epoch, generation) of a segment name this format writes, or None for any other name."""
    m = _SEGMENT_NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def segment_epoch(name: str) -> int:
    """The epoch of the owner that wrote a segment, from its name."""
    parsed = parse_segment_name(name)
    if parsed is None:
        raise CorruptionError(f"{name!r} is not a segment name")
    return parsed[0]


def split_key(key: int) -> tuple[int, int]:
    """An index entry's key as (region id, page number)."""
    return key >> 48, key & 0xFFFFFFFFFFFF


# --- checksummed JSON documents (fs.json, MANIFEST) --------------------------------

def with_checksum(payload: bytes) -> bytes:
    return payload + b"\nxxh3:" + xxhash.xxh3_64_hexdigest(payload).encode() + b"\n"


def strip_checksum(raw: bytes, where: str) -> bytes:
    body, sep, trailer = raw.rstrip(b"\n").rpartition(b"\nxxh3:")
    if not sep or xxhash.xxh3_64_hexdigest(body).encode() != trailer:
        raise CorruptionError(f"{where}: checksum mismatch or truncated file")
    return body


def _json_doc(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(strip_checksum(raw, where))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptionError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptionError(f"{where}: not a JSON object")
    return doc


def _field(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key)
    # bool is an int to Python, never to this format
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int,))):
        raise CorruptionError(f"{where}: field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def _uuid(text: str, where: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise CorruptionError(f"{where}: {text!r} is not a filesystem id") from None


def _version(doc: dict[str, Any], key: str, want: int, where: str) -> None:
    if doc.get(key) != want:
        raise CorruptionError(f"{where}: unsupported format {doc.get(key)!r} (this rmemfs reads {want})")


@dataclass(frozen=True)
class Identity:
    """fs.json: who this filesystem is."""
    fsid: str
    created_ns: int

    def to_bytes(self) -> bytes:
        return with_checksum(json.dumps({"format": FS_FORMAT, "fsid": self.fsid,
                                         "created_ns": self.created_ns}).encode())

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Identity:
        doc = _json_doc(raw, where)
        _version(doc, "format", FS_FORMAT, where)
        return cls(_uuid(_field(doc, "fsid", str, where), where), _field(doc, "created_ns", int, where))


def encode_secret(secret: bytes) -> bytes:
    return secret.hex().encode() + b"\n"


def decode_secret(raw: bytes, where: str) -> bytes:
    try:
        secret = bytes.fromhex(raw.decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise CorruptionError(f"{where} is not a hex secret") from None
    if len(secret) != SECRET_BYTES:
        raise CorruptionError(f"{where} holds {len(secret)} bytes, a secret is {SECRET_BYTES}")
    return secret


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    generation: int
    bytes: int
    entries: int
    data_pages: int
    index_xxh3: int


@dataclass(frozen=True)
class Manifest:
    fsid: str
    epoch: int
    generation: int
    state: str
    owner: dict
    time_ns: int
    regions: dict[int, int]                   # region id -> length in bytes
    segments: tuple[SegmentInfo, ...] = ()
    live_pages: int = 0
    settings: dict = field(default_factory=dict)   # ctl capacity, extent size, ... at creation

    def to_bytes(self) -> bytes:
        doc = {"format": MANIFEST_FORMAT, "fsid": self.fsid, "epoch": self.epoch, "generation": self.generation,
               "state": self.state, "owner": self.owner, "time_ns": self.time_ns, "page_size": PAGE_SIZE,
               "regions": {str(k): v for k, v in sorted(self.regions.items())},
               "segments": [s.__dict__ for s in self.segments], "live_pages": self.live_pages,
               "settings": self.settings}
        return with_checksum(json.dumps(doc, indent=1, sort_keys=True).encode())

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Manifest:
        doc = _json_doc(raw, where)
        _version(doc, "format", MANIFEST_FORMAT, where)
        if doc.get("page_size") != PAGE_SIZE:
            raise CorruptionError(f"{where}: page size {doc.get('page_size')!r}, this rmemfs uses {PAGE_SIZE}")
        state = _field(doc, "state", str, where)
        if state not in (STATE_MOUNTED, STATE_CLEAN):
            raise CorruptionError(f"{where}: unknown state {state!r}")
        regions_doc = _field(doc, "regions", dict, where)
        try:
            regions = {int(k): v for k, v in regions_doc.items()}
        except ValueError:
            raise CorruptionError(f"{where}: a region id is not a number") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in regions.values()):
            raise CorruptionError(f"{where}: a region length is not a number")
        segments = []
        for s in _field(doc, "segments", list, where):
            if not isinstance(s, dict):
                raise CorruptionError(f"{where}: a segment entry is not an object")
            info = SegmentInfo(_field(s, "name", str, where), *(_field(s, k, int, where) for k in
                               ("generation", "bytes", "entries", "data_pages", "index_xxh3")))
            if parse_segment_name(info.name) is None:
                raise CorruptionError(f"{where}: {info.name!r} is not a segment name")
            segments.append(info)
        settings = doc.get("settings", {})
        if not isinstance(settings, dict):
            raise CorruptionError(f"{where}: field 'settings' is not an object")
        return cls(_uuid(_field(doc, "fsid", str, where), where), _field(doc, "epoch", int, where),
                   _field(doc, "generation", int, where), state, _field(doc, "owner", dict, where),
                   _field(doc, "time_ns", int, where), regions, tuple(segments),
                   _field(doc, "live_pages", int, where), settings)

    def segment_bytes(self) -> int:
        return sum(s.bytes for s in self.segments)


def next_manifest(prev: Manifest, **changes: object) -> Manifest:
    return replace(prev, time_ns=time.time_ns(), **changes)   # type: ignore[arg-type]


# --- segments ---------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentHeader:
    fsid: str
    epoch: int
    generation: int
    time_ns: int
    version: int = SEGMENT_VERSION
    page_size: int = PAGE_SIZE

    def to_bytes(self) -> bytes:
        """The header page (PAGE_SIZE bytes)."""
        head = SEG_HEAD.pack(SEG_MAGIC, self.version, self.page_size, uuid.UUID(self.fsid).bytes, self.epoch,
                             self.generation, self.time_ns)
        return (head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))).ljust(PAGE_SIZE, b"\0")

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview, where: str) -> SegmentHeader:
        """Decode and checksum-check the first HEADER_SIZE bytes of a segment."""
        if len(raw) < HEADER_SIZE:
            raise CorruptionError(f"{where}: bad header (truncated)")
        magic, version, page_size, fsid, epoch, generation, time_ns = SEG_HEAD.unpack_from(raw)
        (head_xxh,) = struct.unpack_from("<Q", raw, SEG_HEAD.size)
        if magic != SEG_MAGIC or head_xxh != xxhash.xxh3_64_intdigest(bytes(raw[:SEG_HEAD.size])):
            raise CorruptionError(f"{where}: bad header (magic or checksum)")
        return cls(str(uuid.UUID(bytes=fsid)), epoch, generation, time_ns, version, page_size)

    def check(self, where: str, fsid: str, info: SegmentInfo) -> None:
        """Refuse a header of another version, page size, filesystem, epoch or generation than expected."""
        name_epoch = segment_epoch(info.name)
        for what, got, want in (("version", self.version, SEGMENT_VERSION), ("page size", self.page_size, PAGE_SIZE),
                                ("filesystem", self.fsid, fsid), ("epoch", self.epoch, name_epoch),
                                ("generation", self.generation, info.generation)):
            if got != want:
                raise CorruptionError(f"{where}: bad header: {what} {got}, expected {want}")


@dataclass(frozen=True)
class SegmentFooter:
    index_offset: int
    entries: int
    data_pages: int
    index_xxh3: int
    header_xxh3: int

    def to_bytes(self) -> bytes:
        foot = FOOT.pack(FOOT_MAGIC, self.index_offset, self.entries, self.data_pages, self.index_xxh3,
                         self.header_xxh3)
        return foot + struct.pack("<Q", xxhash.xxh3_64_intdigest(foot))

    @classmethod
    def from_bytes(cls, raw: bytes, where: str, size: int, header: bytes | bytearray | memoryview) -> SegmentFooter:
        """Decode the last FOOTER_SIZE bytes of a segment of ``size`` bytes whose first bytes are ``header``."""
        magic, index_off, entries, data_pages, index_xxh, head_xxh = FOOT.unpack_from(raw)
        (foot_xxh,) = struct.unpack_from("<Q", raw, FOOT.size)
        if (magic != FOOT_MAGIC or foot_xxh != xxhash.xxh3_64_intdigest(raw[:FOOT.size])
                or head_xxh != xxhash.xxh3_64_intdigest(bytes(header[:SEG_HEAD.size]))):
            raise CorruptionError(f"{where}: bad header or footer")
        if index_off + entries * ENTRY.size + FOOTER_SIZE != size or index_off < PAGE_SIZE:
            raise CorruptionError(f"{where}: index does not end at the footer")
        return cls(index_off, entries, data_pages, index_xxh, head_xxh)
