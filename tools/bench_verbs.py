#!/usr/bin/env python3
"""Read bandwidth of the verbs transport vs the software transport, inside the soft-RoCE VM.

    tools/vm/run --mem 4G -- .venv/bin/python tools/bench_verbs.py [--size 1G] [--scattered-size 256M]

An exporter process (tests/vm/verbs_env.py) serves one region file on tmpfs;
this process reads all of it with 1 MiB reads, then reads ``--scattered-size``
bytes as 4 KiB pages in random order, per transport, and checks what it read.
Under QEMU/TCG everything (rxe's packet processing, its CRCs, the copies) is
emulated, so absolute numbers say little about hardware; the ratio between
transports on the same emulated host is the point.
"""
from __future__ import annotations

import argparse
import json
import mmap
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))   # PYTHONPATH (tools/vm/run sets it) wins
sys.path.insert(0, str(REPO / "tests" / "vm"))

import verbs_env  # noqa: E402

from rmemfs.transport import verbs  # noqa: E402
from rmemfs.transport.base import ReadOp  # noqa: E402

PAGE = 4096
MIB = 1 << 20


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


async def bench(transport: str, port: int, region_path: Path, size: int, scattered: int,
                batch_ops: int) -> dict[str, float]:
    ctl = verbs_env.control_module()
    kw = dict(fsid=verbs_env.FSID, secret=verbs_env.SECRET, timeout=30.0)
    if transport == "verbs":
        conn = await verbs.connect("127.0.0.1", port, control_connect=ctl.connect, **kw)
        cat = await conn.register()
    else:
        conn = await ctl.connect("127.0.0.1", port, **kw)
        cat = await conn.register()
    expected = region_path.read_bytes()  # noqa: ASYNC240 - before timing
    out: dict[str, float] = {}
    async with conn:
        r = cat.regions[0]
        dest = memoryview(mmap.mmap(-1, size))
        conn.register_local(dest)

        t0 = time.perf_counter()
        ops = [ReadOp(r.rkey, o, dest[o:o + MIB]) for o in range(0, size, MIB)]
        await conn.read_batch(ops)
        out["1MiB_s"] = time.perf_counter() - t0
        out["1MiB_MBps"] = size / out["1MiB_s"] / 1e6
        assert dest == expected[:size], f"{transport}: 1 MiB reads returned wrong data"

        pages = random.Random(1).sample(range(size // PAGE), scattered // PAGE)
        ops = [ReadOp(r.rkey, p * PAGE, dest[i * PAGE:(i + 1) * PAGE]) for i, p in enumerate(pages)]
        t0 = time.perf_counter()
        # batches as recovery would issue them (bounded memory for op lists), each with many in flight
        for i in range(0, len(ops), batch_ops):
            await conn.read_batch(ops[i:i + batch_ops])
        out["4KiB_s"] = time.perf_counter() - t0
        out["4KiB_MBps"] = scattered / out["4KiB_s"] / 1e6
        out["4KiB_pages_per_s"] = len(pages) / out["4KiB_s"]
        for i in random.Random(2).sample(range(len(pages)), min(2048, len(pages))):
            p = pages[i]
            assert dest[i * PAGE:(i + 1) * PAGE] == expected[p * PAGE:(p + 1) * PAGE], f"{transport}: page {p}"
    return out


async def main_async(a: argparse.Namespace) -> dict[str, object]:
    d = Path(tempfile.mkdtemp(prefix="bench-verbs-", dir="/tmp"))
    t0 = time.perf_counter()
    proc, info = verbs_env.start_exporter(d, [a.size])
    setup_s = time.perf_counter() - t0
    transports = [t for t in a.transports.split(",") if t]
    results: dict[str, object] = {"size": a.size, "scattered_size": a.scattered_size,
                                  "exporter_setup_s": round(setup_s, 1),
                                  "software_impl": verbs_env.control_module().__name__}
    try:
        for t in transports:
            if t == "software" and not verbs_env.has_software():
                results[t] = "unavailable: rmemfs.transport.software is not importable here"
                continue
            res = await bench(t, info["port"], Path(info["regions"][0]), a.size, a.scattered_size, a.batch_ops)
            results[t] = {k: round(v, 2) for k, v in res.items()}
            print(f"{t:9s} 1 MiB reads: {res['1MiB_MBps']:8.1f} MB/s ({res['1MiB_s']:.2f} s)   "
                  f"4 KiB scattered: {res['4KiB_MBps']:8.1f} MB/s, {res['4KiB_pages_per_s']:.0f} pages/s "
                  f"({res['4KiB_s']:.2f} s)", flush=True)
    finally:
        proc.stdin.close()   # type: ignore[union-attr]
        proc.wait(timeout=30)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=1 << 30, help="region size read with 1 MiB reads (1G)")
    p.add_argument("--scattered-size", type=parse_size, default=None,
                   help="bytes read as random 4 KiB pages (default: --size)")
    p.add_argument("--batch-ops", type=int, default=65536, help="ReadOps per read_batch call (4 KiB mode)")
    p.add_argument("--transports", default="verbs,software")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    if a.scattered_size is None:
        a.scattered_size = a.size
    a.scattered_size = min(a.scattered_size, a.size)
    if verbs.available() is not None:
        print(f"bench_verbs: no RDMA device ({verbs.available()}); run it via tools/vm/run", file=sys.stderr)
        return 2
    results = trio.run(main_async, a)
    print(json.dumps(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
