"""Transports behind one interface (see ``base``), picked by name.

``software`` always works; ``verbs`` needs pyverbs and an RDMA device and is
the only module that imports pyverbs, lazily. ``auto`` picks verbs when a
device is present and logs the choice.
"""
from __future__ import annotations

import importlib
import logging
from typing import cast

from .base import ExportBackend, Transport, TransportUnavailable

log = logging.getLogger(__name__)

TRANSPORTS = {"software": "rmemfs.transport.software", "verbs": "rmemfs.transport.verbs"}


def load(name: str) -> Transport:
    """Import a transport module: each one is a ``base.Transport``."""
    try:
        module_name = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r} (choose from auto, {', '.join(TRANSPORTS)})") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TransportUnavailable(f"transport {name} cannot be loaded: {e}") from None
    if not isinstance(module, Transport):
        raise TypeError(f"{module_name} does not provide the transport interface (base.Transport)")
    return cast(Transport, module)


def resolve(name: str) -> str:
    """Turn ``auto`` into a concrete transport name; raise TransportUnavailable for an unusable choice."""
    if name == "auto":
        try:
            reason = load("verbs").available()
        except TransportUnavailable as e:
            reason = str(e)
        if reason is None:
            log.info("transport auto: an RDMA device is present, using verbs")
            return "verbs"
        log.info("transport auto: using software (%s)", reason)
        return "software"
    reason = load(name).available()
    if reason is not None:
        raise TransportUnavailable(f"transport {name} is unavailable: {reason}")
    return name


def export_backend(name: str) -> ExportBackend:
    """A new exporter-side registration backend for transport ``name``."""
    return load(name).export_backend()
