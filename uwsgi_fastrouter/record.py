"""One request's record: the facts the access log and the metrics read when it ends.

Theory of operation
-------------------
A session is its own record; there is no second object.  Its slots are filled once,
on the path the request takes anyway, and read by both consumers when it closes:

``started``
    loop time of the accept;
``first_byte``
    loop time of the first response byte read from the node (0.0: none);
``ended``
    loop time of the close;
``key``, ``route`` / ``failed_address``, ``retries``, ``fallback_index``
    the routing key, the node that answered (or the last one that failed), the
    connect attempts after the first and the fallbacks among them;
``rx``, ``tx``
    bytes read from the client (request head and body) and bytes sent to it;
``outcome``
    one of the codes below, set once: by the session when no node could be found,
    else by its ``close()`` from the state it was in and the close reason;
``first``
    only with the access log on: the first response bytes, for the HTTP status.

Every time is the loop time (``Reactor.now``, read once per loop pass), so the record
costs no clock read; ttfb and the total are precise to one pass of the loop.  With
the access log and the metrics both off, a request pays for two byte counters (which
replace the process-wide ones it paid before) and a few stores at close.

The outcome codes are finer than either consumer's vocabulary; each maps them:
:data:`ACCESS_LOG_NAMES` (the ``%(outcome)`` variable) and :data:`METRICS_INDEX`
(the position in ``metrics.OUTCOMES``).
"""

from __future__ import annotations

from typing import Tuple

OK = 0            # relayed: the node answered through the router
HANDOFF = 1       # the client's descriptor was passed to the node, which took it
NO_ROUTE = 2      # no node for the key (or no key)
FAILED = 3        # every node tried failed to connect
ABORTED = 4       # closed while connecting, for another reason (no socket, shutdown)
TIMEOUT = 5       # --fastrouter-timeout passed
CLIENT_ERROR = 6  # a bad or vanished client, a refused body
NODE_ERROR = 7    # the node failed after the connect

#: code -> %(outcome) of the access log
ACCESS_LOG_NAMES: Tuple[str, ...] = ("ok", "handoff", "noroute", "failed",
                                     "error", "error", "error", "error")

#: code -> position in metrics.OUTCOMES (ok, no_route, connect_failed, timeout,
#: client_error, node_error); a handoff is an ``ok`` there.
METRICS_INDEX: Tuple[int, ...] = (0, 0, 1, 2, 2, 3, 4, 5)
