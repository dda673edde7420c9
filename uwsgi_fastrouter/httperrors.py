"""The short HTTP answers of ``--fastrouter-http-errors``.

Theory of operation
-------------------
uWSGI's router closes a client it cannot serve without a byte; a web server in front
turns that into its own 502, but a client that talks to the router directly (or
through a plain TCP balancer) only sees a reset.  With ``--fastrouter-http-errors``
the session writes one of these complete HTTP/1.0 responses first, and only when
the client has not received a response byte yet and was not handed over to a node
(session.py decides when):

``502``  no node could be reached (every connect failed), or the node closed the
         connection before sending any byte;
``503``  no node for the key (no key, an unknown key, no subscribed node), and any
         other "not now" refusal a policy may add (``Session.refuse``);
``504``  the node accepted the request but sent nothing within ``--fastrouter-timeout``.

The responses are built once, at import: the error path allocates nothing.  Each is
small enough to go out in one non-blocking send on a fresh connection.
"""

from __future__ import annotations

from typing import Dict

__all__ = ["BAD_GATEWAY", "SERVICE_UNAVAILABLE", "GATEWAY_TIMEOUT", "RESPONSES", "response"]

BAD_GATEWAY = 502
SERVICE_UNAVAILABLE = 503
GATEWAY_TIMEOUT = 504

_TEXTS = {
    BAD_GATEWAY: ("Bad Gateway", "no application node could be reached"),
    SERVICE_UNAVAILABLE: ("Service Unavailable", "no application node is available for this request"),
    GATEWAY_TIMEOUT: ("Gateway Timeout", "the application node did not answer in time"),
}


def _build(status: int, reason: str, text: str) -> bytes:
    body = ("%d %s: %s\n" % (status, reason, text)).encode("ascii")
    head = ("HTTP/1.0 %d %s\r\n"
            "Content-Type: text/plain\r\n"
            "Content-Length: %d\r\n"
            "Connection: close\r\n"
            "\r\n" % (status, reason, len(body))).encode("ascii")
    return head + body


#: status -> the whole response, head and body.
RESPONSES: Dict[int, bytes] = {status: _build(status, reason, text)
                               for status, (reason, text) in _TEXTS.items()}


def response(status: int) -> bytes:
    """The complete response for *status* (502, 503 or 504)."""
    return RESPONSES[status]
