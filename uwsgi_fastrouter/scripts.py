"""Start-up scripts: ``--module``, ``--file`` and ``--wsgi-file`` run once, before routing.

uWSGI runs these in the master before it forks the router, typically to fill
the routing cache with ``uwsgi.cache_set`` calls.  :func:`run_startup_scripts`
does the same, with the ``uwsgi`` module of :mod:`uwsgi_shim` installed (and
left installed: threads a script starts and code-string mappers keep using it).

Order and names, as in uWSGI: modules first, then files.  A file is compiled
from its source (no bytecode is written next to it) and runs as a module named
``uwsgi_file_`` + its path as given, with ``.`` and ``/`` turned into ``_`` and
a final ``.py`` dropped (``sub/fill.py`` -> ``uwsgi_file_sub_fill``), registered
in ``sys.modules``; ``__file__`` is the path as given.  A module is imported by
name (``module:callable`` allowed, only the import matters; a name ending in
``.py`` or ``.wsgi`` is loaded as a file).  When something is to be run, the
current directory is put at the front of ``sys.path`` if it is not there
(uWSGI's Python has ``.`` there; the absolute path avoids import caches that
remember what ``.`` meant earlier).

A script needs no WSGI ``application``: its absence is only logged, with
uWSGI's line.  A script that raises (or does not compile, or cannot be found)
is a start-up failure: :class:`ScriptError`, whose message carries the
traceback, and the caller exits with status 1.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import types
from typing import List, Sequence, Union

from . import uwsgi_shim
from .log import log as _default_log

FILE_MODULE_PREFIX = "uwsgi_file_"

Names = Union[None, str, Sequence[str]]


class ScriptError(Exception):
    """A start-up script failed; ``str()`` is the whole report, traceback included."""

    def __init__(self, what: str, details: str) -> None:
        self.what = what
        self.traceback_text = details
        super().__init__("%s failed at start-up:\n%s" % (what, details.rstrip("\n")))


def file_module_name(path: str) -> str:
    """``uwsgi_file_`` + *path* with ``.`` and ``/`` as ``_``, without a final ``.py``."""
    mangled = path.replace(".", "_").replace("/", "_")
    if mangled.endswith("_py"):
        mangled = mangled[:-3]
    return FILE_MODULE_PREFIX + mangled


def _own_frames_removed(exc: BaseException) -> str:
    """The traceback of *exc* without the leading frames of this package and of importlib."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__") or ""
        if not (module.startswith("importlib") or module.startswith("_frozen_importlib")
                or module.startswith(__package__ + ".")):
            break
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def read_source(path: str) -> bytes:
    """The bytes of the source file *path* (OSError when it cannot be read)."""
    with open(path, "rb") as handle:
        return handle.read()


def exec_source(name: str, path: str, source: bytes, register: bool = True) -> types.ModuleType:
    """Run *source* (read from *path*) as a new module called *name*.

    With *register* the module is in ``sys.modules`` while it runs and after;
    without, only while it runs (so nothing can import it later).  Whatever the
    code raises (SyntaxError included) propagates.
    """
    code = compile(source, path, "exec", dont_inherit=True)
    module = types.ModuleType(name)
    module.__file__ = path
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        register = False
        raise
    finally:
        if not register:
            if previous is not None:
                sys.modules[name] = previous
            else:
                sys.modules.pop(name, None)
    return module


def _as_list(names: Names) -> List[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names] if names else []
    return [name for name in names if name]


def _run_file(path: str, log) -> None:
    try:
        source = read_source(path)
    except OSError as exc:
        raise ScriptError('python file "%s"' % path,
                          "unable to open it: %s" % (exc.strerror or exc))
    try:
        module = exec_source(file_module_name(path), path, source)
    except (Exception, SystemExit) as exc:
        raise ScriptError('python file "%s"' % path, _own_frames_removed(exc))
    if not callable(getattr(module, "application", None)):
        log('unable to find "application" callable in file %s' % path)


def _run_module(spec: str, log) -> None:
    name, _, callable_name = spec.partition(":")
    if name.endswith(".py") or name.endswith(".wsgi"):
        _run_file(name, log)
        return
    try:
        module = importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        raise ScriptError('python module "%s"' % name, _own_frames_removed(exc))
    callable_name = callable_name or "application"
    if not callable(getattr(module, callable_name, None)):
        log('unable to find "%s" callable in module %s' % (callable_name, name))


def run_startup_scripts(files: Names, wsgi_files: Names, modules: Names, *, registry,
                        options=None, log=_default_log) -> None:
    """Install the ``uwsgi`` module, then run *modules*, *files* and *wsgi_files* once.

    *registry* is the :class:`~uwsgi_fastrouter.cache.CacheRegistry` (or None) the
    scripts' ``uwsgi.cache_*`` calls use; *options* becomes ``uwsgi.opt`` (see
    :func:`uwsgi_shim.build_opt`).  Each of the three lists may also be a single
    string or None.  Raises :class:`ScriptError` on the first failing script.
    """
    uwsgi_shim.install(registry, options)
    module_specs = _as_list(modules)
    paths = _as_list(files) + _as_list(wsgi_files)
    if module_specs or paths:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
    if module_specs:
        importlib.invalidate_caches()      # modules written just before start-up
    for spec in module_specs:
        _run_module(spec, log)
    for path in paths:
        _run_file(path, log)
