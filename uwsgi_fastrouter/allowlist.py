"""Which senders may announce: ``--subscription-allow`` (docs/decisions.md D25).  Pure, no I/O.

Theory of operation
-------------------
Each ``--subscription-allow`` value is one rule; a datagram is looked at only when
its sender matches at least one rule (no rule at all: every sender, as uWSGI).  The
check runs before the datagram is parsed, so a refused sender costs a lookup and a
counter, never a parse or a table entry.  A rule is:

``ADDRESS[/PREFIX]``
    an IPv4 or IPv6 network for UDP senders (``10.0.0.0/8``, ``fd00::/8``,
    ``127.0.0.1``).  An IPv4 sender reaching an IPv6 socket (``::ffff:10.1.2.3``)
    is matched as the IPv4 address it is.
``/PATH``
    a UNIX sender whose socket is bound at exactly PATH; a PATH ending in ``/`` or
    ``*`` is a prefix (the ``*`` removed): ``/run/subscribers/`` admits every
    socket in that directory tree.  A sender path that is not in canonical form
    (``.`` or ``..`` parts, doubled or trailing slashes) matches no rule: such a
    path could start with an allowed prefix and lead elsewhere.
``@NAME``
    a UNIX sender bound in the Linux abstract namespace at NAME (exactly, or as a
    prefix when NAME ends in ``*``).  Note that the abstract namespace has no
    permissions: anyone may bind any free name.
``unbound``
    a UNIX sender whose socket has no address (uWSGI's subscribers send from such
    sockets).  Who may send to a UNIX subscription socket at all is then up to the
    socket file's permissions.

Senders on one family never match rules of the other: a list of networks refuses
every UNIX sender, a list of paths every UDP sender.
"""

from __future__ import annotations

import ipaddress
import posixpath
from typing import Dict, Iterable, List, Optional, Tuple, Union

__all__ = ["AllowListError", "SourceAllowList", "UNBOUND", "allow_list"]

UNBOUND = "unbound"
#: sender hosts (and, apart, sender paths) whose verdict is remembered
_HOST_CACHE = 4096

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class AllowListError(ValueError):
    """A ``--subscription-allow`` value is neither a network, a path nor ``unbound``."""


class SourceAllowList:
    """The parsed rules; :meth:`allows` answers for one sender address as the
    ``recvfrom`` family of calls returns it."""

    __slots__ = ("networks4", "networks6", "paths", "path_prefixes", "abstract",
                 "abstract_prefixes", "unbound", "specs", "_hosts", "_paths")

    def __init__(self, specs: Iterable[str]) -> None:
        self.specs: Tuple[str, ...] = tuple(specs)
        self.networks4: List[ipaddress.IPv4Network] = []
        self.networks6: List[ipaddress.IPv6Network] = []
        self.paths: set = set()
        self.path_prefixes: List[str] = []
        self.abstract: set = set()
        self.abstract_prefixes: List[bytes] = []
        self.unbound = False
        # host text -> verdict: parsing an address costs more than the rest of the
        # check; bounded (cleared when full), as senders choose their addresses
        self._hosts: Dict[str, bool] = {}
        self._paths: Dict[str, bool] = {}
        for spec in self.specs:
            self._add(spec)

    def _add(self, spec: str) -> None:
        text = spec.strip()
        if text == UNBOUND:
            self.unbound = True
        elif text.startswith("/"):
            self._add_path(text)
        elif text.startswith("@") and len(text) > 1:
            name = text[1:].encode("utf-8", "surrogateescape")
            if name.endswith(b"*"):
                self.abstract_prefixes.append(b"\0" + name[:-1])
            else:
                self.abstract.add(b"\0" + name)
        else:
            network = _network(spec, text)
            if network.version == 4:
                self.networks4.append(network)
            else:
                self.networks6.append(network)

    def _add_path(self, text: str) -> None:
        if text.endswith("*"):
            self.path_prefixes.append(text[:-1])
        elif text.endswith("/"):
            self.path_prefixes.append(text)
        else:
            self.paths.add(text)

    def allows(self, sender: object) -> bool:
        """True if a datagram from *sender* may be looked at."""
        if isinstance(sender, tuple):
            return self._allows_ip(sender[0]) if sender else False
        if sender is None or sender == "" or sender == b"":
            return self.unbound
        if isinstance(sender, bytes):
            if sender.startswith(b"\0"):
                return self._allows_abstract(sender)
            sender = sender.decode("utf-8", "surrogateescape")
        if isinstance(sender, str):
            return self._allows_path(sender)
        return False

    def _allows_ip(self, host: object) -> bool:
        return _remembered(self._hosts, str(host), self._judge_ip)

    def _judge_ip(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        networks = self.networks4 if address.version == 4 else self.networks6
        return any(address in network for network in networks)

    def _allows_path(self, path: str) -> bool:
        return _remembered(self._paths, path, self._judge_path)

    def _judge_path(self, path: str) -> bool:
        if path in self.paths:
            return True
        if not self.path_prefixes or posixpath.normpath(path) != path:
            return False
        return any(path.startswith(prefix) for prefix in self.path_prefixes)

    def _allows_abstract(self, name: bytes) -> bool:
        return name in self.abstract or any(name.startswith(p) for p in self.abstract_prefixes)


def _remembered(verdicts: Dict[str, bool], sender: str, judge) -> bool:
    """*judge(sender)*, remembered in *verdicts* (cleared when it is full)."""
    verdict = verdicts.get(sender)
    if verdict is None:
        if len(verdicts) >= _HOST_CACHE:
            verdicts.clear()
        verdict = verdicts[sender] = judge(sender)
    return verdict


def _network(spec: str, text: str) -> _Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise AllowListError("%r is neither a network (ADDRESS[/PREFIX]), a path (/PATH, "
                             "@NAME) nor %r" % (spec, UNBOUND)) from None


def allow_list(specs: Iterable[str]) -> Optional[SourceAllowList]:
    """The allow list for the ``--subscription-allow`` values (``None`` when there is
    none: every sender is allowed)."""
    specs = [spec for spec in specs if spec.strip()]
    return SourceAllowList(specs) if specs else None
