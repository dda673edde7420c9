"""--fastrouter-post-buffering: a request body read whole before any node is contacted.

Theory of operation
-------------------
:class:`BodyBuffering` is the policy of one router process (the four
``--fastrouter-post-buffering*`` options); :meth:`BodyBuffering.start` gives one
:class:`BufferedBody` per request that has a ``CONTENT_LENGTH``.

A body of up to ``limit`` bytes is kept in memory behind the head, and the whole
buffer goes to the node as one block.  A larger body goes to an unlinked temporary
file (in ``directory``) and is copied to the node with ``os.sendfile`` after the
head.  Reading stops at ``CONTENT_LENGTH``: bytes past it that arrived in the same
read as the head are kept and sent after the body, as plain relaying would send
them.

What one request may cost is bounded: a ``CONTENT_LENGTH`` over ``max_size`` is
refused at once, and with ``min_rate`` the whole body must arrive within the
router's time-out plus ``CONTENT_LENGTH / min_rate`` seconds (the idle time-out
alone restarts with every byte).

Nothing here touches a socket or the loop: the session reads, and hands the bytes
over with :meth:`BufferedBody.add`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

# The largest piece one sendfile call is asked to copy.
_SENDFILE_PIECE = 1 << 22


class BufferedBody:
    """One request's head and body while it is being buffered, then while the body
    file (if any) is copied to the node."""

    __slots__ = ("left", "head", "file", "size", "sent", "tail")

    def __init__(self, head: bytearray, left: int, file=None, size: int = 0,
                 tail: Optional[bytes] = None) -> None:
        self.left = left      # body bytes still to read from the client
        self.head = head      # header + vars (+ the body, when kept in memory)
        self.file = file      # the body in an unlinked temporary file, or None
        self.size = size      # bytes in the file
        self.sent = 0         # bytes of the file the node has
        self.tail = tail      # bytes past the body read with the head (file case)

    def add(self, data) -> None:
        """Body bytes from the client (at most ``left``); OSError from the file."""
        if self.file is not None:
            self.file.write(data)
        else:
            self.head += data
        self.left -= len(data)

    def finish(self) -> bytes:
        """The body is complete: what is sent first (the head, or everything)."""
        if self.file is not None:
            self.file.flush()
        head = bytes(self.head)
        self.head = bytearray()
        return head

    @property
    def in_file(self) -> bool:
        return self.file is not None

    def send_to(self, fd: int) -> int:
        """Copy the next piece of the file to *fd*; the bytes sent (0: the file is
        shorter than it should be).  BlockingIOError and OSError propagate."""
        sent = os.sendfile(fd, self.file.fileno(), self.sent, min(self.size - self.sent, _SENDFILE_PIECE))
        self.sent += sent
        return sent

    @property
    def all_sent(self) -> bool:
        return self.sent >= self.size

    def close(self) -> None:
        if self.file is not None:
            self.file.close()   # unlinked: closing it frees the disk space
            self.file = None


class BodyBuffering:
    """The post-buffering policy of one router process."""

    __slots__ = ("limit", "directory", "max_size", "min_rate", "timeout")

    def __init__(self, limit: int, directory: Optional[str] = None, max_size: int = 0,
                 min_rate: int = 0, timeout: float = 60) -> None:
        self.limit = limit            # bodies up to this size in memory
        self.directory = directory    # larger ones in a temporary file here
        self.max_size = max_size      # refuse bodies over this size (0: no cap)
        self.min_rate = min_rate      # bytes/s a body must keep up (0: no floor)
        self.timeout = timeout        # --fastrouter-timeout

    def refusal(self, length: int) -> Optional[str]:
        """Why a body of *length* bytes is refused at once, or None."""
        cap = self.max_size
        if cap and length > cap:
            return ("request body of %d bytes refused: over --fastrouter-post-buffering-max %d"
                    % (length, cap))
        return None

    def allowed_seconds(self, length: int) -> float:
        """How long the whole body may take to arrive (0: no limit but the idle one)."""
        if not self.min_rate:
            return 0.0
        return self.timeout + length / self.min_rate

    def too_slow(self, body: BufferedBody, length: int, allowed: float) -> str:
        return ("request body not complete after %.1f seconds (%d of %d bytes missing; "
                "--fastrouter-post-buffering-min-rate %d)" % (allowed, body.left, length, self.min_rate))

    def start(self, buf, total: int, have: int, length: int) -> BufferedBody:
        """*buf[:total]* is the head, *buf[total:have]* what came with it; OSError when
        the temporary file cannot be made."""
        early = have - total
        left = length - min(early, length)
        if length <= self.limit:
            return BufferedBody(bytearray(buf[:have]), left)
        body_file = tempfile.TemporaryFile(dir=self.directory)
        tail = None
        if early:
            try:
                body_file.write(buf[total:total + min(early, length)])
            except OSError:
                body_file.close()
                raise
            if early > length:
                tail = bytes(buf[total + length:have])
        return BufferedBody(bytearray(buf[:total]), left, body_file, length, tail)
