"""Which handed-over clients need the node's verdict (``--fastrouter-trust-fd-passing``).

Theory of operation
-------------------
By default (docs/decisions.md D2) every client handed to a UNIX-socket node stays open in
the router until the node gives its verdict on the connection that carried the
descriptor: it closes without a byte (it took the client) or it answers (it ignored
the descriptor, as every uWSGI 2.0 does, and the answer is relayed).  Waiting costs
a poll registration, a wake-up and a read per request, and keeps the router in the
client's life until the node has looked at it.

With ``--fastrouter-trust-fd-passing`` the operator says the UNIX nodes take
descriptors.  The router still verifies that, per node address:

* a node's first :data:`TRUST_AFTER` handoffs all wait for the verdict; only after
  that many "taken" verdicts in a row does the router close its side right after
  the handing-over ``sendmsg`` (an *unchecked* handoff);
* from then on one handoff in :data:`CHECK_EVERY` is verified again, so a node that
  was replaced by one that ignores descriptors is found within that many requests
  (the handoffs that follow a check do not wait for its verdict: under load a
  whole poll batch would otherwise be verified each time);
* an "ignored" verdict or a failed connect (a node restarting) resets the node to
  zero: it is verified from scratch.

What is lost when the trust is wrong: an unchecked client handed to a node that
ignores descriptors is closed when that node reads the request (the kernel closes
a descriptor nobody receives), so at most :data:`CHECK_EVERY` - 1 requests between
two checks.  That is why the mode is opt-in.  (The handoff itself and the two verdicts:
docs/wire.md, "Descriptor passing"; the rules in short: docs/behaviour.md.)

The bookkeeping is pure (no sockets, no clock): the session asks :meth:`unchecked`
before it hands a client over and reports verdicts with :meth:`taken` and
:meth:`ignored`.  While a node is earning trust, a handoff counts when its
"taken" verdict arrives (concurrent ones all wait for theirs); once trusted, every
handoff counts when it is made, the periodic check included.
"""

from __future__ import annotations

from typing import Dict

# "Taken" verdicts in a row before handoffs to a node go unchecked.
TRUST_AFTER = 8
# One handoff in this many is verified again once a node is trusted.
CHECK_EVERY = 64
# Addresses remembered at most (subscriptions can bring many short-lived nodes).
MAX_NODES = 4096


class HandoffTrust:
    """Per node address: handoffs in a row since the last doubt."""

    __slots__ = ("enabled", "counts", "unchecked_total", "reverted")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.counts: Dict[bytes, int] = {}
        self.unchecked_total = 0   # handoffs that did not wait for a verdict
        self.reverted = 0          # trusted nodes found ignoring a descriptor

    def unchecked(self, address: bytes) -> bool:
        """True when this handoff to *address* may skip the verdict (and is counted)."""
        if not self.enabled:
            return False
        counts = self.counts
        n = counts.get(address, 0)
        if n < TRUST_AFTER:
            return False
        counts[address] = n + 1
        if n % CHECK_EVERY == 0:
            return False            # the periodic check
        self.unchecked_total += 1
        return True

    def taken(self, address: bytes) -> None:
        """A verified handoff: the node closed without a byte."""
        if not self.enabled:
            return
        counts = self.counts
        n = counts.get(address, 0)
        if n >= TRUST_AFTER:
            return                  # a periodic check, counted when it was made
        if not n and len(counts) >= MAX_NODES:
            counts.clear()
        counts[address] = n + 1

    def ignored(self, address: bytes) -> bool:
        """A verified handoff: the node answered on its connection.

        Returns True when the node had been trusted (worth a log line)."""
        if not self.enabled:
            return False
        was_trusted = self.counts.pop(address, 0) >= TRUST_AFTER
        if was_trusted:
            self.reverted += 1
        return was_trusted

    def forget(self, address: bytes) -> None:
        """The node could not be reached: verify it from scratch when it is back."""
        if self.enabled:
            self.counts.pop(address, None)


class Handoffs:
    """What a session asks about descriptor passing (decisions.md D2): whether to hand
    its client to a UNIX node with the head, whether that handoff may skip the node's
    verdict, and what the verdict means.

    A node that takes the descriptor answers the client itself and closes the router's
    connection without a byte; one that ignores it (every uWSGI 2.0) answers on that
    connection, and the answer is relayed as usual.  Only requests without a body are
    handed over: the client is not read meanwhile, and there is nothing to relay
    upstream.  ``count`` is the number of clients a node took over."""

    __slots__ = ("enabled", "trust", "taken_count", "unchecked")

    def __init__(self, enabled: bool, trust: bool = False) -> None:
        self.enabled = enabled
        self.trust = HandoffTrust(enabled and trust)
        self.taken_count = 0          # verified handoffs the node took
        #: ``unchecked(address)``: True when the handoff just made to *address* needs
        #: no verdict: the node is trusted, the session closes its side at once (and
        #: the handoff is counted, in the trust's ``unchecked_total``).  The trust's
        #: own method, bound here: it runs for every request handed over.
        self.unchecked = self.trust.unchecked

    @property
    def count(self) -> int:
        """Clients a node took over: verified and unchecked handoffs."""
        return self.taken_count + self.trust.unchecked_total

    def may_pass(self, bodyless: bool) -> bool:
        """Whether the client of a request goes to a UNIX node with its head."""
        return self.enabled and bodyless

    def taken(self, address: bytes) -> None:
        """The node at *address* closed without a byte: it took the client."""
        self.taken_count += 1
        self.trust.taken(address)

    def ignored(self, address: bytes) -> bool:
        """The node at *address* answered on its connection; True when it had been
        trusted (worth a log line)."""
        return self.trust.ignored(address)

    def unreachable(self, address: bytes) -> None:
        """A connect to *address* failed: its trust starts from scratch."""
        self.trust.forget(address)
