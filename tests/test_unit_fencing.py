"""Unit tests of the fence request's transport seam (rmemfs/fencing.py): it goes through
``Connection.call_extension``, part of the transport interface, not an attribute looked up by name."""
from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from rmemfs.fencing import EXTENSION, FenceRefused, request_fence
from rmemfs.transport.base import Catalog, Connection, ProgressFn, ReadOp


class Bare(Connection):
    """A transport connection with no control channel: only the interface's defaults."""

    transport = "bare"

    async def register(self) -> Catalog:
        raise NotImplementedError

    async def read_batch(self, ops: Sequence[ReadOp], progress: ProgressFn | None = None) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class Fencing(Bare):
    def __init__(self, reply: object) -> None:
        self.reply, self.calls = reply, []    # type: ignore[var-annotated]

    async def call_extension(self, name: str, payload: bytes) -> bytes:
        self.calls.append((name, json.loads(payload)))
        return json.dumps(self.reply).encode()


async def test_a_transport_without_a_control_channel_is_refused_by_name() -> None:
    with pytest.raises(FenceRefused, match="transport bare has no control channel"):
        await request_fence(Bare(), 7)


async def test_the_fence_goes_through_call_extension_and_checks_the_epoch() -> None:
    conn = Fencing({"ok": True, "fence": 7})
    assert await request_fence(conn, 7) == {"ok": True, "fence": 7}
    assert conn.calls == [(EXTENSION, {"epoch": 7})]
    with pytest.raises(FenceRefused, match="did not fence"):
        await request_fence(Fencing({"ok": True, "fence": 6}), 7)     # an older fence does not stop epoch 7
