"""systemd readiness notification (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``, if set."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str = "READY=1") -> bool:
    """Send ``message``; False (logged at debug) when there is no socket or it cannot be reached."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):              # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", path, e)
        return False
    return True
