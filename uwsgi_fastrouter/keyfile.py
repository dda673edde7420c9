"""Reading a shared-secret key file (``--subscriptions-hmac-key``, ``--subscribe-hmac-key``).

Theory of operation
-------------------
The key is read once, at start-up (a graceful reload reads it again).  The file is
opened first and its permissions are taken from the open descriptor, so what is
checked is what is read.  Refused, each with a start-up error naming the file:

* a file that does not exist or cannot be read;
* anything but a regular file (a directory, a FIFO that would block the start...);
* a file that others may read or write (any of the mode bits 0007): a secret that
  every local user can read proves nothing.  Group bits are allowed, so services
  of one group can share a key;
* a key shorter than ``signing.HMAC_KEY_MIN`` bytes once surrounding white space is
  removed (an empty file included).

Symbolic links are followed (secret stores often mount keys as links); the checks
apply to the file they lead to.
"""

from __future__ import annotations

import os
import stat

from .signing import SigningError, load_hmac_key

__all__ = ["KEY_FILE_LIMIT", "read_hmac_key_file"]

#: a larger key file is not a key file
KEY_FILE_LIMIT = 64 * 1024


def read_hmac_key_file(path: str) -> bytes:
    """The shared key in *path*; :class:`~uwsgi_fastrouter.signing.SigningError`
    saying why the file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SigningError("cannot open the key file %s: %s" % (path, exc.strerror or exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SigningError("the key file %s is not a regular file" % path)
        if st.st_mode & 0o007:
            raise SigningError("the key file %s is open to other users (mode %04o); make it "
                               "readable by its owner (and group) only, e.g. chmod 600"
                               % (path, stat.S_IMODE(st.st_mode)))
        content = os.read(fd, KEY_FILE_LIMIT + 1)
    except OSError as exc:
        raise SigningError("cannot read the key file %s: %s" % (path, exc.strerror or exc)) from None
    finally:
        os.close(fd)
    if len(content) > KEY_FILE_LIMIT:
        raise SigningError("the key file %s is larger than %d bytes" % (path, KEY_FILE_LIMIT))
    try:
        return load_hmac_key(content)
    except SigningError as exc:
        raise SigningError("the key file %s: %s" % (path, exc)) from None
