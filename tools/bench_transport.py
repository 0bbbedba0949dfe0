#!/usr/bin/env python3
"""Benchmark the software transport against a raw Python socket over loopback.

    PYTHONPATH=. .venv/bin/python tools/bench_transport.py [--size 1G] [--pages 100000] [--json out.json]

Measures in one run, with the exporter in a separate process (as across hosts):
  (a) raw: the exporter ``sendall``s SIZE bytes of its mapping, the reader ``recv_into``s them;
  (b) software transport: SIZE bytes read as 1 MiB reads (one ``read_batch``);
  (c) software transport: PAGES random 4 KiB pages (random order), in pages/s.
Each round runs (a), (b), (c) back to back; the best of ``--repeat`` rounds is
reported and (b)/(a) is the throughput ratio (per-round ratios are in the JSON). Both sides read into/out
of pre-faulted memory so that page faults do not favour either measurement. ``run(size)`` returns the numbers as a dict.
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rmemfs.transport import software as sw  # noqa: E402
from rmemfs.transport.base import Catalog, ExportedRegion, ReadOp, RegionRole  # noqa: E402

FSID = "bench-fs"
SECRET = b"bench-secret"
MiB = 1 << 20
PAGE = 4096


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b").rstrip("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _make_file(path: str, size: int) -> None:
    block = random.Random(1).randbytes(MiB)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            # Vary each MiB so misplaced data cannot compare equal by accident.
            chunk = i.to_bytes(8, "little") + block[8:]
            f.write(chunk[:min(MiB, left)])
            left -= MiB
            i += 1


def _exporter(path: str, size: int, conn: Any) -> None:
    """The exporter process: a raw sender and the software transport, both over one mapping."""
    # The file stays open: the exporter reads region files with pread (holes stay unallocated).
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    view = memoryview(mm)

    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen()

    def raw_sender() -> None:
        while True:
            s, _ = raw.accept()
            with s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(view)

    threading.Thread(target=raw_sender, daemon=True).start()
    backend = sw.SoftwareExportBackend()
    desc = backend.register(ExportedRegion(1, "data-0001.rgn", RegionRole.DATA, view, 0, fd))

    async def main() -> None:
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: sw.serve(
                host="127.0.0.1", port=0, fsid=FSID, secret=SECRET, export=backend,
                catalog=lambda t: Catalog(FSID, t, (desc,)), task_status=task_status))
            conn.send((raw.getsockname()[1], port))

    trio.run(main)


def _raw_read(port: int, dest: memoryview) -> float:
    s = socket.create_connection(("127.0.0.1", port))
    with s:
        t0 = time.perf_counter()
        got = 0
        while got < len(dest):
            n = s.recv_into(dest[got:])
            if n == 0:
                raise RuntimeError("raw sender closed early")
            got += n
        return time.perf_counter() - t0


async def _rounds(raw_port: int, sw_port: int, dest: memoryview, size: int, pages: list[int],
                  repeat: int) -> tuple[list[float], list[float], list[float]]:
    """Interleave (a), (b), (c) in each round, so load from elsewhere hits all of them alike."""
    conn = await sw.connect("127.0.0.1", sw_port, fsid=FSID, secret=SECRET)
    async with conn:
        d = (await conn.register()).by_id(1)
        big_ops = [ReadOp(d.rkey, off, dest[off:off + MiB]) for off in range(0, size, MiB)]
        page_ops = [ReadOp(d.rkey, p * PAGE, dest[p * PAGE:(p + 1) * PAGE]) for p in pages]
        raw, big, small = [], [], []
        for _ in range(repeat):
            raw.append(_raw_read(raw_port, dest))   # blocking on purpose: nothing else runs here
            t0 = time.perf_counter()
            await conn.read_batch(big_ops)
            big.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await conn.read_batch(page_ops)
            small.append(time.perf_counter() - t0)
        return raw, big, small


def run(size: int = 1 << 30, pages: int = 100_000, repeat: int = 3) -> dict[str, Any]:
    """Run all three measurements; returns a dict of results (bytes/s, pages/s, ratio)."""
    size = max(MiB, size // MiB * MiB)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rmemfs-bench-") as tmp:
        path = os.path.join(tmp, "data-0001.rgn")
        _make_file(path, size)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_exporter, args=(path, size, child), daemon=True)
        proc.start()
        try:
            if not parent.poll(60):
                raise RuntimeError("exporter process did not start")
            raw_port, sw_port = parent.recv()
            dest_mm = mmap.mmap(-1, size)
            dest = memoryview(dest_mm)
            for off in range(0, size, PAGE):      # pre-fault the destination
                dest_mm[off] = 0
            rng = random.Random(42)
            page_list = rng.sample(range(size // PAGE), min(pages, size // PAGE))
            raw_times, big, small = trio.run(_rounds, raw_port, sw_port, dest, size, page_list, repeat)
            with open(path, "rb") as f:           # the last runs' data must be exact
                src = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
                ok = src[:] == dest_mm[:]
                src.close()
            del dest
            dest_mm.close()
        finally:
            proc.kill()
            proc.join()
    raw_bps = size / min(raw_times)
    sw_bps = size / min(big)
    pps = len(page_list) / min(small)
    return {
        "size": size,
        "raw_bytes_per_s": raw_bps,
        "software_1mib_bytes_per_s": sw_bps,
        "ratio_software_to_raw": sw_bps / raw_bps,
        # Per round, (a) and (b) ran back to back: less sensitive to outside load.
        "ratio_per_round": [r / b for r, b in zip(raw_times, big, strict=True)],
        "pages": len(page_list),
        "software_4kib_pages_per_s": pps,
        "raw_times_s": raw_times,
        "software_1mib_times_s": big,
        "software_4kib_times_s": small,
        "data_verified": ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="bytes to transfer, e.g. 256M, 1G (default 1G)")
    ap.add_argument("--pages", type=int, default=100_000, help="4 KiB pages for the scattered test")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    r = run(parse_size(args.size), args.pages, args.repeat)
    gib = 1 << 30
    print(f"size {r['size'] / MiB:.0f} MiB, best of {args.repeat} rounds")
    print(f"(a) raw socket          {r['raw_bytes_per_s'] / gib:7.2f} GiB/s")
    print(f"(b) software 1 MiB      {r['software_1mib_bytes_per_s'] / gib:7.2f} GiB/s   "
          f"b/a = {r['ratio_software_to_raw']:.2f} "
          f"(per round: {', '.join(f'{x:.2f}' for x in r['ratio_per_round'])})")
    print(f"(c) software 4 KiB      {r['software_4kib_pages_per_s']:9,.0f} pages/s ({r['pages']} random pages)")
    print(f"data verified: {r['data_verified']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    if not r["data_verified"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
