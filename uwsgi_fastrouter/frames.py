"""The frames on a master <-> router process channel (a UNIX stream socketpair).

A frame is a 4-byte big-endian payload length, a type byte, then the payload.  The
types and their payloads are listed below; how the master and the router processes
use them is described in master.py.  No I/O here: bytes in, frames out.
"""

from __future__ import annotations

import struct
from typing import List

_FRAME = struct.Struct("!IB")

# Frame types on a master <-> router channel.
SUBSCRIPTION = ord("S")   # master -> router: an accepted subscription datagram (+ credentials)
FAILED = ord("F")         # both ways: a node failed a connect: key \0 address
QUERY = ord("Q")          # master -> router: send your counters (round number; a 1 byte after it:
                          # the totals only, for a metrics scrape)
REPORT = ord("R")         # router -> master: round number, last flag, a part of the counters (JSON)
READY = ord("Y")          # router -> master: my loop runs (I have started; no payload)
DRAIN = ord("D")          # master -> router: b"1" + address drains a node, b"0" + address undrains


def encode_frame(kind: int, payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), kind) + payload


class FrameReader:
    """Splits a byte stream into ``(kind, payload)`` frames."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> List[tuple]:
        self.buf += data
        frames = []
        while len(self.buf) >= _FRAME.size:
            length, kind = _FRAME.unpack_from(self.buf)
            if len(self.buf) < _FRAME.size + length:
                break
            frames.append((kind, bytes(self.buf[_FRAME.size:_FRAME.size + length])))
            del self.buf[:_FRAME.size + length]
        return frames
