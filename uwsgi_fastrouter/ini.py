"""INI configuration files, read the way uWSGI 2.0.31 reads them.

Theory of operation
-------------------
Reading one file is three steps, in this order:

1. **Magic substitution over the whole file text** (before any parsing).  Every
   ``%`` takes the character after it: a known letter is replaced by its value,
   ``%%`` gives ``%``, ``%(`` is kept (placeholders are resolved later, by the
   option pipeline), and any other ``%X`` pair is deleted, whatever ``X`` is (a
   newline too).  A ``%`` at the very end of the file is deleted.  So
   ``/x/%s/sock`` in a file becomes ``/x/<file name>/sock``; users write ``%%s``.

   Lower-case letters describe the file being read; their upper-case twins
   (``%D %P %S %E %N %C %X %O %I %J``) describe the first INI file loaded in
   this run (the "top-level" file), so an included file can refer to the file
   that included it.  The process-wide letters (``%h %v %V %k %u %U %g %G %t %T
   %b %[``) are computed once per run by :class:`ProcessMagic`.

2. **Line parsing**: lines are split on ``\\n`` and stripped of spaces, TABs and
   CRs.  ``[name]`` opens a section (the last character is dropped, whatever it
   is).  A line whose first character is ``;`` or ``#`` is a comment; there are
   no inline comments and quotes are literal.  ``key = value`` splits at the
   first ``=``; a line without ``=`` is the key with an empty value.

3. Only the asked section is kept (``uwsgi`` unless ``file.ini:section``).  Each
   line is one entry, so repeated keys are all kept, in order.  When the section
   has no key line, the caller gets a warning to print, not an error.

This module knows nothing of options: it turns one ``FILE[:SECTION]`` spec into
an ordered list of ``(key, value)`` pairs.  The option pipeline decides what the
keys mean.  Its only contacts with the host are reading the file, looking at its
path (``pathlib``) and :class:`ProcessMagic`; it never touches sockets or
descriptors.
"""

from __future__ import annotations

import platform
import os  # host facts only: getuid, getgid, cpu_count for %u %g %k
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from . import UWSGI_COMPAT_VERSION

DEFAULT_SECTION = "uwsgi"

# Letters whose upper-case form refers to the top-level file.
_PER_FILE_LETTERS = "dpsencxoij"

_STRIP = " \t\r"


class IniError(Exception):
    """An INI file could not be used; ``str(e)`` is the message to print."""


def split_spec(spec: str) -> Tuple[str, Optional[str]]:
    """Split ``FILE[:SECTION]`` at the **last** colon.

    ``"app.ini:web"`` -> ``("app.ini", "web")``; ``"app.ini"`` and ``"app.ini:"``
    -> ``("app.ini", None)``; ``":web"`` -> ``("", "web")`` (the last file again).
    """
    path, colon, section = spec.rpartition(":")
    if not colon:
        return spec, None
    return path, (section or None)


def djb33x_hex(text: str) -> str:
    """The ``%j`` value: 32-bit djb33x (xor variant) of *text*, its four bytes
    printed little-endian first, in upper-case hex (as uWSGI prints it)."""
    value = 5381
    for byte in text.encode("utf-8", "surrogateescape"):
        value = ((value * 33) ^ byte) & 0xFFFFFFFF
    return value.to_bytes(4, "little").hex().upper()


class ProcessMagic:
    """The magic letters that do not depend on the file: computed once per run.

    This is the one place that asks the host anything (names, ids, CPUs, the
    clock); tests pass the values they want instead.
    """

    __slots__ = ("values",)

    def __init__(
        self,
        now: Optional[float] = None,
        cwd: Optional[str] = None,
        binary: Optional[str] = None,
        hostname: Optional[str] = None,
    ) -> None:
        if now is None:
            now = time.time()
        if cwd is None:
            cwd = str(Path.cwd())
        if binary is None:
            binary = _binary_path()
        if hostname is None:
            hostname = platform.node()
        uid = os.getuid()
        gid = os.getgid()
        self.values: Dict[str, str] = {
            "h": hostname,
            "v": cwd,
            "V": UWSGI_COMPAT_VERSION,
            "k": str(os.cpu_count() or 1),
            "u": str(uid),
            "U": _user_name(uid),
            "g": str(gid),
            "G": _group_name(gid),
            "t": str(int(now)),
            "T": str(int(now * 1_000_000)),
            "b": binary,
            "[": "\x1b",
        }


def _binary_path() -> str:
    program = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if program and program != "-c":
        return str(Path(program).absolute())
    return sys.executable or ""


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return str(gid)


def file_magic(given: str, section: Optional[str], cwd: str) -> Dict[str, str]:
    """The per-file letters for the file named *given* (as the user wrote it).

    ``%p`` is the real path, except for a symlink, whose own absolute name is
    used (so a symlinked config names the link).  ``%d`` ends with ``/``; ``%0``
    to ``%9`` are the components of ``%d``.
    """
    path = Path(given)
    if path.is_symlink():
        full = given if given.startswith("/") else cwd + "/" + given
    else:
        full = str(path.resolve())
    slash = full.rfind("/")
    base = full[slash + 1:]
    directory = full[: slash + 1]
    parts = [p for p in directory.split("/") if p]
    dot = base.rfind(".")
    try:
        inode = str(path.stat().st_ino)
    except OSError:
        inode = ""
    table = {
        "o": given,
        "p": full,
        "s": base,
        "d": directory,
        "c": parts[-1] if parts else "",
        "e": base[dot + 1:] if dot >= 0 else "",
        "n": base[:dot] if dot >= 0 else base,
        "x": section or "",
        "i": inode,
        "j": djb33x_hex(full),
    }
    for index in range(10):
        table[str(index)] = parts[index] if index < len(parts) else ""
    return table


def magic_substitute(text: str, table: Mapping[str, str]) -> str:
    """Apply the ``%`` magic to *text*: ``%X`` -> ``table[X]``, ``%%`` -> ``%``,
    ``%(`` kept, any other ``%X`` deleted, a final lone ``%`` deleted."""
    if "%" not in text:
        return text
    out: List[str] = []
    start = 0
    length = len(text)
    index = text.find("%")
    while index >= 0:
        out.append(text[start:index])
        if index + 1 >= length:
            start = length
            break
        letter = text[index + 1]
        if letter == "%":
            out.append("%")
        elif letter == "(":
            out.append("%(")
        else:
            out.append(table.get(letter, ""))
        start = index + 2
        index = text.find("%", start)
    out.append(text[start:])
    return "".join(out)


def parse(text: str, section: str = DEFAULT_SECTION) -> Tuple[List[Tuple[str, str]], bool]:
    """Parse already magic-substituted INI *text*.

    Returns the ``(key, value)`` pairs of *section*, in file order, and whether
    the section had at least one key line.
    """
    entries: List[Tuple[str, str]] = []
    current = ""
    found = False
    for raw in text.split("\n"):
        line = raw.strip(_STRIP)
        if not line:
            continue
        if line[0] == "[":
            current = line[1:-1]
            continue
        if line[0] in ";#":
            continue
        if current != section:
            continue
        found = True
        key, _eq, value = line.partition("=")
        entries.append((key.rstrip(_STRIP), value.strip(_STRIP)))
    return entries, found


class IniResult:
    """What reading one ``FILE[:SECTION]`` spec produced."""

    __slots__ = ("path", "section", "entries", "warning")

    def __init__(self, path: str, section: str, entries: List[Tuple[str, str]], warning: Optional[str]) -> None:
        self.path = path
        self.section = section
        self.entries = entries
        self.warning = warning


class IniLoader:
    """Reads INI specs for one configuration run.

    It remembers the last file read (for ``:section``) and the magic table of
    the first file read (for the upper-case letters).
    """

    def __init__(self, process: Optional[ProcessMagic] = None) -> None:
        self.process = process if process is not None else ProcessMagic()
        self.last_file: Optional[str] = None
        self.top: Optional[Dict[str, str]] = None
        self.loaded: List[str] = []

    def load(self, spec: str) -> IniResult:
        """Read *spec* (``FILE``, ``FILE:SECTION`` or ``:SECTION``)."""
        path, section = split_spec(spec)
        if not path:
            if self.last_file is None:
                raise IniError(
                    'cannot read section "%s": no INI configuration file was loaded before' % (section or "")
                )
            path = self.last_file
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise IniError('open("%s"): %s' % (path, exc.strerror or exc)) from None
        except ValueError as exc:  # a NUL byte (a name read from a file can hold one)
            raise IniError('open("%s"): %s' % (path.replace("\0", "\\0"), exc)) from None
        text = data.decode("utf-8", "surrogateescape")

        table = dict(self.process.values)
        own = file_magic(path, section, self.process.values["v"])
        if self.top is None:
            self.top = own
        table.update(own)
        for letter in _PER_FILE_LETTERS:
            table[letter.upper()] = self.top[letter]

        self.last_file = path
        self.loaded.append(spec)
        asked = section or DEFAULT_SECTION
        entries, found = parse(magic_substitute(text, table), asked)
        warning = None
        if not found:
            warning = '*** WARNING: Can\'t find section "%s" in INI configuration file %s ***' % (asked, path)
        return IniResult(path, asked, entries, warning)
