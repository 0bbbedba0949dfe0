"""Baseline stores: the interface (``base``), its byte formats (``format``), the directory store
(``directory``) and the baseline's live-page map (``live``)."""
from .base import BaselineStore, SegmentReader, SegmentSink, SegmentWriter, open_store, owner_info, register_scheme
from .format import (STATE_CLEAN, STATE_MOUNTED, Manifest, SegmentInfo, next_manifest, segment_epoch, segment_name,
                     split_key)
from .live import LiveMap

__all__ = ["BaselineStore", "SegmentReader", "SegmentSink", "SegmentWriter", "open_store", "owner_info",
           "register_scheme", "STATE_CLEAN", "STATE_MOUNTED", "Manifest", "SegmentInfo", "next_manifest",
           "segment_epoch", "segment_name", "split_key", "LiveMap"]
