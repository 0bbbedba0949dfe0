"""Baseline stores: the interface (``base``), its byte formats (``format``), the directory store
(``directory``), the RADOS store (``rados``) and the baseline's live-page map (``live``)."""
from .base import (BaselineStore, SegmentReader, SegmentSink, SegmentWriter, StoreOptions, backend_spec, open_store,
                   owner_info, parse_store_options, register_scheme, store_argv, store_option,
                   store_option_names)
from .format import (STATE_CLEAN, STATE_MOUNTED, Manifest, SegmentInfo, next_manifest, segment_epoch, segment_name,
                     split_key)
from .live import LiveMap
from . import rados as _rados  # noqa: F401 - registers rados:POOL[/PREFIX]; imports python3-rados lazily

__all__ = ["BaselineStore", "SegmentReader", "SegmentSink", "SegmentWriter", "StoreOptions", "backend_spec",
           "open_store", "owner_info", "parse_store_options", "register_scheme", "store_argv", "store_option",
           "store_option_names", "STATE_CLEAN", "STATE_MOUNTED", "Manifest", "SegmentInfo", "next_manifest",
           "segment_epoch", "segment_name", "split_key", "LiveMap"]
