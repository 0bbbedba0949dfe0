"""The crash-trial oracle's rule of acknowledgement (tools/fsworkload.py), in both cache modes."""
from __future__ import annotations

import errno
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from fsworkload import SLOT, _slot_bytes, verify_pause  # noqa: E402


def _log(writeback: bool) -> dict:
    """Two writes to w0.dat: slot 0's fsync returned; slot 1's write() returned but its fsync was refused."""
    ops = [{"kind": "write", "file": "w0.dat", "off": 0, "len": 100, "seed": 1, "start_ns": 1, "end_ns": 2,
            "written": True, "errno": 0},
           {"kind": "write", "file": "w0.dat", "off": SLOT, "len": 100, "seed": 2, "start_ns": 3, "end_ns": 4,
            "written": True, "errno": errno.EROFS}]
    return {"seed": 0, "writeback": writeback, "setup": [{"file": "w0.dat", "size": 0}], "ops": ops}


def test_a_returned_write_is_an_acknowledgement_only_without_writeback_cache(tmp_path: Path) -> None:
    (tmp_path / "w0.dat").write_bytes(_slot_bytes(1, 100))      # the takeover's copy lacks slot 1
    problems, counts = verify_pause(tmp_path, _log(writeback=True))
    assert problems == [] and counts["acknowledged"] == 1, (problems, counts)
    problems, counts = verify_pause(tmp_path, _log(writeback=False))
    assert counts["acknowledged"] == 2
    assert len(problems) == 1 and "slot at 8192" in problems[0] and "acknowledged but differs" in problems[0]
