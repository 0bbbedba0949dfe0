"""The ``-o`` mount options that rmemfs, rmemfs-recover and rmemfs-standby share: what each one means
(``OPTION_HELP``, shown by ``--help``), how it parses and which values it accepts (``OPTIONS``), and
``parse_options``, which turns ``-o`` items into a ``MountOptions`` or raises a one-line ``UsageError``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .core import DEFAULT_DIRTY_CAPACITY
from .errors import UsageError
from .exporter import DEFAULT_PORT
from .regions import DEFAULT_DATA_REGION_SIZE, META_REGION_SIZE
from .store import store_option, store_option_names

log = logging.getLogger(__name__)


@dataclass
class MountOptions:
    """``-o`` options shared by rmemfs and rmemfs-recover."""

    flush_interval: float = 5.0
    regiondir: str = ""
    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    dirty_capacity: int = DEFAULT_DIRTY_CAPACITY
    region_size: int = DEFAULT_DATA_REGION_SIZE
    meta_size: int = META_REGION_SIZE
    heartbeat_interval: float = 0.02   # under a standby's default dead_after with room for stalls (tools/bench_heartbeat.py)
    allow_other: bool = False
    writeback_cache: bool = False
    fsid: str = ""
    tracking: bool = True
    fsname: str = "rmemfs"
    load_rate: float = 0.0             # a lazy recovery's background load limit, bytes/s (0: as fast as it goes)
    metrics: str = ""                  # ADDR:PORT of a Prometheus endpoint (metrics.py)
    stall_trace: float = 0.0           # seconds without a heartbeat before every thread's stack is logged (0: off)
    extra_fuse: list[str] = field(default_factory=list)
    store: dict[str, str] = field(default_factory=dict)    # the backend's own options (ceph_conf, ceph_id)
    given: set[str] = field(default_factory=set)           # the options named on the command line

    def region_dir(self, fsid: str) -> Path:
        return Path(self.regiondir or f"/dev/shm/rmemfs-{fsid}")


OPTION_HELP: dict[str, str] = {
    "flush_interval": "seconds between incremental baselines (default 5; more than 0, at most 604800)",
    "regiondir": "directory of the region files (default /dev/shm/rmemfs-<fsid>; a DAX mount works too)",
    "listen": "address the exporter serves remote readers on (default 127.0.0.1)",
    "port": f"exporter TCP port (default {DEFAULT_PORT}; 0 picks a free one, recorded in the backend; at most 65535)",
    "dirty_capacity": f"entries per dirty page list (default {DEFAULT_DIRTY_CAPACITY}, 8 bytes each); "
                      "a full list forces a flush; 65536 to 2**27",
    "region_size": "bytes per data region, a multiple of 256K, 1M to 64G (default 256M; suffixes K, M, G, T). Sparse on "
                   "tmpfs, but the verbs transport pins (and so backs) a whole region when it registers it",
    "meta_size": "bytes of the namespace journal region, set when the filesystem is created (default 256M; "
                 "a multiple of 256K, 1M to 64G); given at a later mount, a larger value grows it (it never "
                 "shrinks)",
    "heartbeat_interval": "seconds between heartbeat increments (default 0.02; more than 0, at most 60)",
    "allow_other": "let users other than the mounter access the files (permission checks stay on)",
    "writeback_cache": "let the kernel buffer write() (faster, but write() then acknowledges before the "
                       "data reaches tracked memory; fsync/msync still do)",
    "fsid": "refuse to mount unless the backend holds this filesystem id",
    "tracking": "on|off: dirty page tracking; off only for benchmarks, it makes recovery impossible",
    "metrics": "ADDR:PORT: serve Prometheus metrics (heartbeat, dirty-list entries, flush figures, fencing)",
    "fsname": "name shown in the mount table (default rmemfs)",
    "stall_trace": "seconds: when the event loop has not beaten the heartbeat for this long, write every "
                   "thread's stack to the log, once per stall (finding what holds the loop; default 0: off)",
    "load_rate": "rmemfs-recover --load lazy: limit the background load to this many bytes/s (suffixes K, M, G; "
                 "default 0, no limit), to leave the store and the network to requests",
    "ceph_conf": "rados: backends: the cluster's ceph.conf (default: librados's lookup, CEPH_CONF, "
                 "/etc/ceph/ceph.conf); its keyring setting says where the key is",
    "ceph_id": "rados: backends: the cephx user, without client. (default admin)",
}


SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``256M``, ``1.5G``, ``1048576``; a value that is not a finite number raises ValueError."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = 1
    if text and text[-1] in SIZE_UNITS:
        text, unit = text[:-1], SIZE_UNITS[text[-1]]
    try:
        return int(text) * unit
    except ValueError:
        value = float(text)       # "1e400" is inf, "nan" is nan: neither is a size
        if not math.isfinite(value):
            raise ValueError("not a finite number") from None
        return int(value * unit)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError("must be on or off")
    return text == "on"


def _text(text: str) -> str:
    if not text:
        raise ValueError("needs a value")
    return text


def size_text(n: float) -> str:
    for suffix, unit in sorted(SIZE_UNITS.items(), key=lambda kv: -kv[1]):
        if n >= unit and n % unit == 0:
            return f"{int(n // unit)}{suffix}"
    return str(n)


@dataclass(frozen=True)
class OptionSpec:
    """How one ``-o name=value`` option parses and which values it accepts (``lo < value`` when
    ``open_lo``, else ``lo <= value``; ``value <= hi``)."""

    parse: Callable[[str], Any]
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    multiple: int = 0            # the value must be a multiple of this
    flag: bool = False           # on when given alone; also takes =on / =off
    show: Callable[[float], str] = str

    def check(self, key: str, value: Any) -> None:
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            raise UsageError(f"-o {key} must be {'more than' if self.open_lo else 'at least'} "
                             f"{self.show(self.lo)} (got {self.show(value)})")
        if self.hi is not None and value > self.hi:
            raise UsageError(f"-o {key} must be at most {self.show(self.hi)} (got {self.show(value)})")
        if self.multiple and value % self.multiple:
            raise UsageError(f"-o {key} must be a multiple of {self.show(self.multiple)}")


def _metrics_address(value: str) -> str:
    from .metrics import check_address
    check_address(value)
    return value


# Upper bounds keep what a mount allocates per option sane: a data region costs a byte per page in the
# dirty tracker's maps (64G: 16 MiB), a dirty list 8 bytes per entry in exported memory (2**27: 1 GiB).
MAX_REGION_SIZE = 64 << 30
MAX_DIRTY_CAPACITY = 1 << 27
MIN_DIRTY_CAPACITY = 4 * (1 << 14)
_SIZE = dict(parse=parse_size, lo=1 << 20, multiple=256 << 10, show=size_text)

# One line per option: rmemfs and rmemfs-recover accept exactly these.
OPTIONS: dict[str, OptionSpec] = {
    "flush_interval": OptionSpec(_finite, lo=0, open_lo=True, hi=7 * 86400),
    "heartbeat_interval": OptionSpec(_finite, lo=0, open_lo=True, hi=60),
    "stall_trace": OptionSpec(_finite, lo=0, hi=3600),
    "port": OptionSpec(int, lo=0, hi=65535),
    "dirty_capacity": OptionSpec(int, lo=MIN_DIRTY_CAPACITY, hi=MAX_DIRTY_CAPACITY),
    "region_size": OptionSpec(**_SIZE, hi=MAX_REGION_SIZE),              # type: ignore[arg-type]
    "meta_size": OptionSpec(**_SIZE, hi=MAX_REGION_SIZE),                # type: ignore[arg-type]
    "regiondir": OptionSpec(_text),
    "listen": OptionSpec(_text),
    "fsid": OptionSpec(_text),
    "fsname": OptionSpec(_text),
    "allow_other": OptionSpec(bool, flag=True),
    "writeback_cache": OptionSpec(bool, flag=True),
    "tracking": OptionSpec(_on_off),
    "load_rate": OptionSpec(parse_size, lo=0, hi=1 << 40, show=size_text),
    "metrics": OptionSpec(_metrics_address),
}
FUSE_FLAGS = ("ro", "rw", "default_permissions", "noatime", "nosuid", "nodev", "dev", "suid")


def parse_options(items: list[str]) -> MountOptions:
    """Parse ``-o`` items; any bad one is a usage error (exit 2) naming the option and its bound."""
    opts = MountOptions()
    store_names = store_option_names()
    for item in ",".join(items).split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        if key in store_names:
            opts.store[key] = store_option(key, value)
            continue
        if key in FUSE_FLAGS:
            opts.extra_fuse.append(key)
            continue
        spec = OPTIONS.get(key)
        if spec is None:
            raise UsageError(f"unknown mount option {key!r}; see --help")
        if spec.flag:
            # A bare flag turns it on; "=off" must not (it did: the value was ignored).
            try:
                setattr(opts, key, _on_off(value) if eq else True)
            except ValueError as e:
                raise UsageError(f"bad value for -o {key}: {value!r} ({e}, or give {key} alone)") from None
            continue
        try:
            parsed = spec.parse(value)
        except (ValueError, OverflowError) as e:
            raise UsageError(f"bad value for -o {key}: {value!r} ({e})") from None
        spec.check(key, parsed)
        setattr(opts, key, parsed)
        opts.given.add(key)
    return opts
