"""What the subscription mapper reads from a request beyond its key: mountpoints and
the client that ``iphash`` hashes.

Theory of operation
-------------------
The plain request path reads a request's vars once, in
:func:`~uwsgi_fastrouter.protocol.scan_request`, which keeps only the key, the body
length and the client's address.  Two features need more, and only they pay for it:

Mountpoints (``--subscription-mountpoints N``)
    the key of a request becomes the host plus the first N segments of its
    ``PATH_INFO`` (``example.com`` and ``/app1/x`` give ``example.com/app1``), looked
    up first; when that key has no node the host key is looked up as usual.  The
    request itself, ``PATH_INFO`` included, is passed on unchanged.
``--fastrouter-hash-var NAME``
    ``iphash`` keys hash the value of the var NAME instead of ``REMOTE_ADDR``.

When either is configured, the router process scans requests with the function
:func:`make_scanner` returns: the usual scan plus one more pass over the (already
validated) vars for ``PATH_INFO`` and NAME, whose values ride along on the
:class:`RoutingInfo` it returns.  Without them the plain scan runs and nothing here
is called.

``iphash`` is decided per key, so the subscription table asks for the client only
when it picks a node for an iphash key: the router hands the session to the table
as an opaque *request*, and :func:`make_client_of`'s function turns it into bytes
at that moment: the hash var (when configured and present), else ``REMOTE_ADDR``
(the client as the web server saw it: behind nginx the connection's peer is nginx
for every request), else the connection's peer host (a UNIX peer has none: every
such request hashes alike).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .protocol import MAX_KEY_LENGTH, RequestInfo, scan_request

__all__ = ["RoutingInfo", "make_scanner", "mount_key", "make_client_of"]

_PATH_INFO = b"PATH_INFO"
_REMOTE_ADDR = b"REMOTE_ADDR"


class RoutingInfo(RequestInfo):
    """A :class:`~uwsgi_fastrouter.protocol.RequestInfo` with the extra values:
    ``path_info`` and ``hash_value`` (last occurrence, raw bytes, or ``None``)."""

    path_info: Optional[bytes] = None
    hash_value: Optional[bytes] = None


def _last_values(data: bytes, first: bytes, second: Optional[bytes]):
    """The last values of the vars *first* and *second* in a valid vars block."""
    end = len(data)
    pos = 0
    one = two = None
    while pos < end:
        klen = data[pos] | data[pos + 1] << 8
        kend = pos + 2 + klen
        vpos = kend + 2
        vend = vpos + (data[kend] | data[kend + 1] << 8)
        name = data[pos + 2:kend]
        if name == first:
            one = data[vpos:vend]
        elif name == second:
            two = data[vpos:vend]
        pos = vend
    return one, two


def make_scanner(mountpoints: int, hash_var: Optional[bytes]) -> Optional[Callable[..., RequestInfo]]:
    """The request scan for these options, or ``None`` when the plain one is enough."""
    if hash_var == _REMOTE_ADDR:
        hash_var = None  # scan_request keeps it already
    if not mountpoints and hash_var is None:
        return None
    path_name = _PATH_INFO if mountpoints else None
    first, second = (path_name, hash_var) if path_name else (hash_var, None)

    def scan(block: bytes, force_key: Optional[bytes] = None) -> RequestInfo:
        info = RoutingInfo._make(scan_request(block, force_key))  # raises on a bad block
        one, two = _last_values(block, first, second)
        if path_name:
            info.path_info, info.hash_value = one, two
        else:
            info.hash_value = one
        return info

    return scan


def mount_key(key: bytes, info: Any, segments: int) -> Optional[bytes]:
    """``key/seg1/.../segN`` from the first *segments* non-empty segments of the
    request's ``PATH_INFO`` (fewer if the path has fewer), or ``None`` when the path
    has none or the result would be longer than a key may be."""
    path = getattr(info, "path_info", None)
    if not path:
        return None
    parts = [part for part in path.split(b"/", segments + 1)[:segments + 1] if part][:segments]
    if not parts:
        return None
    mounted = key + b"/" + b"/".join(parts)
    return mounted if len(mounted) <= MAX_KEY_LENGTH else None


def _peer_host(peer: Any) -> bytes:
    if isinstance(peer, tuple) and peer:
        return str(peer[0]).encode("ascii", "replace")
    return b""


def make_client_of(hash_var: Optional[bytes]) -> Callable[[Any], bytes]:
    """What an iphash lookup hashes for a *request* (a session: ``info`` and ``caddr``;
    plain bytes are taken as they are)."""
    use_var = hash_var is not None and hash_var != _REMOTE_ADDR

    def client_of(request: Any) -> bytes:
        if type(request) is bytes:
            return request
        if request is None:
            return b""
        info = request.info
        if use_var:
            value = getattr(info, "hash_value", None)
            if value:
                return value
        value = info.remote_addr
        if value:
            return value
        return _peer_host(request.caddr)

    return client_of
