"""Verbs transport: the in-VM suite over soft-RoCE.

Each test boots tools/vm/run and runs a file of tests/vm/ inside, where rxe0 exists; exporter and
initiator are two processes on one rxe device. The host-side checks are in test_unit_transport_verbs.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VM_RUN = REPO / "tools" / "vm" / "run"
SKIP_RC = 77


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
