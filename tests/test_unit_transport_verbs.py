"""Verbs transport, host side: what must hold on a machine without RDMA (this one, and CI).

The verbs transport itself runs inside the soft-RoCE VM: tests/test_vm_verbs.py.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

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
