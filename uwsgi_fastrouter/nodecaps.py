"""Per-node concurrency caps (``--fastrouter-node-max-conns``) and the requests that
wait for a slot.

Theory of operation
-------------------
Every node record keeps ``ref``, the requests of this router process that hold it:
a lookup takes the reference, and the session gives it back exactly once, when it
closes or when its attempt on the node failed (router.py).  A subscribed node has
always had it (uWSGI's field, shown in the stats); a static node counts the same way.

With a cap, :meth:`NodeCaps.open_nodes` hides the nodes that hold as many requests as
their cap allows, before the balancing algorithm picks, so a request goes to another
node of its key.  When every alive node of the key is full, the lookup finds nothing
and :attr:`NodeCaps.full` says why; the session then waits in :class:`Waiting` for a
slot, at most ``--fastrouter-node-queue-wait`` seconds (0: it is refused at once),
and gets the usual close of a request without a node after that.

A node's cap is ``--fastrouter-node-max-conns``, or, with
``--fastrouter-node-max-conns-per-core M``, M times the ``cores`` a subscribed node
announces (uWSGI's nodes announce their number of processes times threads); a node
that announces no cores keeps ``--fastrouter-node-max-conns`` (0: no cap).

The caps count per router process: with ``--fastrouter-processes P`` a node may get up
to P times its cap.

Waiting sessions are kept in arrival order.  Each time a request gives a slot back,
the waiting sessions are offered the chance to route again, oldest first, until one
of them finds a node; a slot that frees up while that happens is offered again.
Nodes that join do not wake anybody: the next slot given back, or the time-out, does.
"""

from __future__ import annotations

from typing import Any, Dict, List


class NodeCaps:
    """The cap policy of one router process."""

    __slots__ = ("max_conns", "per_core", "queue_timeout", "full")

    def __init__(self, max_conns: int = 0, per_core: int = 0, queue_timeout: float = 0) -> None:
        self.max_conns = max_conns
        self.per_core = per_core
        self.queue_timeout = queue_timeout
        #: the last lookup found alive nodes, all of them at their cap
        self.full = False

    def limit(self, node: Any) -> int:
        """The most requests *node* may hold at once (0: no limit)."""
        if self.per_core:
            cores = getattr(node, "cores", 0)
            if cores > 0:
                return self.per_core * cores
        return self.max_conns

    def has_room(self, node: Any) -> bool:
        limit = self.limit(node)
        return not limit or node.ref < limit

    def open_nodes(self, nodes: List[Any]) -> List[Any]:
        """The alive nodes of *nodes* below their cap; sets :attr:`full` when there
        are alive nodes and none has room."""
        alive = [node for node in nodes if not node.death_mark]
        room = [node for node in alive if self.has_room(node)]
        if alive and not room:
            self.full = True
        return room


class Waiting:
    """Sessions waiting for a slot, oldest first.

    A waiting session has ``slot_freed() -> bool``: it tries to route again and says
    whether it found a node (it then leaves the queue; a session that closes leaves it
    with :meth:`discard`)."""

    __slots__ = ("sessions", "waking", "again")

    def __init__(self) -> None:
        self.sessions: Dict[Any, None] = {}
        self.waking = False
        self.again = False

    def __bool__(self) -> bool:
        return bool(self.sessions)

    def __len__(self) -> int:
        return len(self.sessions)

    def add(self, session: Any) -> None:
        self.sessions[session] = None

    def discard(self, session: Any) -> None:
        self.sessions.pop(session, None)

    def slot_freed(self) -> None:
        """A request gave a slot back: offer it to the waiting sessions in order."""
        if self.waking:
            self.again = True      # offered once the current round is over
            return
        self.waking = True
        try:
            self.again = True
            while self.again and self.sessions:
                self.again = False
                for session in list(self.sessions):
                    if session in self.sessions and session.slot_freed():
                        self.sessions.pop(session, None)
                        break
        finally:
            self.waking = False
