"""Moved to ``rmemfs.store`` (interface, formats, directory store, live map).

This shim keeps imports of branches written before the move working until they
are merged; new code imports from ``rmemfs.store``. Remove it once nothing imports it.
"""
from .store.base import STAGE_BYTES, SegmentWriter, owner_info
from .store.directory import DirectoryStore as Backend
from .store.format import (FOOTER_SIZE, STATE_CLEAN, STATE_MOUNTED, ZERO_BYTES, ZERO_HASH, ZERO_PAGE, Manifest,
                           SegmentInfo, next_manifest, segment_epoch, segment_name, split_key)
from .store.live import LiveMap

__all__ = ["STAGE_BYTES", "SegmentWriter", "owner_info", "Backend", "FOOTER_SIZE", "STATE_CLEAN", "STATE_MOUNTED",
           "ZERO_BYTES", "ZERO_HASH", "ZERO_PAGE", "Manifest", "SegmentInfo", "next_manifest", "segment_epoch",
           "segment_name", "split_key", "LiveMap"]
