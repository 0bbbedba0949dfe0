"""The directory store: a baseline store in one directory that the hosts share (the default backend).

Layout (files 0600, directories 0700)::

    fs.json                 identity (format.Identity); created exclusively, never rewritten
    secret                  the transports' HMAC key (format.encode_secret); created exclusively
    epochs/<epoch:010d>/    one directory per epoch, created by its owner's claim:
        OWNER               who claimed it: {"token", "host", "pid"}
        MANIFEST            that epoch's newest generation (format.Manifest)
    segments/seg-<epoch:06>-<generation:010>.rseg
    MANIFEST                a backend made before epochs/ existed: read while no epoch directory does

The published manifest is ``epochs/<highest epoch>/MANIFEST`` (an epoch
directory without MANIFEST is a voided claim and is skipped; the top-level
MANIFEST counts only while no epoch directory holds one).

**Publishing is a compare-and-swap on the epoch**, built from two exclusive
steps that POSIX gives on one directory tree: ``rename(2)`` of a directory onto
an existing non-empty directory fails, and ``rename(2)`` of a file replaces its
target atomically. Every temp name carries the writer's token (host, pid,
random), so no two writers ever share one.

* *Takeover (claim)*: the new owner writes ``OWNER`` and ``MANIFEST`` into a
  private ``epochs/.claim-<epoch>.<token>`` directory, fsyncs them, and renames
  the directory to ``epochs/<epoch>``. Claims are never empty, so of two
  claimers of one epoch exactly one rename succeeds; the other gets
  EEXIST/ENOTEMPTY and FencedError. Claim and first manifest appear together:
  there is no claimed epoch without a manifest.
* *Flush (in-epoch publish)*: only the instance whose claim made
  ``epochs/<E>`` publishes into it: temp file, fsync, rename to
  ``epochs/<E>/MANIFEST``, fsync the directory.
* *Why an old owner can never replace a newer epoch*: it only ever renames
  into its own ``epochs/<E>``, and readers take the highest epoch. An owner
  that read epoch E, paused anywhere (after the read, after its temp, just
  before the rename) and resumed after another host published E+1 renames
  into ``epochs/<E>``, which no reader looks at any more (or which GC has
  removed: then its rename fails). Nothing it does makes E newest again.
* *Why nothing acknowledged is lost when the two race*: each side checks the
  other after its own atomic step (Dekker's order). The old owner, after
  renaming generation g, looks for a higher epoch directory; if it finds one
  it raises FencedError, so the flusher keeps its dirty marks (the new owner
  read them before claiming). The new owner, after its claim rename, re-reads
  ``epochs/<E>/MANIFEST``: if the generation is not the one its recovery was
  based on, the old owner published after the recovery read the manifest, and
  may have dropped marks the recovery never saw; so the claim is withdrawn (its
  MANIFEST renamed to ``MANIFEST.void``, then the directory to trash), the old epoch stays newest, and the
  takeover fails with FencedError ("run it again"). One of the two always sees
  the other, because each reads after its own rename. A pause between any two
  steps changes only which one does.
* *GC* (``BaselineStore.collect_garbage`` plus ``collect_partial`` here) runs
  only while the newest manifest is this instance's epoch and deletes only our
  own names: segments the newest manifest does not name, temp files of other
  writers or of epochs not newer than ours, lost claims, epoch directories
  older than ours (renamed to ``epochs/.trash-*`` first, so none is ever seen
  half-deleted), and the legacy top-level MANIFEST. A file that is not ours is
  never deleted.

The loader's fast path stays: ``open_segment`` opens one descriptor per reader
(read-ahead hinted with ``sequential``) and ``readinto``/``readv`` are
``preadv`` calls that release the GIL.

This rests on a filesystem where a rename by one host is seen by the next
lookup of another (local filesystems; NFS needs ``lookupcache=none``/``actimeo=0``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from pathlib import Path

from ..durable import fsync_dir
from ..errors import BackendError, CorruptionError, FencedError
from .base import BaselineStore, SegmentReader, SegmentSink, owner_info, writer_token
from .format import (STATE_CLEAN, Identity, Manifest, decode_secret, encode_secret, parse_segment_name)

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
_EPOCH_DIR = re.compile(r"\d{10}")
_CLAIM = re.compile(r"\.claim-(\d{10})\..+")
_TRASH = re.compile(r"\.trash-\d{10}\..+")
_SEG_TEMP = re.compile(r"\.(seg-(\d{6,})-\d{10,}\.rseg)(?:\.(.+))?\.tmp")   # without a token: before epochs/
_OUR_TOP = {"fs.json", "secret", "MANIFEST", "segments", "epochs"}
_OUR_TOP_TEMP = re.compile(r"\.(fs\.json|secret|MANIFEST)(\..+)?\.tmp")


def _write_file(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Create ``path`` exclusively (never through a symlink) with ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


class DirectoryStore(BaselineStore):
    """A baseline store in one directory (see the module docstring)."""

    def __init__(self, path: Path, *, file_mode: int = FILE_MODE, dir_mode: int = DIR_MODE) -> None:
        super().__init__()
        self.path = path
        self.spec = str(path)
        self.segdir = path / "segments"
        self.epochdir = path / "epochs"
        self.file_mode, self.dir_mode = file_mode, dir_mode
        self.token = writer_token()
        self._sinks: set[str] = set()          # temp names of this instance's writers in progress
        self._warned: set[str] = set()

    def describe(self, name: str | None = None) -> str:
        return self.spec if name is None else str(self.segdir / name)

    # --- identity ---------------------------------------------------------------
    def check_usable(self) -> None:
        if not self.path.is_dir():
            raise BackendError(f"backend {self.path} does not exist or is not a directory: create it first")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise BackendError(f"backend {self.path} is not writable by this user")

    def is_empty(self) -> bool:
        if self._newest() is not None:
            return False
        for name in os.listdir(self.path):
            full = self.path / name
            if name == "lost+found" and full.is_dir() and not full.is_symlink():
                continue
            if name not in _OUR_TOP and not _OUR_TOP_TEMP.fullmatch(name):
                raise BackendError(f"backend {self.path} holds {name!r}, which is not an rmemfs file: "
                                   f"give rmemfs an empty directory of its own")
        if self.segdir.is_dir():
            for name in os.listdir(self.segdir):
                if parse_segment_name(name) is not None:
                    raise BackendError(f"backend {self.path} holds segments but no MANIFEST: it is damaged "
                                       f"(restore it, or give rmemfs an empty directory)")
                if not _SEG_TEMP.fullmatch(name):
                    raise BackendError(f"backend {self.path} holds {self.segdir / name}, which is not an rmemfs "
                                       f"file: give rmemfs an empty directory of its own")
        if self.epochdir.is_dir() and any(_EPOCH_DIR.fullmatch(n) for n in os.listdir(self.epochdir)):
            raise BackendError(f"backend {self.path} holds epochs but no MANIFEST: it is damaged")
        return True

    def create(self, settings: dict, regions: dict[int, int]) -> Manifest:
        for d in (self.segdir, self.epochdir):
            d.mkdir(mode=self.dir_mode, exist_ok=True)
        self._create_once(self.path / "fs.json", Identity(str(uuid.uuid4()), time.time_ns()).to_bytes())
        self._create_once(self.path / "secret", encode_secret(secrets.token_bytes(32)))
        fsid = self.fsid()
        manifest = Manifest(fsid, 0, 0, STATE_CLEAN, owner_info(), time.time_ns(), regions, settings=settings)
        if self._newest() is None:
            try:
                self._claim(manifest, base=None)
                log.info("created filesystem %s in %s", fsid, self.path)
                return manifest
            except FencedError:
                pass                          # another creator won: adopt its filesystem
        return self.read_manifest()

    def _create_once(self, path: Path, data: bytes) -> None:
        """Write ``path`` unless it exists: temp, fsync, link(2) (exclusive), so of two creators one wins and
        a half-written file is never seen."""
        tmp = path.with_name(f".{path.name}.{self.token}.tmp")
        _write_file(tmp, data, self.file_mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        fsync_dir(path.parent)

    def fsid(self) -> str:
        if self._fsid is None:
            where = self.path / "fs.json"
            try:
                raw = _read_file(where)
            except FileNotFoundError:
                raise BackendError(f"backend {self.path} holds no rmemfs filesystem (no fs.json)") from None
            self._fsid = Identity.from_bytes(raw, str(where)).fsid
        return self._fsid

    def secret(self) -> bytes:
        where = self.path / "secret"
        try:
            st = where.stat()
            if st.st_mode & 0o077:
                log.warning("%s is readable by group or others (mode %o)", where, st.st_mode & 0o777)
            return decode_secret(_read_file(where), str(where))
        except FileNotFoundError:
            raise BackendError(f"{where} is missing: the backend is incomplete (restore the secret from "
                               f"another copy of this backend)") from None
        except OSError as e:
            raise BackendError(f"{where}: {e.strerror}") from None

    # --- manifest ---------------------------------------------------------------
    def _epochs(self) -> list[int]:
        try:
            return sorted((int(n) for n in os.listdir(self.epochdir) if _EPOCH_DIR.fullmatch(n)), reverse=True)
        except FileNotFoundError:
            return []

    def _epoch_path(self, epoch: int) -> Path:
        return self.epochdir / f"{epoch:010d}"

    def _newest(self) -> tuple[int | None, Path] | None:
        """(epoch, path) of the published manifest, or None. The epoch is None for the legacy MANIFEST."""
        for epoch in self._epochs():
            path = self._epoch_path(epoch) / "MANIFEST"
            if os.path.lexists(path):
                return epoch, path
        legacy = self.path / "MANIFEST"
        return (None, legacy) if os.path.lexists(legacy) else None

    @property
    def manifest_path(self) -> Path:
        """The file of the published manifest (for messages and tests)."""
        found = self._newest()
        return found[1] if found else self.path / "MANIFEST"

    def read_manifest(self) -> Manifest:
        for _ in range(5):          # GC may remove what a listing just showed: look again
            found = self._newest()
            if found is None:
                raise BackendError(f"backend {self.path} has no published MANIFEST")
            epoch, path = found
            try:
                raw = _read_file(path)
            except FileNotFoundError:
                continue
            return self._checked(Manifest.from_bytes(raw, str(path)), path, epoch)
        raise BackendError(f"backend {self.path}: the MANIFEST kept disappearing while being read")

    def _checked(self, manifest: Manifest, path: Path, epoch: int | None) -> Manifest:
        fsid = self.fsid()
        if manifest.fsid != fsid:
            raise BackendError(f"{path} belongs to filesystem {manifest.fsid}, but the backend is {fsid}")
        if epoch is not None and manifest.epoch != epoch:
            raise CorruptionError(f"{path}: epoch {manifest.epoch} in the directory of epoch {epoch}")
        return manifest

    def _manifest_of(self, epoch: int) -> Manifest | None:
        """The manifest published in ``epoch`` (or the legacy one at that epoch); None if voided or gone."""
        for path in (self._epoch_path(epoch) / "MANIFEST", self.path / "MANIFEST"):
            try:
                m = Manifest.from_bytes(_read_file(path), str(path))
            except FileNotFoundError:
                continue
            if m.epoch == epoch:
                return m
        return None

    def publish(self, manifest: Manifest, *, expect_epoch: int) -> None:
        current = self.read_manifest()
        self.step("publish.read")
        if current.epoch != expect_epoch:
            raise self._fenced(current, expect_epoch)
        if manifest.fsid != current.fsid:
            raise BackendError(f"manifest of filesystem {manifest.fsid} cannot be published to {self.path}")
        if manifest.epoch == expect_epoch:
            if self.owned_epoch != expect_epoch:
                raise FencedError(f"backend {self.path}: epoch {expect_epoch} was claimed by another writer; "
                                  f"this one may not publish in it")
            if manifest.generation < current.generation:
                raise FencedError(f"backend {self.path}: generation {manifest.generation} is older than the "
                                  f"published {current.generation}")
            self._replace(manifest)
            self.step("publish.renamed")
            newer = self._epochs()
            if newer and newer[0] > expect_epoch:       # published, but a newer owner may not have seen it
                raise self._fenced(self.read_manifest(), expect_epoch)
        elif manifest.epoch == expect_epoch + 1:
            if manifest.generation <= current.generation:      # the old owner published after our read
                raise FencedError(f"backend {self.path} moved on while this host took over (generation "
                                  f"{current.generation} is published): run it again")
            self._claim(manifest, base=current)
        else:
            raise ValueError(f"publish of epoch {manifest.epoch} expecting {expect_epoch}: only E or E+1")

    def _fenced(self, current: Manifest, epoch: int) -> FencedError:
        return FencedError(f"backend {self.path} now belongs to epoch {current.epoch} (owner "
                           f"{current.owner.get('host')}); this host (epoch {epoch}) may no longer publish")

    def _replace(self, manifest: Manifest) -> None:
        directory = self._epoch_path(manifest.epoch)
        tmp = directory / f".MANIFEST.{self.token}.tmp"
        try:
            _write_file(tmp, manifest.to_bytes(), self.file_mode)
            self.step("publish.written")
            os.rename(tmp, directory / "MANIFEST")
        except FileNotFoundError:       # our epoch's directory was collected: a newer owner published
            raise self._fenced(self.read_manifest(), manifest.epoch) from None
        fsync_dir(directory)

    def _claim(self, manifest: Manifest, base: Manifest | None) -> None:
        """Claim ``manifest.epoch`` with ``manifest`` as its first generation (see the module docstring)."""
        self.epochdir.mkdir(mode=self.dir_mode, exist_ok=True)
        tmp = self.epochdir / f".claim-{manifest.epoch:010d}.{self.token}"
        os.mkdir(tmp, self.dir_mode)
        try:
            _write_file(tmp / "OWNER", json.dumps({"token": self.token, **owner_info()}).encode(), self.file_mode)
            _write_file(tmp / "MANIFEST", manifest.to_bytes(), self.file_mode)
            fsync_dir(tmp)
            self.step("claim.built")
            os.rename(tmp, self._epoch_path(manifest.epoch))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FencedError(f"backend {self.path}: epoch {manifest.epoch} was claimed by another host "
                                  f"first") from None
            raise
        fsync_dir(self.epochdir)
        self.step("claim.renamed")
        if base is not None:
            now = self._manifest_of(base.epoch)
            if now is None or now.generation != base.generation:
                self._void(manifest.epoch)
                got = "gone" if now is None else f"generation {now.generation}"
                raise FencedError(f"backend {self.path} moved on while this host took over (epoch {base.epoch} "
                                  f"was at generation {base.generation}, is now {got}): run it again")
        self.owned_epoch = manifest.epoch

    def _void(self, epoch: int) -> None:
        """Withdraw our claim: first its MANIFEST (readers and later claimers' checks stop seeing it), then
        the directory, so the epoch can be claimed again."""
        directory = self._epoch_path(epoch)
        os.rename(directory / "MANIFEST", directory / "MANIFEST.void")
        fsync_dir(directory)
        trash = self.epochdir / f".trash-{epoch:010d}.{self.token}"
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.epochdir)
        log.warning("withdrew this host's claim of epoch %d in %s", epoch, self.path)

    # --- segments -----------------------------------------------------------------
    def open_segment_sink(self, name: str) -> SegmentSink:
        self.segdir.mkdir(mode=self.dir_mode, exist_ok=True)
        return _DirectorySink(self, name)

    def open_segment(self, name: str, *, sequential: bool = False) -> SegmentReader:
        path = self.segdir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise CorruptionError(f"baseline segment {path} is missing") from None
        except OSError as e:
            raise CorruptionError(f"baseline segment {path}: {e.strerror}") from None
        if sequential:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return _DirectoryReader(name, fd, str(path))

    def list_segments(self) -> list[str]:
        try:
            entries = list(os.scandir(self.segdir))
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if parse_segment_name(entry.name) is not None:
                if not entry.is_file(follow_symlinks=False):
                    raise BackendError(f"{entry.path} is not a regular file: segments/ holds only rmemfs "
                                       f"segments; move it away")
                names.append(entry.name)
            elif not _SEG_TEMP.fullmatch(entry.name) and entry.name not in self._warned:
                self._warned.add(entry.name)
                log.warning("%s is not an rmemfs file; it is left alone", entry.path)
        return names

    def delete_segment(self, name: str) -> None:
        if parse_segment_name(name) is None:
            raise ValueError(f"{name!r} is not a segment name")
        try:
            os.unlink(self.segdir / name)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise BackendError(f"{self.segdir / name} is a directory: segments/ holds only rmemfs segments") from None
        fsync_dir(self.segdir)

    def collect_partial(self, current: Manifest) -> int:
        removed = 0
        for entry in (list(os.scandir(self.segdir)) if self.segdir.is_dir() else []):
            m = _SEG_TEMP.fullmatch(entry.name)
            if (m and entry.is_file(follow_symlinks=False) and entry.name not in self._sinks
                    and int(m.group(2)) <= current.epoch):
                os.unlink(entry.path)
                removed += 1
        for name in (os.listdir(self.epochdir) if self.epochdir.is_dir() else []):
            claim = _CLAIM.fullmatch(name)
            old = _EPOCH_DIR.fullmatch(name) and int(name) < current.epoch
            if old or (claim and int(claim.group(1)) <= current.epoch):
                trash = self.epochdir / f".trash-{name[-10:] if old else claim.group(1)}.{self.token}"  # type: ignore[union-attr]
                os.rename(self.epochdir / name, trash)
                shutil.rmtree(trash)
                removed += 1
            elif _TRASH.fullmatch(name):
                shutil.rmtree(self.epochdir / name, ignore_errors=True)
        for name in ("MANIFEST", ".MANIFEST.tmp"):
            if self._epochs() and os.path.lexists(self.path / name):
                os.unlink(self.path / name)
                removed += 1
        if removed:
            for d in (self.segdir, self.epochdir, self.path):
                if d.is_dir():
                    fsync_dir(d)
        return removed


class _DirectorySink(SegmentSink):
    def __init__(self, store: DirectoryStore, name: str) -> None:
        super().__init__(name)
        self.store = store
        self.tmp = store.segdir / f".{name}.{store.token}.tmp"
        store._sinks.add(self.tmp.name)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, store.file_mode)

    def write(self, data: memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        try:
            os.rename(self.tmp, self.store.segdir / self.name)
        except FileNotFoundError:      # collected by a newer owner's GC: this writer's epoch is over
            raise FencedError(f"{self.tmp} was removed by a newer owner of {self.store.path}") from None
        finally:
            self.store._sinks.discard(self.tmp.name)
        fsync_dir(self.store.segdir)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.store._sinks.discard(self.tmp.name)
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


_DROP_ALIGN = 2 << 20     # the largest page-cache folio here (a PMD of 4 KiB pages)


class _DirectoryReader(SegmentReader):
    def __init__(self, name: str, fd: int, where: str) -> None:
        super().__init__(name, os.fstat(fd).st_size)
        self.fd = fd
        self.where = where

    def readinto(self, offset: int, buf: memoryview) -> None:
        want, got = len(buf), 0
        while got < want:
            try:
                n = os.preadv(self.fd, [buf[got:]], offset + got)
            except OSError as e:
                raise CorruptionError(f"{self.where}: read error at offset {offset + got}: {e.strerror}") from None
            if n == 0:
                raise CorruptionError(f"{self.where}: short read at offset {offset + got}")
            got += n

    def done_with(self, offset: int, length: int) -> None:
        # A lazy load copies each page once into the regions: its page cache copy would double the memory
        # the load needs, and reclaiming it under that pressure stalls the demand reads (8 GiB, 24 GiB host).
        # From a 2 MiB boundary down: the page cache drops only whole folios inside the range, and the readahead
        # of a sequential read makes folios of up to that size (what is below was read already, or is read again).
        start = offset - offset % _DROP_ALIGN
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, start, offset + length - start, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
