"""Request vars the router removes before a request reaches a node.

Theory of operation
-------------------
A uWSGI node honours some request vars as instructions rather than as data: given
``UWSGI_FILE`` and an unknown ``UWSGI_APPID`` it loads and runs that file as a new
application, ``UWSGI_SETENV`` changes its environment, ``UWSGI_CHDIR`` its working
directory, and so on (the full list, with what each does, is in docs/behaviour.md,
"Stripping request vars").  A web server in front normally sends none of them, but
a client that can talk uwsgi to the router (or a front end that passes client
headers through as vars) can.

``--fastrouter-strip-vars RULE`` (repeatable) names what to remove: a var name, or a
prefix written as the name's beginning followed by ``*``.  Names are compared as
bytes, case-sensitively, as uWSGI compares them.  ``--fastrouter-strip-magic-vars``
adds every name of :data:`MAGIC_VARS`.

:class:`VarStripper` works on a complete, already validated head (header + vars;
``protocol.scan_request`` has checked every record before the stripper sees it).
Most requests carry none of the names, so the stripper first asks one C-level
substring search per *needle* (the rules' common beginning, e.g. ``UWSGI_`` for
the magic list) whether any of them occurs anywhere in the vars; only then are the
records walked.  A head without a match is returned as ``None`` (nothing to copy);
otherwise the new head is built: the original header with the datasize recomputed,
then every record that no rule matches, in order.  Every occurrence of a matching
name is removed.

Routing has happened before stripping, so stripping ``UWSGI_FASTROUTER_KEY`` (not
in the magic list: a node does not act on it) only hides it from the node.
"""

from __future__ import annotations

from typing import FrozenSet, Iterable, List, Optional, Tuple

__all__ = ["MAGIC_VARS", "StripRuleError", "VarStripper", "parse_rules", "make_stripper"]

#: The vars uWSGI 2.0's request parser acts on (core/protocol.c's var hooks).
MAGIC_VARS: Tuple[str, ...] = (
    "UWSGI_SCRIPT",        # load this module as a new app (dynamic apps)
    "UWSGI_MODULE",        # same, module part of module:callable
    "UWSGI_CALLABLE",      # the callable of a dynamically loaded app
    "UWSGI_FILE",          # load this file as a new app
    "UWSGI_APPID",         # pick (or name a new) app by id
    "UWSGI_PYHOME",        # the virtualenv of a dynamically loaded app
    "UWSGI_HOME",          # same as UWSGI_PYHOME
    "UWSGI_CHDIR",         # chdir() before loading a dynamic app
    "UWSGI_SETENV",        # NAME=VALUE: setenv() in the node's worker
    "UWSGI_TOUCH_RELOAD",  # a file whose change reloads the app
    "UWSGI_POSTFILE",      # open this file on the node and use it as the request body
    "UWSGI_CACHE_GET",     # answer from the node's cache under this key
    "UWSGI_SCHEME",        # the request's scheme (wsgi.url_scheme): http or https
)


class StripRuleError(ValueError):
    """A --fastrouter-strip-vars rule that cannot be used."""


def parse_rules(rules: Iterable[str], magic: bool = False) -> Tuple[FrozenSet[bytes], Tuple[bytes, ...]]:
    """(exact names, prefixes) from ``--fastrouter-strip-vars`` values (and the magic
    list when *magic*).  A rule is a name or a name's beginning followed by ``*``; an
    empty rule, a lone ``*`` or a ``*`` elsewhere than at the end is refused."""
    names = set()
    prefixes = set()
    for rule in rules:
        text = rule.strip()
        raw = text.encode("utf-8", "surrogateescape")
        if raw.endswith(b"*"):
            stem = raw[:-1]
            if not stem:
                raise StripRuleError("%r would remove every var: give at least one character "
                                     "before the *" % rule)
            if b"*" in stem:
                raise StripRuleError("%r: a * is only allowed at the end" % rule)
            prefixes.add(stem)
        elif not raw:
            raise StripRuleError("an empty name")
        elif b"*" in raw:
            raise StripRuleError("%r: a * is only allowed at the end" % rule)
        else:
            names.add(raw)
    if magic:
        names.update(name.encode("ascii") for name in MAGIC_VARS)
    # A name that a prefix already covers needs no separate test.
    names = {name for name in names if not name.startswith(tuple(prefixes))}
    return frozenset(names), tuple(sorted(prefixes))


def _common_prefix(words: List[bytes]) -> bytes:
    first, last = min(words), max(words)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def _needles(names: FrozenSet[bytes], prefixes: Tuple[bytes, ...]) -> Tuple[bytes, ...]:
    """The fewest byte strings such that a head containing none of them has no var to
    strip: the rules' common beginning when it is long enough to be selective, else
    the rules themselves (one that contains another is dropped)."""
    words = sorted(set(names) | set(prefixes))
    common = _common_prefix(words)
    if len(common) >= 4:
        return (common,)
    kept = [w for w in words if not any(other != w and other in w for other in words)]
    return tuple(kept)


class VarStripper:
    """Removes the vars matching a set of rules from request heads."""

    __slots__ = ("names", "prefixes", "needles", "_lengths", "_shortest")

    def __init__(self, names: FrozenSet[bytes], prefixes: Tuple[bytes, ...]) -> None:
        if not names and not prefixes:
            raise StripRuleError("no rule given")
        self.names = names
        self.prefixes = prefixes
        self.needles = _needles(names, prefixes)
        # The walk compares a name only when its length could match a rule.
        self._lengths = frozenset(len(name) for name in names)
        self._shortest = min((len(p) for p in prefixes), default=1 << 17)

    def matches(self, name: bytes) -> bool:
        return name in self.names or (bool(self.prefixes) and name.startswith(self.prefixes))

    def strip(self, head) -> Optional[bytearray]:
        """*head* is header + valid vars (bytes-like).  None when no var matches;
        otherwise the new head: the same modifiers, the recomputed datasize, and every
        var that no rule matches, in order."""
        data = head if type(head) is bytes else bytes(head)
        for needle in self.needles:
            if data.find(needle, 4) >= 0:
                break
        else:
            return None
        return self._rebuild(data)

    def _rebuild(self, data: bytes) -> Optional[bytearray]:
        names = self.names
        prefixes = self.prefixes
        lengths = self._lengths
        shortest = self._shortest
        out = bytearray(data[:4])
        end = len(data)
        pos = 4
        kept_from = 4           # start of the run of records kept so far
        removed = False
        while pos < end:
            klen = data[pos] | data[pos + 1] << 8
            kpos = pos + 2
            kend = kpos + klen
            vend = kend + 2 + (data[kend] | data[kend + 1] << 8)
            if ((klen in lengths and data[kpos:kend] in names)
                    or (klen >= shortest and data.startswith(prefixes, kpos, kend))):
                out += data[kept_from:pos]
                kept_from = vend
                removed = True
            pos = vend
        if not removed:
            return None
        out += data[kept_from:end]
        size = len(out) - 4
        out[1] = size & 0xFF
        out[2] = size >> 8
        return out


def make_stripper(rules: Iterable[str], magic: bool) -> Optional[VarStripper]:
    """The stripper for ``--fastrouter-strip-vars`` / ``--fastrouter-strip-magic-vars``;
    None when neither is given (the session then does no work at all)."""
    rules = list(rules)
    if not rules and not magic:
        return None
    names, prefixes = parse_rules(rules, magic)
    return VarStripper(names, prefixes)
