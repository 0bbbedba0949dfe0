"""Verbs transport tests that need an RDMA device: run inside the VM by tests/test_vm_verbs.py
(``tools/vm/run -- .venv/bin/python -m pytest -p no:cacheprovider tests/vm/inner_verbs.py``).

The exporter is a separate process (tests/vm/verbs_env.py) serving read-only
mappings of region files on tmpfs; reads go over rxe0 (RoCEv2 loopback).
"""
from __future__ import annotations

import mmap
import os
import random
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterator

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verbs_env  # noqa: E402

from rmemfs.transport import resolve, verbs  # noqa: E402
from rmemfs.transport.base import AuthError, RemoteAccessError, ReadOp  # noqa: E402

PAGE = 4096
SMALL = 4 << 20
LARGE = 80 << 20   # the "64 MiB+" transfer

pytestmark = pytest.mark.skipif(verbs.available() is not None, reason=f"no RDMA: {verbs.available()}")


@pytest.fixture(scope="module")
def exporter() -> Iterator[dict]:
    d = Path(tempfile.mkdtemp(prefix="verbs-regions-", dir="/tmp"))
    proc, info = verbs_env.start_exporter(d, [SMALL, LARGE])
    info["data"] = [Path(p).read_bytes() for p in info["regions"]]
    yield info
    proc.stdin.close()   # type: ignore[union-attr]
    proc.wait(timeout=10)


async def _connect(info: dict, secret: bytes = verbs_env.SECRET) -> verbs.VerbsConnection:
    return await verbs.connect("127.0.0.1", info["port"], fsid=verbs_env.FSID, secret=secret,
                               timeout=10.0, control_connect=verbs_env.control_module().connect)


def _buf(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n))


async def test_available_and_auto() -> None:
    assert verbs.available() is None
    assert resolve("auto") == "verbs"


async def test_register_catalog(exporter: dict) -> None:
    async with await _connect(exporter) as conn:
        cat = await conn.register()
    assert cat.transport == "verbs" and cat.fsid == verbs_env.FSID
    assert [r.length for r in cat.regions] == [SMALL, LARGE]
    assert len({r.rkey for r in cat.regions}) == 2


async def test_read_byte_exact(exporter: dict) -> None:
    small = exporter["data"][0]
    async with await _connect(exporter) as conn:
        cat = await conn.register()
        r = cat.regions[0]
        dest = _buf(1 << 20)
        conn.register_local(dest)
        cases = [(0, PAGE), (PAGE * 7, PAGE), (1, 1), (12345, 54321), (SMALL - 100, 100), (0, 1 << 20)]
        for off, n in cases:
            await conn.read(r.rkey, off, dest[:n])
            assert dest[:n] == small[off:off + n], (off, n)
        # several ops into one buffer in one batch
        ops = [ReadOp(r.rkey, off, dest[i * 8192:i * 8192 + 5000]) for i, off in enumerate([0, 99, 4096, 777777])]
        await conn.read_batch(ops)
        for op in ops:
            assert op.dest == small[op.offset:op.offset + 5000]


async def test_errors_keep_connection_usable(exporter: dict) -> None:
    small = exporter["data"][0]
    async with await _connect(exporter) as conn:
        cat = await conn.register()
        r = cat.regions[0]
        dest = _buf(2 * PAGE)
        conn.register_local(dest)
        with pytest.raises(RemoteAccessError, match="outside region"):
            await conn.read(r.rkey, SMALL - PAGE, dest)            # runs one page past the end
        with pytest.raises(RemoteAccessError, match="unknown rkey"):
            await conn.read(r.rkey ^ 0x5A5A, 0, dest[:PAGE])
        await conn.read(r.rkey, PAGE, dest[:PAGE])
        assert dest[:PAGE] == small[PAGE:2 * PAGE]
        with pytest.raises(ValueError, match="register_local"):
            await conn.read(r.rkey, 0, memoryview(bytearray(PAGE)))


async def test_nic_enforces_rkey_and_bounds(exporter: dict) -> None:
    """Without the local checks, the exporter's NIC (rxe) itself refuses; the QP is rebuilt."""
    small = exporter["data"][0]
    async with await _connect(exporter) as conn:
        cat = await conn.register()
        r = cat.regions[0]
        dest = _buf(2 * PAGE)
        conn.register_local(dest)
        await conn.read_raw(r.rkey, r.addr, dest[:PAGE])        # the raw path itself works
        assert dest[:PAGE] == small[:PAGE]
        with pytest.raises(RemoteAccessError, match="REM_ACCESS_ERR"):
            await conn.read_raw(r.rkey ^ 0x100, r.addr, dest[:PAGE])          # wrong rkey
        with pytest.raises(RemoteAccessError, match="REM_ACCESS_ERR"):
            await conn.read_raw(r.rkey, r.addr + SMALL - PAGE, dest)          # past the MR's end
        with pytest.raises(RemoteAccessError, match="REM_ACCESS_ERR"):
            await conn.read_raw(r.rkey, r.addr - PAGE, dest[:PAGE])           # before its start
        await conn.read(r.rkey, 3 * PAGE, dest[:PAGE])
        assert dest[:PAGE] == small[3 * PAGE:4 * PAGE]



async def test_auth_failure(exporter: dict) -> None:
    with pytest.raises(AuthError):
        await _connect(exporter, secret=b"not-the-secret")


async def test_many_scattered_pages_in_flight(exporter: dict) -> None:
    large = exporter["data"][1]
    npages = 8192
    rng = random.Random(7)
    pages = rng.sample(range(LARGE // PAGE), npages)
    async with await _connect(exporter) as conn:
        cat = await conn.register()
        r = cat.regions[1]
        dest = _buf(npages * PAGE)
        conn.register_local(dest)
        done = []
        ops = [ReadOp(r.rkey, p * PAGE, dest[i * PAGE:(i + 1) * PAGE]) for i, p in enumerate(pages)]
        await conn.read_batch(ops, progress=done.append)
        assert sum(done) == npages * PAGE
        for i, p in enumerate(pages):
            assert dest[i * PAGE:(i + 1) * PAGE] == large[p * PAGE:(p + 1) * PAGE], i


async def test_large_transfer(exporter: dict) -> None:
    large = exporter["data"][1]
    async with await _connect(exporter) as conn:
        cat = await conn.register()
        r = cat.regions[1]
        dest = _buf(LARGE)
        conn.register_local(dest)
        await conn.read(r.rkey, 0, dest)                 # one op, split at the port's max message
        assert dest == large
        dest[:] = b"\0" * LARGE
        mib = 1 << 20
        await conn.read_batch([ReadOp(r.rkey, o, dest[o:o + mib]) for o in range(0, LARGE, mib)])
        assert dest == large


async def test_cancel_waits_for_outstanding_reads(exporter: dict) -> None:
    large = exporter["data"][1]
    async with await _connect(exporter) as conn:
        cat = await conn.register()
        r = cat.regions[1]
        dest = _buf(LARGE)
        conn.register_local(dest)
        ops = [ReadOp(r.rkey, o, dest[o:o + PAGE]) for o in range(0, LARGE, PAGE)]
        for delay in (0, 0.05, 0.5):   # before the worker starts, early, mid-batch
            with trio.move_on_after(delay):
                await conn.read_batch(ops)
        # whatever was cancelled, the connection still reads correctly afterwards
        await conn.read(r.rkey, PAGE, dest[:PAGE])
        assert dest[:PAGE] == large[PAGE:2 * PAGE]


def test_exporter_mapping_requirement(tmp_path: Path) -> None:
    """REMOTE_READ-only MRs: a writable MAP_SHARED mapping registers; a PROT_READ one does on
    Linux >= 6.2 and fails with the documented EFAULT hint before (the VM runs 6.1)."""
    from rmemfs.transport.base import ExportedRegion, RegionRole, TransportError
    path = tmp_path / "r.rgn"
    verbs_env.make_region_file(path, 1 << 20)
    with open(path, "r+b") as f:
        rw = mmap.mmap(f.fileno(), 1 << 20, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        ro = mmap.mmap(f.fileno(), 1 << 20, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    with verbs.VerbsExportBackend() as vb:
        d = vb.register(ExportedRegion(1, "rw", RegionRole.DATA, memoryview(rw).toreadonly(),
                                       verbs_env.buffer_address(rw)))
        assert d.length == 1 << 20 and d.rkey
        region = ExportedRegion(2, "ro", RegionRole.DATA, memoryview(ro), verbs_env.buffer_address(ro))
        if tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 2):
            assert vb.register(region).rkey
        else:
            with pytest.raises(TransportError, match="PROT_READ\\|PROT_WRITE"):
                vb.register(region)
