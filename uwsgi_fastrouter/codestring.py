"""``--fastrouter-use-code-string MOD1:FILE:FUNC``: a Python function maps keys to nodes.

Theory of operation
-------------------
FILE is loaded once, when the mapper is built (before any request), as a module
named ``uwsgi_fastrouter_codestring`` that is not left in ``sys.modules`` (no
other code can import it).  Its globals live as long as the router process, so
the function may keep state between calls (the round robin of the FastRouter
documentation does).  Failing to load it is a start-up error, as is a missing
FUNC; so is a modifier1 other than 0, because Python is the only language here.

Per request the mapper calls ``FUNC(key)`` with the key as ``str`` (UTF-8;
undecodable bytes kept as surrogate escapes), following decision D5 rather
than uWSGI 2.0.31's Python 3 plugin, which passes bytes and drops any str
result.  The function returns the backend as ``str`` or ``bytes``:
``"ADDR"`` or ``"ADDR,MODIFIER1"`` (0-255).  ``None`` or an empty value means
"no route".  An exception, a value of another type or a malformed modifier is
logged and also means "no route"; it never reaches the event loop.

The call runs inside the event loop, so a slow function stalls every
connection of the process.  It cannot be interrupted here; a call that takes
longer than *time_limit* seconds is logged so the cause can be found
(``--fastrouter-harakiri`` is the way to bound it).
"""

from __future__ import annotations

import time
import traceback
from typing import Optional, Tuple

from .log import log as _default_log
from .log import printable
from .router import Route
from .scripts import exec_source, read_source

MODULE_NAME = "uwsgi_fastrouter_codestring"


class CodeStringError(ValueError):
    """The code-string option or its file is unusable (a start-up error)."""


def parse_code_string(spec: str) -> Tuple[int, str, str]:
    """``MOD1:FILE:FUNC`` -> (modifier1, file, function); ValueError when malformed.

    As in uWSGI, FILE ends at the second colon and FUNC is the rest.
    """
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise CodeStringError('invalid code_string option "%s" (expected MODIFIER1:FILE:FUNCTION)'
                              % spec)
    try:
        modifier1 = int(parts[0].strip())
    except ValueError:
        raise CodeStringError('invalid code_string option "%s": modifier1 "%s" is not a number'
                              % (spec, parts[0]))
    return modifier1, parts[1], parts[2]


class _Garbage(Exception):
    """The function returned something that is not a route."""


def _route_from(result) -> Optional[Route]:
    if result is None:
        return None
    if isinstance(result, str):
        data = result.encode("utf-8", "surrogateescape")
    elif isinstance(result, (bytes, bytearray)):
        data = bytes(result)
    else:
        raise _Garbage("returned %s, expected str or bytes" % type(result).__name__)
    if not data:
        return None
    address, comma, modifier = data.partition(b",")
    modifier1 = 0
    if comma:
        text = modifier.strip()
        if not text.isdigit() or int(text) > 255:
            raise _Garbage("returned %r: the modifier1 after the comma must be 0-255" % result)
        modifier1 = int(text)
    if not address.strip():
        raise _Garbage("returned %r: no address" % result)
    return Route(address, modifier1, 0)


class CodeStringMapper:
    """Calls the configured Python function for every key; see the module doc."""

    def __init__(self, spec: str, *, time_limit: float = 1.0, log=_default_log,
                 clock=time.monotonic) -> None:
        modifier1, path, function_name = parse_code_string(spec)
        if modifier1 != 0:
            raise CodeStringError(
                'code_string "%s": only Python (modifier1 0) is supported, not modifier1 %d'
                % (spec, modifier1))
        try:
            source = read_source(path)
        except OSError as exc:
            raise CodeStringError('unable to open the code_string file "%s": %s'
                                  % (path, exc.strerror or exc))
        try:
            module = exec_source(MODULE_NAME, path, source, register=False)
        except (Exception, SystemExit) as exc:
            details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise CodeStringError('the code_string file "%s" failed to load:\n%s'
                                  % (path, details.rstrip("\n")))
        function = getattr(module, function_name, None)
        if not callable(function):
            raise CodeStringError('code_string: no function "%s" in "%s"' % (function_name, path))
        self.module = module
        self.function = function
        self.name = function_name
        self.path = path
        self.time_limit = time_limit
        self._log = log
        self._clock = clock

    def __call__(self, key: bytes) -> Optional[Route]:
        text = key.decode("utf-8", "surrogateescape")
        start = self._clock()
        try:
            result = self.function(text)
        except Exception as exc:
            self._log_failure(text, "raised " + self._describe(exc))
            return None
        finally:
            elapsed = self._clock() - start
            if elapsed > self.time_limit:
                self._log("[uwsgi-fastrouter] code_string function %s() blocked the router for "
                          "%.3f seconds (key: %s)" % (self.name, elapsed, self._printable(text)))
        try:
            return _route_from(result)
        except _Garbage as exc:
            self._log_failure(text, str(exc))
            return None

    # -- log helpers ------------------------------------------------------------

    @staticmethod
    def _printable(text: str) -> str:
        return printable(text)

    @staticmethod
    def _describe(exc: Exception) -> str:
        where = ""
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            last = frames[-1]
            where = " (%s line %d)" % (last.filename, last.lineno)
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return printable(summary.replace("\n", " ")) + where

    def _log_failure(self, text: str, what: str) -> None:
        self._log("[uwsgi-fastrouter] code_string function %s() %s for key %s: no route"
                  % (self.name, what, self._printable(text)))
