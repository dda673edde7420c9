"""The ``uwsgi`` module that start-up scripts and code-string mappers import.

uWSGI gives the Python code it runs a built-in ``uwsgi`` module.  Scripts that
fill the routing cache (``--file``) use its cache functions, so :func:`install`
puts a module of that name into ``sys.modules`` offering the same calls, with
uWSGI 2.0's signatures and return values:

* ``cache_set(key, value[, expires[, cache_name]])``: True, or None when the key
  exists or the item is refused; ``cache_update`` (set or overwrite) likewise;
* ``cache_get(key[, cache_name])``: bytes or None (counts a hit on the item);
* ``cache_del``, ``cache_exists``: True or None; ``cache_clear([cache_name])``:
  True or None; ``cache_keys([cache_name])``: a list of bytes, ValueError
  ``no local uWSGI cache available`` when the cache does not exist;
* ``opt``: the options as given, name -> bytes (True for a flag given without a
  value; a list of bytes when an option was given several times), placeholders
  included; ``version`` (``b"2.0.31"``), ``numproc`` (0: there are no
  application workers), ``worker_id()`` (0).

Nothing else of uWSGI's module exists here; using anything else raises
AttributeError.  The arguments are positional only, as in uWSGI.  A missing
cache (``cache_name`` unknown, or no cache at all) makes every call return None.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

from . import UWSGI_COMPAT_VERSION

MODULE_NAME = "uwsgi"

OptionsArg = Union[Mapping[str, Any], Iterable[Tuple[str, Any]], None]


def _opt_value(value: Any) -> Any:
    if value is True:
        return True
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (list, tuple)):
        values = [_opt_value(v) for v in value if v is not None and v is not False]
        if not values:
            return None
        return values[0] if len(values) == 1 else values
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    return None


def build_opt(options: OptionsArg) -> Dict[str, Any]:
    """The ``uwsgi.opt`` dict from a mapping (or ``(name, value)`` pairs) of options.

    Values: str and int become bytes, True stays True, a list becomes bytes when it
    holds one value and a list of bytes when it holds several; None, False and empty
    lists are left out (the option counts as not given).  Pairs with a repeated name
    accumulate like a repeated option.
    """
    if options is None:
        return {}
    pairs = options.items() if isinstance(options, Mapping) else options
    gathered: Dict[str, list] = {}
    for name, value in pairs:
        values = value if isinstance(value, (list, tuple)) else [value]
        gathered.setdefault(str(name), []).extend(values)
    result: Dict[str, Any] = {}
    for name, values in gathered.items():
        converted = _opt_value(values)
        if converted is not None:
            result[name] = converted
    return result


def options_from_config(cfg) -> Dict[str, Any]:
    """``uwsgi.opt`` for a parsed :class:`uwsgi_fastrouter.options.Config`.

    Every option a source gave (with its effective value) and every placeholder.
    Integer options show their converted value (``--cache 3x`` gives ``b"3"``).
    """
    from .options import OPTIONS
    result: Dict[str, Any] = {}
    for option in OPTIONS:
        if cfg.given(option.name):
            value = _opt_value(getattr(cfg, option.attr, None))
            if value is not None:
                result[option.name] = value
    for name, value in getattr(cfg, "placeholders", {}).items():
        result.setdefault(name, _opt_value(value if value is not None else ""))
    return result


def _make_module(registry, opt: Dict[str, Any]) -> types.ModuleType:
    module = types.ModuleType(MODULE_NAME, "uWSGI's module, as far as uwsgi-fastrouter offers it.")

    def cache(name) -> Any:
        if registry is None:
            return None
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        return registry.get(name)

    def answer(ok: bool) -> Optional[bool]:
        return True if ok else None

    def cache_set(key, value, expires=0, cache_name=None, /):
        target = cache(cache_name)
        return None if target is None else answer(target.set(key, value, expires))

    def cache_update(key, value, expires=0, cache_name=None, /):
        target = cache(cache_name)
        return None if target is None else answer(target.update(key, value, expires))

    def cache_get(key, cache_name=None, /):
        target = cache(cache_name)
        return None if target is None else target.get(key)

    def cache_del(key, cache_name=None, /):
        target = cache(cache_name)
        return None if target is None else answer(target.delete(key))

    def cache_exists(key, cache_name=None, /):
        target = cache(cache_name)
        return None if target is None else answer(target.exists(key))

    def cache_clear(cache_name=None, /):
        target = cache(cache_name)
        if target is None:
            return None
        target.clear()
        return True

    def cache_keys(cache_name=None, /):
        target = cache(cache_name)
        if target is None:
            raise ValueError("no local uWSGI cache available")
        return target.keys()

    def worker_id():
        return 0

    for function in (cache_set, cache_update, cache_get, cache_del, cache_exists, cache_clear,
                     cache_keys, worker_id):
        function.__module__ = MODULE_NAME
        setattr(module, function.__name__, function)
    module.opt = opt
    module.version = UWSGI_COMPAT_VERSION.encode("ascii")
    module.numproc = 0
    return module


_installed: Optional[types.ModuleType] = None


def install(registry, options: OptionsArg = None) -> types.ModuleType:
    """Put a fresh ``uwsgi`` module bound to *registry* (a CacheRegistry or None) into
    ``sys.modules`` and return it; it replaces any previous one."""
    global _installed
    module = _make_module(registry, build_opt(options))
    sys.modules[MODULE_NAME] = module
    _installed = module
    return module


def uninstall() -> None:
    """Remove the ``uwsgi`` module installed by :func:`install`, if it is still there."""
    global _installed
    if _installed is not None and sys.modules.get(MODULE_NAME) is _installed:
        del sys.modules[MODULE_NAME]
    _installed = None
