"""The uwsgi-fastrouter(1) man page, generated from the option table.

``python -m uwsgi_fastrouter.manpage > man/uwsgi-fastrouter.1`` regenerates the
committed page; a test checks that the two never differ.  The output carries no
date, so it only changes when the table or this text does.
"""

from __future__ import annotations

import sys
from typing import List

from . import UWSGI_COMPAT_VERSION, __version__
from .options import (
    ENV_SKIP,
    GROUPS,
    NOOP,
    OPTIONAL,
    PENDING,
    PROGRAM,
    DEPRECATED,
    Option,
    options_in_group,
)


def _text(value: str) -> str:
    """Escape running text for troff."""
    value = value.replace("\\", "\\e").replace("-", "\\-")
    if value.startswith((".", "'")):
        value = "\\&" + value
    return value


def _flag(name: str) -> str:
    return "\\-\\-" + name.replace("-", "\\-")


def _option_head(option: Option) -> str:
    """The ``.TP`` tag line: bold flags, italic argument."""
    parts: List[str] = []
    if option.short:
        parts.append("\\fB\\-%s\\fR, " % option.short)
    parts.append("\\fB%s\\fR" % _flag(option.name))
    if option.metavar and option.arg != "none":
        if option.arg == OPTIONAL:
            parts.append("[=\\fI%s\\fR]" % _text(option.metavar))
        else:
            parts.append(" \\fI%s\\fR" % _text(option.metavar))
    return "".join(parts)


def _option_body(option: Option) -> List[str]:
    marker = " (not supported yet)" if option.status == PENDING else ""
    lines = [_text(option.help + marker) + "."]
    facts: List[str] = []
    if option.aliases:
        facts.append("Aliases: " + ", ".join("\\fB%s\\fR" % _flag(a) for a in option.aliases) + ".")
    if option.arg == OPTIONAL:
        facts.append(
            "The value is only taken in the \\fB%s=\\fR\\fIVALUE\\fR form; without it the value is %s."
            % (_flag(option.name), _text(option.bare) if option.bare else "empty")
        )
    elif option.arg == "none":
        facts.append("Takes no argument on the command line; in INI files and the environment "
                     "it accepts a boolean value.")
    default = option.default_text()
    if default is not None:
        facts.append("Default: %s." % _text(default))
    if option.status == PENDING:
        facts.append("Giving it is an error for now.")
    elif option.status == NOOP:
        facts.append("Accepted for compatibility; it has no effect.")
    elif option.status == DEPRECATED:
        facts.append("Deprecated: ignored with a warning.")
    if facts:
        lines.append(".br")
        lines.append(" ".join(facts))
    return lines


_MAGIC = (
    ("%d", "absolute directory of the file, with a trailing /"),
    ("%p", "absolute path of the file"),
    ("%s", "file name"),
    ("%n", "file name without its extension"),
    ("%e", "extension of the file name"),
    ("%c", "name of the directory holding the file"),
    ("%0 ... %9", "the components of the file's directory"),
    ("%x", "the section named after the colon, empty without one"),
    ("%o", "the file name as given"),
    ("%i", "inode number of the file"),
    ("%j", "hash of the absolute path, 8 hexadecimal digits"),
    ("%h", "host name"),
    ("%v", "current working directory"),
    ("%V", "uWSGI version this program is compatible with (%s)" % UWSGI_COMPAT_VERSION),
    ("%k", "number of CPUs"),
    ("%u, %U", "user id and user name"),
    ("%g, %G", "group id and group name"),
    ("%t, %T", "start time in seconds and in microseconds since the epoch"),
    ("%b", "path of the program"),
    ("%[", "the ESC character, for colours"),
    ("%D %P %S %E %N %C %X %O %I %J", "as the lower-case letters, for the first INI file loaded"),
    ("%%", "a single %"),
)


def render_manpage() -> str:
    """The whole page, as troff source."""
    out: List[str] = []
    add = out.append
    add('.TH UWSGI\\-FASTROUTER 1 "" "%s %s" "User Commands"' % (PROGRAM, __version__))
    add(".SH NAME")
    add("%s \\- drop\\-in replacement for the uWSGI %s FastRouter" % (_text(PROGRAM), UWSGI_COMPAT_VERSION))
    add(".SH SYNOPSIS")
    add(".B %s" % _text(PROGRAM))
    add("[\\fIoptions\\fR...] [\\fIfile\\fB.ini\\fR...]")
    add(".SH DESCRIPTION")
    add(".B %s" % _text(PROGRAM))
    add(_text("is a proxy for the uwsgi protocol. It accepts uwsgi requests on the --fastrouter "
              "addresses, finds a key for each request (UWSGI_FASTROUTER_KEY, else HTTP_HOST, else "
              "SERVER_NAME), maps the key to a backend node and relays the request and the response."))
    add(".PP")
    add(_text("It reads the same options, INI files and environment variables as uWSGI %s, "
              "so existing command lines and configuration files keep working." % UWSGI_COMPAT_VERSION))
    add(_text("Options listed as not supported yet are recognised but rejected; "
              "options that have no effect are accepted for compatibility."))
    add(".PP")
    add(_text("On the command line an option takes its value as --name value or --name=value. "
              "Options marked [=VALUE] only take one in the --name=VALUE form. "
              "Any unambiguous prefix of a long name is accepted, and short options "
              "can be bundled (-Ml 1024). Arguments ending in .ini are read as INI files after "
              "every other option; any other argument is an error."))
    add(".SH OPTIONS")
    for group in GROUPS:
        add(".SS %s" % _text(group))
        for option in options_in_group(group):
            add(".TP")
            add(_option_head(option))
            out.extend(_option_body(option))

    add(".SH ENVIRONMENT")
    add(".TP")
    add("\\fBUWSGI_\\fR\\fINAME\\fR")
    add(_text("sets the option whose name is NAME in lower case with _ turned into -, "
              "e.g. UWSGI_FASTROUTER_TO=127.0.0.1:3031 is --fastrouter-to 127.0.0.1:3031. "
              "The environment is read before the command line: for single-valued options the "
              "command line wins, for repeatable ones the environment's values come first. "
              "Names must be written in full; names that are not options are ignored."))
    add(".PP")
    add(_text("These variables are never read as options: " + ", ".join(sorted(ENV_SKIP)) + "."))

    add(".SH FILES")
    add(".SS INI files")
    add(_text("An INI file is read with --ini FILE[:SECTION] or given as an argument ending in "
              ".ini. Only the [uwsgi] section is read, or SECTION when given; --ini :SECTION reads "
              "another section of the last INI file. A missing section only prints a warning. "
              "The entries of a file take effect where the --ini option stands."))
    add(".PP")
    add(_text("Each line is one option: key = value, split at the first =, with spaces around "
              "key and value removed. A line with no = sets the key with an empty value, which "
              "is true for on/off options. A key may be repeated. Lines starting with ; or # "
              "are comments; a ; or # later in a line is part of the value, and so are quotes. "
              "Keys must be written in full. A key that is not an option defines a placeholder, "
              "unless --strict is given."))
    add(".SS Magic variables")
    add(_text("Before it is parsed, the whole text of an INI file is scanned for % followed by "
              "one character:"))
    for name, meaning in _MAGIC:
        add(".TP")
        add("\\fB%s\\fR" % _text(name))
        add(_text(meaning))
    add(".PP")
    add(_text("%( is kept for placeholders. Any other % pair is removed: 50% done becomes "
              "50done. So a literal %s, as --fastrouter-use-pattern needs, is written %%s in an "
              "INI file:"))
    add(".PP")
    add(".RS")
    add(".nf")
    add(_text("fastrouter-use-pattern = /var/run/apps/%%s/uwsgi.sock"))
    add(".fi")
    add(".RE")
    add(".PP")
    add(_text("Values on the command line and in the environment are not changed this way."))
    add(".SS Placeholders")
    add(_text("After all sources are read, every value is expanded three times, in this order: "
              "$(NAME) becomes the environment variable NAME (left alone when unset); "
              "@(PATH) becomes the contents of the file PATH without its final newline (a missing "
              "file is an error); %(NAME) becomes the value of the first option or placeholder "
              "called NAME, wherever it is defined (left alone when unknown). "
              "Placeholders are defined by unknown INI keys, --set and --set-ph."))

    add(".SH EXIT STATUS")
    add(".TP")
    add(".B 0")
    add(_text("normal shutdown, --help or --version."))
    add(".TP")
    add(".B 1")
    add(_text("the configuration is invalid (unknown option, bad value, missing file, option not "
              "supported yet) or the router could not start."))
    add(".SH SEE ALSO")
    add(".BR uwsgi (1),")
    add(".BR nginx (8)")
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render_manpage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
