"""The frames on a master <-> router process channel (a UNIX stream socketpair).

A frame is a 4-byte big-endian payload length, a type byte, then the payload.  The
types and their payloads are listed below; how the master and the router processes
use them is described in master.py.  No I/O here: bytes in, frames out.
"""

from __future__ import annotations

import marshal
import struct
from typing import List, Optional

_FRAME = struct.Struct("!IB")

# Frame types on a master <-> router channel.
ANNOUNCEMENTS = ord("A")  # master -> router: the announcements the master accepted in one pass of
                          # its loop, parsed: see encode_announcements()
FAILED = ord("F")         # both ways: a node failed a connect: key \0 address
QUERY = ord("Q")          # master -> router: send your counters (round number; a 1 byte after it:
                          # the totals only, for a metrics scrape)
REPORT = ord("R")         # router -> master: round number, last flag, a part of the counters (JSON)
READY = ord("Y")          # router -> master: my loop runs (I have started; no payload)
DRAIN = ord("D")          # master -> router: b"1" + address drains a node, b"0" + address undrains


#: the marshal format of ANNOUNCEMENTS payloads (both ends run the same interpreter: a
#: router process is forked from its master)
_MARSHAL_VERSION = 4


def encode_announcements(batch: list) -> bytes:
    """The payload of an ANNOUNCEMENTS frame: ``[(pid, uid, gid, fields), ...]``, each
    *fields* the plain tuple of one parsed announcement (bytes, ints, bools, None), in
    the order the master accepted them.  The master parses each datagram once; a router
    process rebuilds the announcements without parsing anything."""
    return marshal.dumps(batch, _MARSHAL_VERSION)


def decode_announcements(payload: bytes) -> Optional[list]:
    """The batch of an ANNOUNCEMENTS payload, or None if it is not one.  The payload
    comes from the master over the process's private channel, never from a peer."""
    try:
        batch = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    return batch if type(batch) is list else None


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
