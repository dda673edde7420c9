"""The package's import arrows point down, and nothing outside the standard library is used.

Every module of ``uwsgi_fastrouter`` is parsed with ``ast`` (never imported), and every
import statement in it, at any depth, is checked against the rules below.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, List, Set, Tuple

import pytest

PACKAGE = "uwsgi_fastrouter"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Pure modules: codecs and configuration parsing do no I/O of their own.
PURE_MODULES = ("protocol", "ini", "options", "subscription", "addresses")
IO_MODULES = {"socket", "_socket", "selectors", "os", "posix", "select"}
# ini.py reads host facts for the %h %u %g %k magic (uid, gid, CPU count): it may use
# os for those, never sockets or selectors.
PURE_EXCEPTIONS = {"ini": {"os"}}

# The reactor knows nothing of the router; it may only log.
REACTOR_MAY_IMPORT = {"log"}
# The one accept path sits on the reactor and knows nothing of uwsgi either.
ACCEPTOR_MAY_IMPORT = {"log", "reactor"}

# Only the entry point may import the command line.
CLI_IMPORTERS = {"__main__"}

# Standard library top-level names for Python 3.9 (sys.stdlib_module_names exists from
# 3.10 on).  Only names a network daemon could plausibly use; an unlisted stdlib module
# used on 3.9 shows up here as a failure to extend the list, not as a silent pass.
STDLIB_39 = frozenset("""
__future__ _collections _heapq _io _posixsubprocess _socket _ssl _struct _thread _weakref abc argparse array ast asyncio atexit base64 binascii bisect builtins
calendar codecs collections concurrent configparser contextlib contextvars copy csv ctypes
dataclasses datetime decimal difflib dis email enum errno faulthandler fcntl fnmatch
functools gc getopt getpass gettext glob grp gzip hashlib heapq hmac html http importlib
inspect io ipaddress itertools json keyword linecache locale logging marshal math mimetypes
mmap multiprocessing numbers operator optparse os pathlib pickle platform posix posixpath
pprint pwd queue random re reprlib resource runpy sched secrets select selectors shlex shutil
signal socket socketserver sqlite3 ssl stat statistics string struct subprocess sys sysconfig
syslog tempfile termios textwrap threading time timeit token tokenize traceback tracemalloc
types typing unicodedata urllib uuid warnings weakref zlib
""".split())


def stdlib_names() -> frozenset:
    names = getattr(sys, "stdlib_module_names", None)
    return frozenset(names) if names is not None else STDLIB_39


def modules() -> List[Path]:
    return sorted(PACKAGE_DIR.glob("*.py"))


def imports(path: Path) -> Iterator[Tuple[int, str, str]]:
    """(line, kind, name) for every import in *path*.

    kind ``"abs"``: an absolute module (name = top-level name);
    kind ``"own"``: a module of this package (name = the module, e.g. ``log``; ``""`` for
    the package's ``__init__``).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _classify(node.lineno, alias.name, ())
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names)
            if node.level:
                yield from _own(node.lineno, node.module or "", names)
            else:
                yield from _classify(node.lineno, node.module or "", names)


def _classify(line: int, dotted: str, names: Tuple[str, ...]) -> Iterator[Tuple[int, str, str]]:
    top, _, rest = dotted.partition(".")
    if top == PACKAGE:
        yield from _own(line, rest, names)
    else:
        yield line, "abs", top


def _own(line: int, module: str, names: Tuple[str, ...]) -> Iterator[Tuple[int, str, str]]:
    if module:
        yield line, "own", module.split(".")[0]
    else:
        # ``from . import log`` imports a submodule when one of that name exists,
        # otherwise a name defined in __init__.
        for name in names:
            if (PACKAGE_DIR / (name + ".py")).exists():
                yield line, "own", name
            else:
                yield line, "own", ""


def module_ids() -> List[str]:
    return [p.stem for p in modules()]


def test_the_package_has_modules():
    names = module_ids()
    assert "__init__" in names and "__main__" in names


@pytest.mark.parametrize("path", modules(), ids=module_ids())
def test_only_stdlib_and_own_package(path: Path):
    allowed = stdlib_names()
    bad = ["%s:%d imports %s" % (path.name, line, name)
           for line, kind, name in imports(path) if kind == "abs" and name not in allowed]
    assert not bad, "third-party (or unknown) imports: %s" % bad


PURE_PATHS = [p for p in modules() if p.stem in PURE_MODULES]


@pytest.mark.parametrize("path", PURE_PATHS, ids=[p.stem for p in PURE_PATHS])
def test_pure_modules_do_no_io(path: Path):
    bad = ["%s:%d imports %s" % (path.name, line, name)
           for line, kind, name in imports(path)
           if kind == "abs" and name in IO_MODULES - PURE_EXCEPTIONS.get(path.stem, set())]
    assert not bad, "a pure module must not import %s: %s" % (sorted(IO_MODULES), bad)


def test_reactor_imports_nothing_of_the_package_but_log():
    path = PACKAGE_DIR / "reactor.py"
    if not path.exists():
        pytest.skip("reactor.py not written yet")
    own: Set[str] = {name for _, kind, name in imports(path) if kind == "own"}
    assert own <= REACTOR_MAY_IMPORT, "reactor.py imports %s" % sorted(own - REACTOR_MAY_IMPORT)


def test_the_acceptor_imports_only_the_log_and_the_reactor():
    own: Set[str] = {name for _, kind, name in imports(PACKAGE_DIR / "acceptor.py") if kind == "own"}
    assert own <= ACCEPTOR_MAY_IMPORT, "acceptor.py imports %s" % sorted(own - ACCEPTOR_MAY_IMPORT)


def test_addresses_imports_nothing_of_the_package():
    own = [name for _, kind, name in imports(PACKAGE_DIR / "addresses.py") if kind == "own"]
    assert own == [], "addresses.py (rank 1) imports %s" % own


@pytest.mark.parametrize("path", modules(), ids=module_ids())
def test_nothing_imports_the_command_line(path: Path):
    if path.stem in CLI_IMPORTERS or path.stem == "cli":
        return
    bad = [line for line, kind, name in imports(path) if kind == "own" and name == "cli"]
    assert not bad, "%s imports cli (lines %s); only %s may" % (path.name, bad, sorted(CLI_IMPORTERS))


def test_the_checker_sees_every_import_form(tmp_path):
    # The rules are only as good as the parser: check it on a sample of every form.
    sample = PACKAGE_DIR / "__init__.py"
    assert sample.exists()
    src = tmp_path / "sample.py"
    src.write_text(
        "import os\n"
        "import os.path as p\n"
        "from socket import socket\n"
        "from . import log\n"
        "from .cli import main\n"
        "from uwsgi_fastrouter.reactor import Reactor\n"
        "from uwsgi_fastrouter import __version__\n"
        "def f():\n"
        "    import select\n")
    got = sorted(imports(src))
    assert got == sorted([
        (1, "abs", "os"), (2, "abs", "os"), (3, "abs", "socket"), (4, "own", "log"),
        (5, "own", "cli"), (6, "own", "reactor"), (7, "own", ""), (9, "abs", "select"),
    ])


# Every module's rank.  An import may only go to a strictly lower rank, so the arrows
# of the whole package point down and there is no cycle.  The integer part is the layer
# (0 log, 1 pure, 2 I/O, 3 engine, 4 process, 5 entry points); the tenths order modules
# inside a layer where one builds on another (a mapper plug-in on the router, the
# runtime builder on the master).  A new module must be placed here: an unranked
# module fails the test.
RANKS = {
    "": 0, "log": 0,
    # 1: pure codecs, tables and configuration
    "protocol": 1.0, "addresses": 1.0, "allowlist": 1.0, "slowstart": 1.0, "handoff": 1.0,
    "ini": 1.0, "signing": 1.0, "frames": 1.0, "record": 1.0, "stripvars": 1.0, "httperrors": 1.0,
    "nodecaps": 1.0,
    "names": 1.1, "options": 1.1, "subscription": 1.1, "balancing": 1.1, "metrics": 1.1,
    "stats": 1.2,
    # 2: I/O
    "reactor": 2.0, "fdpass": 2.0, "sdnotify": 2.0, "keyfile": 2.0,
    "sockets": 2.1, "acceptor": 2.1, "resolver": 2.1, "tlsnode": 2.1,
    # 3: the engine
    "router": 3.0, "accesslog": 3.0, "bodybuffer": 3.0, "health": 3.0, "subserver": 3.0,
    "subscriber": 3.0, "zerg": 3.0, "wsgiserver": 3.0, "endpoints": 3.0, "expiry": 3.0,
    "context": 3.1, "cache": 3.1, "uwsgi_shim": 3.1,
    "session": 3.2, "scripts": 3.2,
    "server": 3.3, "codestring": 3.3,
    # 4: processes
    "proccontrol": 4.0, "binding": 4.0, "validation": 4.0, "statsfork": 4.0, "master": 4.1,
    "runtime": 4.2,
    # 5: entry points
    "cli": 5.0, "__main__": 5.1, "manpage": 5.0,
}


@pytest.mark.parametrize("path", modules(), ids=module_ids())
def test_imports_go_only_to_lower_ranks(path: Path):
    stem = "" if path.stem == "__init__" else path.stem
    assert stem in RANKS, "%s has no rank in tests/test_layering.py RANKS" % path.name
    rank = RANKS[stem]
    bad = ["%s:%d imports %s (rank %s >= %s)" % (path.name, line, name or "the package",
                                                 RANKS.get(name), rank)
           for line, kind, name in imports(path)
           if kind == "own" and RANKS.get(name, 99) >= rank and not (stem == "" == name)]
    assert not bad, "imports that do not go down: %s" % bad
