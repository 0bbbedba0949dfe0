"""Real-mount level: POSIX behaviour and mmap through a mounted rmemfs (a real FUSE mount, real daemon)."""
from __future__ import annotations

import errno
import mmap
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import Rig, run

pytestmark = pytest.mark.mount


@pytest.fixture
def mnt(rig: Rig) -> Path:
    rig.mount()
    return rig.mountpoint


def test_files_and_directories(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"hello world")
    assert (mnt / "d" / "f").read_bytes() == b"hello world"
    with open(mnt / "d" / "f", "r+b") as f:
        f.seek(6)
        f.write(b"rmemfs")
        f.truncate(9)
        os.fsync(f.fileno())
    assert (mnt / "d" / "f").read_bytes() == b"hello rme"
    os.truncate(mnt / "d" / "f", 20)
    assert (mnt / "d" / "f").read_bytes() == b"hello rme" + bytes(11)
    (mnt / "d" / "g").write_bytes(b"other")
    os.rename(mnt / "d" / "g", mnt / "d" / "f")          # over an existing file
    assert (mnt / "d" / "f").read_bytes() == b"other" and not (mnt / "d" / "g").exists()
    (mnt / "e").mkdir()
    os.rename(mnt / "d", mnt / "e" / "d2")
    assert sorted(os.listdir(mnt)) == ["e"] and os.listdir(mnt / "e" / "d2") == ["f"]
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "e")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(mnt / "e" / "d2" / "f")
    os.rmdir(mnt / "e" / "d2")
    os.rmdir(mnt / "e")
    assert os.listdir(mnt) == []
    names = {f"n{i:03d}" for i in range(300)}
    for n in names:
        (mnt / n).touch()
    assert set(os.listdir(mnt)) == names                   # readdir across several replies


def test_links_and_attributes(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"x")
    os.symlink("f", mnt / "s")
    assert os.readlink(mnt / "s") == "f" and (mnt / "s").read_bytes() == b"x"
    os.link(f, mnt / "h")
    assert os.stat(f).st_nlink == 2 and os.stat(mnt / "h").st_ino == os.stat(f).st_ino
    os.chmod(f, 0o600)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 2_000_000_000 and st.st_atime_ns == 1_000_000_000
    vfs = os.statvfs(mnt)
    assert vfs.f_bsize == 4096 and vfs.f_namemax == 255 and vfs.f_bfree > 0


def test_long_names(mnt: Path) -> None:
    (mnt / ("a" * 255)).write_bytes(b"ok")
    for name in ("b" * 256, "c" * 1000):
        with pytest.raises(OSError) as e:
            (mnt / name).write_bytes(b"no")
        assert e.value.errno == errno.ENAMETOOLONG


def test_unlinked_open_file_reports_nlink_zero(mnt: Path) -> None:
    with open(mnt / "f", "w+b") as f:
        f.write(b"still here")
        f.flush()
        os.unlink(mnt / "f")
        assert os.fstat(f.fileno()).st_nlink == 0
        f.seek(0)
        assert f.read() == b"still here"
    assert os.listdir(mnt) == []


def test_shared_mmap_read_write(mnt: Path) -> None:
    size = 8 << 20
    with open(mnt / "m", "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as m:
            for i in range(0, size, 1 << 20):
                m[i:i + 8] = b"%08d" % i
            m.flush()
    with open(mnt / "m", "rb") as f:
        data = f.read()
    assert all(data[i:i + 8] == b"%08d" % i for i in range(0, size, 1 << 20)) and len(data) == size


def test_sparse_file_costs_only_written_pages(rig: Rig, mnt: Path) -> None:
    before = rig.stats()["core"]["region_resident_bytes"]
    with open(mnt / "db", "w+b") as f:
        f.truncate(64 << 30)                                # as LMDB and SQLite do
        for off in (0, 7 << 30, 63 << 30):
            f.seek(off)
            f.write(b"p" * 4096)
    after = rig.stats()["core"]
    assert os.stat(mnt / "db").st_size == 64 << 30
    assert after["used_extents"] == 3
    assert after["region_resident_bytes"] - before < 2 << 20


@pytest.fixture
def world_reachable(rig: Rig) -> Rig:
    """A mountpoint other users can reach (pytest's tmp_path is 0700)."""
    rig.mountpoint = Path(tempfile.mkdtemp(prefix="rmemfs-perm-"))
    os.chmod(rig.mountpoint, 0o755)
    return rig


def test_permissions_are_checked_by_the_kernel(world_reachable: Rig) -> None:
    rig = world_reachable
    rig.mount(["allow_other"])
    (rig.mountpoint / "private").write_bytes(b"secret")
    os.chmod(rig.mountpoint / "private", 0o600)
    (rig.mountpoint / "public").write_bytes(b"hello")
    os.chmod(rig.mountpoint, 0o755)
    script = ("import sys\n"
              "def t(f):\n"
              "    try: f(); return 'ok'\n"
              "    except PermissionError: return 'EACCES'\n"
              f"m = {str(rig.mountpoint)!r}\n"
              "print(t(lambda: open(m + '/public').read()), t(lambda: open(m + '/private').read()),"
              " t(lambda: open(m + '/public', 'a').write('x')), t(lambda: open(m + '/new', 'w')))\n")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                           script], capture_output=True, text=True, timeout=30)
    assert proc.stdout.split() == ["ok", "EACCES", "EACCES", "EACCES"], proc.stderr


def test_other_users_are_kept_out_without_allow_other(world_reachable: Rig) -> None:
    world_reachable.mount()
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls",
                           str(world_reachable.mountpoint)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_help_documents_every_option() -> None:
    from rmemfs.options import OPTION_HELP
    out = run([sys.executable, "-m", "rmemfs.cli.mount", "--help"], check=True).stdout
    for name in OPTION_HELP:
        assert name in out
    assert "Exit codes" in out


def test_a_write_costs_one_request_not_a_getxattr_too(rig: Rig, mnt: Path) -> None:
    # Answering GETXATTR at all (even ENOATTR) made the kernel ask for security.capability before every
    # write(): two requests per write. ENOSYS once stops it; rmemfs-ctl finds the mount without an xattr.
    with open(mnt / "f", "wb", buffering=0) as f:
        for i in range(200):
            os.pwrite(f.fileno(), b"x" * 4096, i * 4096)
    requests = rig.stats()["requests"]
    assert requests["writes"] >= 200, requests
    assert requests["getxattr"] <= 1, requests
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "f", "user.anything")
    assert e.value.errno in (errno.EOPNOTSUPP, errno.ENODATA), e.value
    rig.flush()                 # the control socket is still found


def test_names_the_kernel_caches_as_missing_appear_and_go_with_this_mounts_changes(mnt: Path) -> None:
    # rmemfs answers a missing name with a negative entry the kernel keeps (issue 14)
    for _ in range(2):
        assert not (mnt / "j").exists()
        assert not (mnt / "j").exists()                 # from the kernel's cache
        (mnt / "j").write_bytes(b"x")
        assert (mnt / "j").read_bytes() == b"x"
        os.rename(mnt / "j", mnt / "k")
        assert not (mnt / "j").exists() and (mnt / "k").exists()
        os.link(mnt / "k", mnt / "j")
        assert (mnt / "j").read_bytes() == b"x"
        os.unlink(mnt / "j")
        os.unlink(mnt / "k")
        assert not (mnt / "k").exists()
    os.mkdir(mnt / "d")
    assert not (mnt / "d" / "f").exists()
    subprocess.run([sys.executable, "-c", f"open({str(mnt / 'd' / 'f')!r}, 'w').write('y')"], check=True)
    assert (mnt / "d" / "f").read_text() == "y"
