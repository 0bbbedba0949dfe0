"""Layering rules of the package, checked on the source: who may import what."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rmemfs"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def importers_of(module: str) -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if module in imported_modules(p)}


def test_only_the_fuse_adapter_imports_pyfuse3() -> None:
    assert importers_of("pyfuse3") == {"fs.py"}


def test_only_the_verbs_transport_imports_pyverbs() -> None:
    assert importers_of("pyverbs") <= {"transport/verbs.py"}


def test_the_memory_layer_does_not_depend_on_transports() -> None:
    for name in ("regions.py", "dirty.py", "journal.py", "namespace.py", "core.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        relative = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        assert not any(m.startswith("transport") for m in relative), name


def test_only_the_rados_store_imports_rados_and_the_rest_runs_without_it(tmp_path: Path) -> None:
    """Issue 13 item 1: python3-rados is imported lazily, in store/rados.py only; without it a directory
    store works and a rados: backend is one clear store error."""
    import subprocess
    import sys
    assert importers_of("rados") == {"store/rados.py"}
    probe = """
import sys
sys.modules["rados"] = None         # as if python3-rados were not installed: importing it fails
from rmemfs.errors import BackendError
from rmemfs.store import open_store
open_store(sys.argv[1])
try:
    open_store("rados:pool/x")
except BackendError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "the rados backend needs python3-rados (run tools/setup)"
