"""Verbs transport: host-side checks (no RDMA here) and the in-VM suite over soft-RoCE.

The VM test boots tools/vm/run and runs tests/vm/inner_verbs.py inside, where
rxe0 exists; exporter and initiator are two processes on one rxe device.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from rmemfs.transport import resolve, verbs

REPO = Path(__file__).resolve().parents[1]
VM_RUN = REPO / "tools" / "vm" / "run"
SKIP_RC = 77


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


def run_in_vm(test_file: str, timeout: int) -> str:
    """Run an inner pytest file inside the soft-RoCE VM; skip only where QEMU cannot run at all."""
    cmd = [str(VM_RUN), "--timeout", str(timeout), "--",
           ".venv/bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o",
           f"faulthandler_timeout={timeout - 100}", test_file]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode == SKIP_RC:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    assert r.returncode == 0, f"{test_file} failed in the VM (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
    return r.stdout


@pytest.mark.vm
@pytest.mark.slow
def test_verbs_in_vm() -> None:
    run_in_vm("tests/vm/inner_verbs.py", 300)


@pytest.mark.vm
@pytest.mark.slow
def test_recovery_over_verbs_in_vm() -> None:
    """Mount, write, SIGKILL, rmemfs-recover --transport verbs and --transport auto, verify: all inside the VM."""
    assert "2 passed" in run_in_vm("tests/vm/inner_recovery.py", 400)
