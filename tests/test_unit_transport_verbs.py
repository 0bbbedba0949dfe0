"""Verbs transport, host side: what must hold on a machine without RDMA (this one, and CI).

The verbs transport itself runs inside the soft-RoCE VM: tests/test_vm_verbs.py.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from rmemfs.transport import resolve, verbs

REPO = Path(__file__).resolve().parents[1]


def test_import_needs_no_pyverbs() -> None:
    # importing the module must not import pyverbs (it is loaded on first use only)
    code = ("import sys; sys.modules['pyverbs'] = None; import rmemfs.transport.verbs as v; "
            "r = v.available(); assert r and 'pyverbs' in r, r; print(r)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "pyverbs is not importable" in out.stdout


def test_auto_falls_back_to_software_without_rdma(caplog: pytest.LogCaptureFixture) -> None:
    reason = verbs.available()
    if reason is None:
        pytest.skip("this machine has an RDMA device")
    assert isinstance(reason, str) and "\n" not in reason
    with caplog.at_level(logging.INFO, logger="rmemfs.transport"):
        assert resolve("auto") == "software"
    assert any("using software" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


async def test_connect_without_device_is_unavailable() -> None:
    if verbs.available() is None:
        pytest.skip("this machine has an RDMA device")
    with pytest.raises(verbs.TransportUnavailable):
        await verbs.connect("127.0.0.1", 1, fsid="x", secret=b"s", timeout=1)


def test_every_registered_transport_provides_the_interface() -> None:
    from rmemfs.transport import TRANSPORTS, load
    from rmemfs.transport.base import ExportBackend, Transport
    for name in TRANSPORTS:
        module = load(name)
        assert isinstance(module, Transport), name
    assert isinstance(load("software").export_backend(), ExportBackend)


class _FakeQP:
    """Stands in for a pyverbs QP/CQ pair: the exporter's bookkeeping is what is under test, not the NIC."""

    def __init__(self, qp_num: int, dev: _FakeDevice) -> None:
        self.qp_num, self._dev = qp_num, dev

    def close(self) -> None:
        self._dev.closed.append(self.qp_num)
        self._dev.changed.set()
        self._dev.changed = trio.Event()


class _FakeDevice:
    """The seam below VerbsExportBackend._handle: create/connect QPs without an RDMA device."""

    def __init__(self) -> None:
        self.closed: list[int] = []
        self.changed = trio.Event()       # set (and replaced) on every close
        self._next = 100
        self.attr = SimpleNamespace(max_qp_rd_atom=16)

    def create_qp(self, depth: int) -> tuple[_FakeQP, _FakeQP]:
        self._next += 1
        return _FakeQP(self._next, self), _FakeQP(-self._next, self)

    def connect_qp(self, qp: Any, my_psn: int, remote: dict[str, Any], **kw: Any) -> None:
        pass

    def info(self, qp: Any, psn: int, rd_atomic: int) -> dict[str, Any]:
        return {"qpn": qp.qp_num, "psn": psn, "gid": "::1", "lid": 0, "mtu": 1024, "rd_atomic": rd_atomic}


def _qp_request() -> bytes:
    return json.dumps({"op": "connect", "qpn": 7, "psn": 1, "gid": "::2", "lid": 0, "mtu": 1024,
                       "rd_atomic": 1}).encode()


@pytest.mark.allow_log(r"control extension 'verbs' refused")
async def test_exporter_qps_die_with_their_control_connection(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Each client's QPs belong to its control connection: closed by the client or dropped as idle, the
    connection takes its QPs with it, so they stop counting against MAX_EXPORT_QPS; no connection can
    close another's QP. Real software transport on 127.0.0.1; only the device is faked."""
    from rmemfs.transport import software as sw
    from rmemfs.transport.base import Catalog

    caplog.set_level(logging.INFO, logger=verbs.__name__)
    monkeypatch.setattr(verbs, "MAX_EXPORT_QPS", 2)
    monkeypatch.setattr(verbs, "_pyverbs", SimpleNamespace(e=SimpleNamespace(IBV_ACCESS_REMOTE_READ=1)))
    backend = verbs.VerbsExportBackend.__new__(verbs.VerbsExportBackend)
    dev = _FakeDevice()
    backend._dev, backend._mrs, backend._qps = dev, {}, {}   # type: ignore[assignment]
    fsid, secret = "fs-verbs-qps", b"s" * 16
    port = await nursery.start(partial(
        sw.serve, host="127.0.0.1", port=0, fsid=fsid, secret=secret, export=sw.SoftwareExportBackend(),
        catalog=lambda t: Catalog(fsid, t, ()), extensions={e.name: e for e in backend.extensions()},
        idle_timeout=0.5))

    async def qp(conn: sw.SoftwareConnection) -> int:
        return int(json.loads(await conn.call_extension(verbs.EXTENSION, _qp_request()))["qpn"])

    async def gone(qpns: set[int]) -> None:
        with trio.fail_after(5):
            while qpns & set(backend._qps) or not qpns <= set(dev.closed):
                await dev.changed.wait()

    a = await sw.connect("127.0.0.1", port, fsid=fsid, secret=secret, timeout=5)
    b = await sw.connect("127.0.0.1", port, fsid=fsid, secret=secret, timeout=5)
    a_qps = {await qp(a), await qp(a)}
    with pytest.raises(sw.TransportError, match="too many verbs connections"):
        await qp(b)                                         # the cap is reached
    victim = min(a_qps)
    with pytest.raises(sw.TransportError, match="not created on this control connection"):
        await b.call_extension(verbs.EXTENSION, json.dumps({"op": "close", "qpn": victim}).encode())
    assert a_qps <= set(backend._qps)
    await a.aclose()                                        # the client goes away without closing its QPs
    await gone(a_qps)
    b_qp = await qp(b)                                      # the cap counts only live connections' QPs
    await trio.sleep(1.0)                                   # b says nothing: dropped as idle, QP with it
    await gone({b_qp})
    assert backend._qps == {}
    await b.aclose()
