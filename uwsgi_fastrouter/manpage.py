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


def _example(out: List[str], intro: str, lines: List[str]) -> None:
    """One example: a sentence, then the lines as they are typed, indented, unfilled."""
    out.append(".PP")
    out.append(_text(intro))
    out.append(".PP")
    out.append(".RS")
    out.append(".nf")
    out.extend(_text(line) if line else "" for line in lines)
    out.append(".fi")
    out.append(".RE")


def _tagged(out: List[str], tag: str, text: str) -> None:
    out.append(".TP")
    out.append("\\fB%s\\fR" % _text(tag))
    out.append(_text(text))


_SYSTEMD_UNIT = [
    "[Unit]",
    "Description=uwsgi-fastrouter",
    "After=network.target",
    "",
    "[Service]",
    "Type=notify",
    "ExecStart=/usr/local/bin/uwsgi-fastrouter --master --die-on-term --ini /etc/uwsgi-fastrouter/router.ini",
    "ExecReload=/bin/kill -HUP $MAINPID",
    "KillMode=mixed",
    "Restart=on-failure",
    "",
    "[Install]",
    "WantedBy=multi-user.target",
]


def _signals(out: List[str]) -> None:
    add = out.append
    add(".SH SIGNALS")
    add(_text("With --master (or an option that implies it) the master process handles:"))
    _tagged(out, "SIGHUP", "graceful reload: the master executes itself again with the same "
            "arguments and keeps the listening sockets and the subscription table; new router "
            "processes start accepting, then the old ones stop accepting and finish their "
            "requests. Nothing is refused. A --touch-reload file or --reload PIDFILE does the same.")
    _tagged(out, "SIGTERM", "brutal reload (the processes are killed, then the master executes "
            "itself again), or, with --die-on-term, a shutdown like SIGINT. Service managers stop "
            "services with SIGTERM: give --die-on-term.")
    _tagged(out, "SIGINT, SIGQUIT", "shutdown: the processes are told to stop and killed if they "
             "are still there after 10 seconds; the pidfile is removed.")
    add(".PP")
    add(_text("The router processes under a master stop accepting and finish their requests on "
              "SIGTERM, stop at once on SIGINT and SIGQUIT, and ignore SIGHUP. The application "
              "workers (--socket) finish their request and exit on SIGTERM and SIGHUP, and exit "
              "at once on SIGINT and SIGQUIT."))
    add(".PP")
    add(_text("Without a master the single process shuts down on SIGINT, SIGQUIT and SIGTERM "
              "(it closes its sockets and removes the UNIX socket files it created). It does not "
              "reload: SIGHUP, like every signal not named here (SIGUSR1 included, which makes "
              "uWSGI log its statistics), keeps the system's default action and ends the process "
              "at once. SIGPIPE is ignored by every process."))
    add(".PP")
    add(_text("--master-fifo offers the same actions as commands written to a named pipe."))


def _examples(out: List[str]) -> None:
    out.append(".SH EXAMPLES")
    _example(out, "A fixed list of nodes, used round robin; a node that refuses a connection is "
             "skipped for --fastrouter-gracetime seconds:",
             ["uwsgi-fastrouter --fastrouter 127.0.0.1:3017 \\",
              "    --fastrouter-to 127.0.0.1:3031 --fastrouter-to /run/app2.sock"])
    _example(out, "Subscriptions: the router learns its nodes from the uWSGI instances that "
             "announce themselves; with a master, two router processes and the statistics:",
             ["uwsgi-fastrouter --master --fastrouter 127.0.0.1:3017 --fastrouter-processes 2 \\",
              "    --fastrouter-subscription-server 127.0.0.1:7000 --fastrouter-stats 127.0.0.1:9191",
              "",
              "uwsgi --socket 127.0.0.1:3031 --wsgi-file app.py \\",
              "    --subscribe-to 127.0.0.1:7000:example.com"])
    _example(out, "One UNIX socket per host name, in an INI file (note the %% for a literal %), "
             "with dated log lines in a file that logrotate may rotate:",
             ["[uwsgi]",
              "master = true",
              "fastrouter = /run/uwsgi/router.sock",
              "fastrouter-use-pattern = /run/uwsgi/apps/%%s/uwsgi.sock",
              "logto = /var/log/uwsgi-fastrouter.log",
              "log-date = true",
              "touch-logreopen = /run/uwsgi/logreopen"])
    _example(out, "The matching logrotate rule renames the file, then touches the trigger; "
             "within a second every process writes to a new file at the old path:",
             ["/var/log/uwsgi-fastrouter.log {",
              "    daily",
              "    rotate 7",
              "    postrotate",
              "        touch /run/uwsgi/logreopen",
              "    endscript",
              "}"])
    _example(out, "A systemd service. With Type=notify the router reports READY=1 once its "
             "sockets are bound, RELOADING=1 and READY=1 around a reload and STOPPING=1 at "
             "shutdown; --die-on-term makes systemd's SIGTERM a shutdown (KillMode=mixed sends "
             "it to the master alone, which stops its processes itself), and systemctl reload "
             "sends SIGHUP, a graceful reload:", _SYSTEMD_UNIT)


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

    _signals(out)
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
    _tagged(out, "NOTIFY_SOCKET", "set by systemd for a Type=notify service: the master, or the "
            "single process, sends its readiness and status there (sd_notify). It is left in "
            "the environment, as a reload needs it again.")
    _tagged(out, "UWSGI_FASTROUTER_INHERIT", "set by the master for its own re-execution during "
            "a reload (the sockets and the table it passes on); never set it yourself.")
    _tagged(out, "COLUMNS", "the width --help wraps its text to; without it, the width of the "
            "terminal, or 80 columns when the output is not a terminal.")
    _tagged(out, "TMPDIR", "where --fastrouter-post-buffering writes bodies too large for "
            "memory, unless --fastrouter-post-buffering-dir says otherwise.")

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
              "Keys must be written in full. A key that is not an option defines a placeholder; "
              "keys that are not options and are not used as %(KEY) anywhere are listed in one "
              "warning at start-up, and --strict makes any key that is not an option an error. "
              "uWSGI's plugins, enable-threads, thunder-lock and need-app lines are accepted."))
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
    add(".SS Log, pid and trigger files")
    add(_text("--logto and --daemonize append to their file, created with mode 0640; the file is "
              "put on the standard output and error of every process. A reload keeps the open "
              "file unless --log-reopen is given. The files named by --touch-logreopen and "
              "--touch-reload are only looked at (their modification time, once a second); "
              "they need not exist at start-up, and creating or removing one counts as a touch. "
              "--pidfile holds the master's pid followed by a newline."))

    add(".SH EXIT STATUS")
    add(".TP")
    add(".B 0")
    add(_text("normal shutdown, --help or --version."))
    add(".TP")
    add(".B 1")
    add(_text("the configuration is invalid (unknown option, bad value, missing file, option not "
              "supported yet) or the router could not start."))
    _examples(out)
    add(".SH SEE ALSO")
    add(".BR uwsgi (1),")
    add(".BR nginx (8)")
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render_manpage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
