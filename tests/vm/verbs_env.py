"""Shared pieces of the in-VM verbs tests and benchmark: the control channel to use,
region files, and an exporter process (``python tests/vm/verbs_env.py export ...``).

The exporter maps each region file read-only (PROT_READ, MAP_SHARED) and registers
that mapping, as the real exporter does with region files.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import mmap
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO))   # PYTHONPATH (tools/vm/run sets it) wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmemfs.transport.base import Catalog, ExportedRegion, RegionRole  # noqa: E402

FSID = "vm-verbs-test"
SECRET = b"vm-verbs-secret"


def control_module() -> ModuleType:
    """The software transport once it is in this branch, else the tests' stand-in."""
    try:
        from rmemfs.transport import software
        if hasattr(software, "serve") and hasattr(software, "connect"):
            return software
    except ImportError:
        pass
    import control_standin
    return control_standin


def has_software() -> bool:
    return control_module().__name__ == "rmemfs.transport.software"


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def buffer_address(obj: Any) -> int:
    """Address of any buffer, read-only ones included (ctypes.from_buffer needs writable)."""
    pb = _PyBuffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(obj), ctypes.byref(pb), 0)
    try:
        return int(pb.buf)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(pb))


def make_region_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n


def start_exporter(directory: Path, sizes: list[int]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Spawn an exporter process; returns it and its announcement {"port", "regions": [path...]}."""
    proc = subprocess.Popen([sys.executable, __file__, "export", str(directory), *map(str, sizes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = proc.stdout.readline()   # type: ignore[union-attr]
    if not line:
        proc.wait()
        raise RuntimeError(f"exporter died (rc {proc.returncode})")
    return proc, json.loads(line)


async def _export(directory: Path, sizes: list[int]) -> None:
    from rmemfs.transport.verbs import VerbsExportBackend
    ctl = control_module()
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up before serving
    regions: list[ExportedRegion] = []
    maps = []
    for i, size in enumerate(sizes):
        path = directory / f"data-{i:04d}.rgn"
        if not path.exists() or path.stat().st_size != size:
            make_region_file(path, size)
        # Writable MAP_SHARED mapping: kernels < 6.2 cannot register a PROT_READ one (see
        # rmemfs.transport.verbs); the backend only gets a read-only view and a REMOTE_READ MR.
        with open(path, "r+b") as f:  # noqa: ASYNC230 - set-up before serving
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        maps.append(mm)
        view = memoryview(mm).toreadonly()
        regions.append(ExportedRegion(i + 1, path.name, RegionRole.DATA, view, buffer_address(mm)))
    with VerbsExportBackend() as vb:
        descs = {"verbs": [vb.register(r) for r in regions]}
        sw = None
        if has_software():
            sw = ctl.SoftwareExportBackend()
            descs["software"] = [sw.register(r) for r in regions]

        def catalog(transport: str) -> Catalog:
            return Catalog(FSID, transport, tuple(descs[transport]))

        exts = {e.name: e for e in vb.extensions()}
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: ctl.serve(
                host="0.0.0.0", port=0, fsid=FSID, secret=SECRET, export=sw, catalog=catalog,
                extensions=exts, task_status=task_status))
            print(json.dumps({"port": port, "regions": [str(directory / r.name) for r in regions]}), flush=True)
            # Serve until the parent closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
            n.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["export"])
    p.add_argument("dir", type=Path)
    p.add_argument("sizes", type=int, nargs="+")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(_export, a.dir, a.sizes)
