"""The option table and the configuration pipeline (environment, argv, INI).

Theory of operation
-------------------
:data:`OPTIONS` is the one declarative table: every option uWSGI users may give
us, with its kind, argument style, default, help line and status.  ``--help``
and the man page are generated from it.

:func:`load_config` runs the pipeline uWSGI 2.0.31 runs:

1. **Collect** ``(key, value)`` entries, in order: first ``UWSGI_<NAME>``
   environment variables (only names of known options; never prefix-matched),
   then the command line parsed like GNU ``getopt_long`` (``--name value``,
   ``--name=value``, unique prefixes, bundled short options), then positional
   ``*.ini`` files (getopt moves them after every option).  "Immediate" options
   act at the moment they are collected: ``--ini`` inserts the file's entries
   right there, ``--set``/``--set-ph`` add a placeholder entry, ``--help`` and
   ``--version`` stop with :class:`EarlyExit`.
2. **Substitute**, over every collected value, three passes in this order:
   ``$(NAME)`` environment variables (unset: left as written), ``@(PATH)`` file
   contents (one trailing newline or CR removed; a missing file is an error),
   ``%(NAME)`` the value of the first entry with key ``NAME``, wherever it is
   (unknown: left as written).  A ``%(NAME)`` value is itself resolved first,
   so chains work in any order; a reference cycle is left as written.
3. **Apply** the entries in order on a fresh :class:`Config` holding the
   defaults: scalars keep the last value, lists accumulate.  Keys that are not
   options are placeholders (an error for plain keys under ``--strict``).
   "pending" options are rejected, the "deprecated" one only warns.
4. **Freeze**: an option whose ``zero_means`` is set gets it in place of 0 (uWSGI's
   "0 means the default"), every value is checked against its kind's type, and the
   :class:`Config` becomes read-only.  The checks that involve several options (or
   the file system) run later, in validation.py, before anything is bound.

Values keep uWSGI's typing: ints are C ``atoi`` (junk gives 0, negative is an
error), 64-bit values ``strtoul``, booleans are false only for
``false/off/no/0``.  A flag given without any value counts as ``1``/true.
"""

from __future__ import annotations

import difflib
import re
import shutil
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from . import UWSGI_COMPAT_VERSION, __version__
from . import log as _log
from .ini import IniError, IniLoader

PROGRAM = "uwsgi-fastrouter"

# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

# Kinds of value
INT = "int"
UINT64 = "uint64"
BOOL = "bool"
STRING = "string"
LIST = "list"
MODE = "mode"      # an octal file mode, 000-777 (e.g. --umask 022)
ACTION = "action"  # handled while collecting: ini, set, set-ph, help, version

# The type of a loaded value, per kind (ACTION: the list of what --ini/--set/--set-ph
# were given, or False for --help/--version).
KIND_TYPES: Dict[str, type] = {INT: int, UINT64: int, BOOL: bool, STRING: str, LIST: list,
                               MODE: int, ACTION: object}

# Argument styles (getopt's has_arg)
REQUIRED = "required"
OPTIONAL = "optional"
NONE = "none"

# Statuses
SUPPORTED = "supported"
PENDING = "pending"
NOOP = "noop"
DEPRECATED = "deprecated"
REPLACED = "replaced"  # a uWSGI option this program does not have: an error naming the one to use

# Groups, in --help / man page order
G_ROUTER = "FastRouter"
G_PROCESS = "Sockets and processes"
G_APPS = "Cache and application loading"
G_SUBS = "Subscriptions"
G_CONFIG = "Configuration"
GROUPS = (G_ROUTER, G_PROCESS, G_APPS, G_SUBS, G_CONFIG)


@dataclass(frozen=True)
class Option:
    """One row of the option table."""

    name: str
    kind: str
    help: str
    group: str
    arg: str = REQUIRED
    default: Any = None
    aliases: Tuple[str, ...] = ()
    short: Optional[str] = None
    status: str = SUPPORTED
    metavar: str = ""
    bare: Optional[str] = None  # value of an optional-argument option given bare
    default_doc: Optional[str] = None  # overrides the default shown in help
    # uWSGI's "0 means the default": a value of 0 (or an empty string) given for this
    # option is replaced by this one when the configuration is loaded.
    zero_means: Any = None

    @property
    def attr(self) -> str:
        """The :class:`Config` attribute name."""
        return self.name.replace("-", "_")

    @property
    def value_type(self) -> type:
        """The Python type of the :class:`Config` attribute (None is allowed when the
        default is None: the option was not given)."""
        return KIND_TYPES[self.kind]

    @property
    def names(self) -> Tuple[str, ...]:
        return (self.name,) + self.aliases

    def default_text(self) -> Optional[str]:
        """The default as shown to users, or None when there is nothing to say."""
        if self.default_doc is not None:
            return self.default_doc
        if self.kind == BOOL:
            return "on" if self.default else "off"
        if self.kind in (LIST, ACTION) or self.default is None:
            return None
        return str(self.default)

    def argument_text(self) -> str:
        """How the argument is written after the option name ("" for none)."""
        if self.arg == NONE:
            return ""
        if self.arg == OPTIONAL:
            return "[=" + self.metavar + "]"
        return " " + self.metavar

    def notes(self) -> List[str]:
        """The remarks that follow the description: the default, the status."""
        notes = []
        default = self.default_text()
        if default is not None:
            notes.append("(default: %s)" % default)
        if self.status == PENDING:
            notes.append("(not supported yet)")
        elif self.status == NOOP:
            notes.append("(accepted, no effect)")
        elif self.status == REPLACED:
            notes.append("(refused)")
        return notes

    def help_line(self) -> str:
        """The one-line description, with default and status notes."""
        return " ".join([self.help] + self.notes())


# --fastrouter-access-log-format: the variables (in uWSGI's %(name) style) and the
# default format.  The getters live in accesslog.py; a test checks both name lists agree.
ACCESS_LOG_VARIABLES: Tuple[Tuple[str, str], ...] = (
    ("addr", "client address (REMOTE_ADDR from the request, else the socket peer)"),
    ("port", "client port (REMOTE_PORT, else the socket peer's)"),
    ("key", "the routing key"),
    ("node", "node address (the last one tried when all failed; - if none)"),
    ("modifier1", "modifier1 sent to the node"),
    ("status", "HTTP status from the response's first line (- if not HTTP, or a handoff)"),
    ("rx", "bytes received from the client (request head and body)"),
    ("tx", "bytes sent to the client (- for a handoff)"),
    ("ttfb", "milliseconds from accept to the first response byte (- if none)"),
    ("msecs", "milliseconds from accept to the end of the request"),
    ("retries", "connect attempts after the first"),
    ("outcome", "ok, handoff (the client was passed to the node), noroute, failed (every node "
                "tried failed) or error (closed early)"),
    ("pid", "pid of the router process"),
    ("time", "unix time at the end of the request"),
)
ACCESS_LOG_FORMAT = ('%(addr) "%(key)" => %(node) modifier1=%(modifier1) status=%(status) '
                     'rx=%(rx) tx=%(tx) ttfb=%(ttfb)ms time=%(msecs)ms retries=%(retries) '
                     '%(outcome)')


def access_log_target(value: Optional[str]) -> Optional[str]:
    """``--fastrouter-access-log``'s value: None (off) when not given or false, "" (the
    main log) when bare or true, else the path of the file."""
    if value is None or value.lower() in _FALSE_WORDS or value == "0":
        return None
    if value == "" or value.lower() in ("true", "on", "yes", "1"):
        return ""
    return value


def _o(name: str, kind: str, help: str, group: str, **kw: Any) -> Option:
    if "metavar" not in kw:
        kw["metavar"] = {INT: "N", UINT64: "N", BOOL: "BOOL", MODE: "MODE"}.get(kind, "VALUE")
    if kind == BOOL and "arg" not in kw:
        kw["arg"] = NONE
    if kind == BOOL and "default" not in kw:
        kw["default"] = False
    return Option(name, kind, help, group, **kw)


OPTIONS: Tuple[Option, ...] = (
    # -- FastRouter ------------------------------------------------------------
    _o("fastrouter", LIST, "accept uwsgi clients on ADDR (ip:port, :port, [ipv6]:port, "
       "/unix/path, @abstract, =N shared socket, fd://N); repeatable", G_ROUTER,
       default=[], metavar="ADDR"),
    _o("fastrouter-to", LIST, "static backend node, picked round robin when no other mapper "
       "is configured; repeatable", G_ROUTER, default=[], metavar="ADDR"),
    _o("fastrouter-use-pattern", STRING, "backend address is PATTERN with %s replaced by the key "
       "(%% gives %; write %%s inside INI files)", G_ROUTER, metavar="PATTERN"),
    _o("fastrouter-use-base", STRING, "backend address is BASE immediately followed by the key "
       "(no / is added)", G_ROUTER, metavar="BASE"),
    _o("fastrouter-use-cache", STRING, "look the key up in a cache to get the backend address; "
       "a bare option means the first cache", G_ROUTER, arg=OPTIONAL, bare="", metavar="NAME",
       status=SUPPORTED),
    _o("fastrouter-use-code-string", STRING, "call FUNC(key) from the Python FILE "
       "(modifier1 0) to get the backend address", G_ROUTER, metavar="MOD1:FILE:FUNC",
       status=SUPPORTED),
    _o("fastrouter-use-socket", INT, "forward every request to this instance's --socket number N "
       "(0-based; a bare option means 0)", G_ROUTER, arg=OPTIONAL, bare="0", status=SUPPORTED),
    _o("fastrouter-subscription-server", LIST, "accept subscriptions on ADDR (UDP ip:port, else a "
       "unix datagram socket path; @NAME is the file @NAME, as uWSGI binds it); repeatable",
       G_ROUTER, default=[], metavar="ADDR", status=SUPPORTED),
    _o("fastrouter-subscription-fallback-key", STRING, "look up KEY instead when the request's key "
       "has no alive subscribed node", G_ROUTER, metavar="KEY", status=SUPPORTED),
    _o("fastrouter-hash-var", STRING, "the request var that iphash keys hash instead of "
       "REMOTE_ADDR (e.g. HTTP_COOKIE); a request without it hashes its client address",
       G_ROUTER, metavar="NAME"),
    _o("fastrouter-fallback", LIST, "node tried, in the given order, when the chosen node cannot "
       "be reached; repeatable", G_ROUTER, default=[], metavar="ADDR"),
    _o("fastrouter-fallback-on-no-key", BOOL, "also go to the fallback nodes when the mapper finds "
       "no node for the key", G_ROUTER),
    _o("fastrouter-tls-node", LIST, "reach the node at ADDR over TLS (ADDR as written in "
       "--fastrouter-to, --fastrouter-fallback or made by a mapper); repeatable. Subscribed nodes "
       "announcing proto=s are reached over TLS without it (uWSGI sends them plain uwsgi)",
       G_ROUTER, default=[], metavar="ADDR"),
    _o("fastrouter-tls-ca", STRING, "verify TLS nodes' certificates against the CA certificates "
       "in FILE (PEM); default: the system's trusted CAs", G_ROUTER, metavar="FILE"),
    _o("fastrouter-tls-cert", STRING, "client certificate (PEM, with its key unless "
       "--fastrouter-tls-key is given) shown to TLS nodes that ask for one", G_ROUTER,
       metavar="FILE"),
    _o("fastrouter-tls-key", STRING, "private key (PEM) of --fastrouter-tls-cert", G_ROUTER,
       metavar="FILE"),
    _o("fastrouter-tls-server-name", STRING, "host name sent to TLS nodes (SNI) and that their "
       "certificates must carry; default: none sent and only the certificate chain is checked",
       G_ROUTER, metavar="NAME"),
    _o("fastrouter-tls-no-verify", BOOL, "do not check TLS nodes' certificates at all (encrypted "
       "but unauthenticated: anyone on the path can pose as a node)", G_ROUTER),
    _o("fastrouter-gracetime", INT, "seconds a static node that failed is skipped", G_ROUTER,
       default=30, zero_means=30, metavar="SECS"),
    _o("fastrouter-health-check-interval", INT, "send the uwsgi PING packet to every static, "
       "fallback and subscribed node every SECS seconds; a node that fails the checks gets no "
       "request until it passes them again; 0 (the default) is off", G_ROUTER, default=0,
       metavar="SECS"),
    _o("fastrouter-health-check-deadline", INT, "seconds a node has to answer a PING (connect "
       "included)", G_ROUTER, default=2, zero_means=2, metavar="SECS"),
    _o("fastrouter-health-check-fails", INT, "failed checks in a row that mark a node down",
       G_ROUTER, default=3),
    _o("fastrouter-health-check-passes", INT, "passed checks in a row that mark a down node up "
       "again", G_ROUTER, default=2),
    _o("fastrouter-health-check-max-probes", INT, "most PING probes in flight at a time (per "
       "router process); the others wait their turn", G_ROUTER, default=32),
    _o("fastrouter-resolve-interval", INT, "seconds between two lookups of a host name given "
       "as HOST:PORT in --fastrouter-to, --fastrouter-fallback, a --subscribe-to/--subscribe2 "
       "server or (with --subscription-resolve-names) an announced address; every address of a "
       "name is a node; lookups run off the event loop; 0 looks each name up once",
       G_ROUTER, default=60, metavar="SECS"),
    _o("fastrouter-timeout", INT, "seconds of inactivity after which a connection is closed",
       G_ROUTER, default=60, zero_means=60, metavar="SECS"),
    _o("fastrouter-max-retries", INT, "connect retries after a failed first attempt, fallback nodes "
       "included (uWSGI 2.0 has 3, fixed)", G_ROUTER, default=3),
    _o("fastrouter-http-errors", BOOL, "answer a client that got no response byte yet with a "
       "short HTTP/1.0 response instead of closing it bare: 502 when no node could be reached "
       "(or the node closed or failed before answering), 503 when no node serves the key, 504 "
       "when the node sent nothing within --fastrouter-timeout; never after a handoff",
       G_ROUTER),
    _o("fastrouter-retry-after-connect", BOOL, "send a bodyless request again to another node "
       "(within --fastrouter-max-retries) when its node closes, resets or stays silent for "
       "--fastrouter-timeout before the first response byte; the node is marked as failed. A "
       "request with a body, or whose client descriptor was passed to the node, is never sent "
       "again", G_ROUTER),
    _o("fastrouter-node-max-conns", INT, "most requests of one router process a node may hold at "
       "once (0: no cap); past it a request goes to another node of its key, or waits up to "
       "--fastrouter-node-queue-wait for a slot", G_ROUTER, default=0),
    _o("fastrouter-node-max-conns-per-core", INT, "cap a subscribed node that announces its cores "
       "at N times its cores (in place of --fastrouter-node-max-conns)", G_ROUTER, default=0),
    _o("fastrouter-node-queue-wait", INT, "seconds a request waits for a slot when every node "
       "of its key is at its cap (0: closed at once, as without a node)", G_ROUTER, default=0,
       metavar="SECS"),
    _o("fastrouter-force-key", STRING, "route every request with KEY, ignoring the request vars",
       G_ROUTER, metavar="KEY"),
    _o("fastrouter-strip-vars", LIST, "remove this request var (every occurrence) before the "
       "request goes to a node; NAME* removes every var whose name starts with NAME; names are "
       "case-sensitive; the key is taken before stripping; repeatable", G_ROUTER, default=[],
       metavar="NAME|PREFIX*"),
    _o("fastrouter-strip-magic-vars", BOOL, "remove the vars a uWSGI node acts on (UWSGI_SCRIPT, "
       "UWSGI_MODULE, UWSGI_CALLABLE, UWSGI_FILE, UWSGI_APPID, UWSGI_PYHOME, UWSGI_HOME, "
       "UWSGI_CHDIR, UWSGI_SETENV, UWSGI_TOUCH_RELOAD, UWSGI_POSTFILE, UWSGI_CACHE_GET, "
       "UWSGI_SCHEME) before the request goes to a node, so that a client cannot make a node "
       "load code; UWSGI_FASTROUTER_KEY is kept", G_ROUTER),
    _o("fastrouter-cheap", BOOL, "accept connections only while at least one node is subscribed",
       G_ROUTER, status=SUPPORTED),
    _o("fastrouter-processes", INT, "number of router processes sharing the listening sockets",
       G_ROUTER, default=1, zero_means=1, aliases=("fastrouter-workers",), status=SUPPORTED),
    _o("fastrouter-reuse-port", BOOL, "give each router process its own listening socket on every "
       "TCP --fastrouter address (SO_REUSEPORT: the kernel spreads new connections over them, "
       "no process is woken for another's connection; a stalled process's share waits for it); "
       "the master binds and keeps them all, so a replaced or reloaded process's successor "
       "takes over its queued connections; TCP ip:port, [ipv6]:port and host:port listeners "
       "only (any other is a start-up error)", G_ROUTER),
    _o("fastrouter-stats", STRING, "serve the router statistics as JSON on ADDR (ip:port or unix "
       "path)", G_ROUTER, aliases=("fastrouter-stats-server", "fastrouter-ss"), metavar="ADDR"),
    _o("fastrouter-metrics", STRING, "serve Prometheus text metrics on ADDR (ip:port or unix path): "
       "GET /metrics; requests by outcome, retries, fallbacks, handoffs, bytes, latency histograms, "
       "per-key and per-node counters, subscription counters (summed over the router processes "
       "under --master)", G_ROUTER, metavar="ADDR", status=SUPPORTED),
    _o("fastrouter-metrics-max-keys", INT, "most keys (and most nodes) with their own series in the "
       "metrics; the others are summed into one key=\"other\" (node=\"other\") series", G_ROUTER,
       default=100, metavar="N", status=SUPPORTED),
    _o("fastrouter-post-buffering", UINT64, "read request bodies before connecting: up to N bytes "
       "in memory, larger ones to a temporary file; 0 is off", G_ROUTER, default=0,
       status=SUPPORTED),
    _o("fastrouter-post-buffering-dir", STRING, "directory for the temporary files of post-buffering "
       "(default $TMPDIR or /tmp; uWSGI 2.0 ignores this option)", G_ROUTER, metavar="DIR",
       status=SUPPORTED),
    _o("fastrouter-post-buffering-max", UINT64, "with post-buffering, refuse at once (close, with a "
       "log line) a request whose CONTENT_LENGTH is over BYTES: at most that much of one request "
       "goes to memory or disk; 0 is no limit, as in uWSGI", G_ROUTER, default=0, metavar="BYTES"),
    _o("fastrouter-post-buffering-min-rate", UINT64, "with post-buffering, the whole body must "
       "arrive within --fastrouter-timeout + CONTENT_LENGTH / RATE seconds, else the client is "
       "closed with a log line (a body trickled byte by byte cannot hold a session); RATE in "
       "bytes per second, 0 leaves only the idle time-out", G_ROUTER, default=1024, metavar="RATE"),
    _o("fastrouter-buffer-size", UINT64, "size in bytes of each relay read (one buffer per process, "
       "not per connection); 0 means 256 KiB (uWSGI reads one page at a time)", G_ROUTER,
       default=256 << 10, zero_means=256 << 10, default_doc="256 KiB"),
    _o("fastrouter-events", INT, "most events taken from one poll of the event loop (as uWSGI), "
       "and most connections accepted from one listening socket each time it is ready, before "
       "the other ready sockets get their turn", G_ROUTER, default=64, zero_means=64),
    _o("fastrouter-harakiri", INT, "restart a router process whose event loop is stuck for SECS "
       "seconds; 0 is off", G_ROUTER, default=0, metavar="SECS", status=SUPPORTED),
    _o("fastrouter-quiet", BOOL, "do not log failed backend connections; takes a value, "
       "e.g. --fastrouter-quiet 1", G_ROUTER, arg=REQUIRED),
    _o("fastrouter-access-log", STRING, "write one line per request (off by default) to the main "
       "log, or, as --fastrouter-access-log=PATH, to that file (append mode, shared by the "
       "router processes, reopened with --touch-logreopen); lines are written in batches, "
       "within 0.2 s; the line's layout is "
       "--fastrouter-access-log-format", G_ROUTER, arg=OPTIONAL, bare="", metavar="PATH"),
    _o("fastrouter-access-log-format", STRING, "layout of the access log lines: text with "
       "uWSGI-style variables: " + "; ".join("%%(%s) %s" % v for v in ACCESS_LOG_VARIABLES)
       + "; an unknown variable is a start-up error; in INI files %%(name) is always taken "
       "literally (%(name) too, unless a placeholder of that name is set). "
       "The default: " + ACCESS_LOG_FORMAT, G_ROUTER, metavar="FORMAT"),
    _o("fastrouter-resubscribe", LIST, "forward every received subscription and unsubscription "
       "to the subscription server ADDR; repeatable", G_ROUTER, default=[], metavar="ADDR",
       status=SUPPORTED),
    _o("fastrouter-resubscribe-bind", STRING, "local UDP ip:port the forwarded subscriptions are "
       "sent from", G_ROUTER, metavar="ADDR", status=SUPPORTED),
    _o("fastrouter-zerg", STRING, "also route on the listening sockets received from the zerg "
       "server at PATH", G_ROUTER, metavar="PATH", status=SUPPORTED),
    _o("fastrouter-uid", STRING, "run the router processes as USER (name or number)", G_ROUTER,
       metavar="USER", status=SUPPORTED),
    _o("fastrouter-gid", STRING, "run the router processes with group GROUP (name or number)",
       G_ROUTER, metavar="GROUP", status=SUPPORTED),
    _o("fastrouter-subscription-slot", STRING, "deprecated: accepted and ignored, with a warning",
       G_ROUTER, status=DEPRECATED),
    # -- Sockets and processes -------------------------------------------------
    _o("master", BOOL, "run a supervising master that respawns router processes and handles "
       "graceful reloads", G_PROCESS, short="M"),
    _o("listen", INT, "listen() backlog of every listening socket", G_PROCESS, short="l",
       default=100),
    _o("reuse-port", BOOL, "set SO_REUSEPORT on every TCP listening socket this instance binds "
       "(as uWSGI: each address is still one socket shared by the processes; another program "
       "of the same user may then bind the same address too)", G_PROCESS),
    _o("socket-timeout", INT, "TCP_DEFER_ACCEPT seconds on TCP listeners, the stats server's "
       "I/O timeout, and how long the local app workers (--socket) wait on a client's read or "
       "write", G_PROCESS, short="z", default=4, metavar="SECS"),
    _o("abstract-socket", BOOL, "bind every unix socket path in the Linux abstract namespace",
       G_PROCESS, short="a"),
    _o("chmod-socket", STRING, "chmod unix listening sockets to the octal MODE; a bare option "
       "means 666", G_PROCESS, short="C", arg=OPTIONAL, bare="666", aliases=("chmod",),
       metavar="MODE"),
    _o("vacuum", BOOL, "remove the unix socket files and the pidfile on exit", G_PROCESS),
    _o("die-on-term", BOOL, "shut down on SIGTERM instead of reloading", G_PROCESS),
    _o("stats-minified", BOOL, "write the statistics JSON on one line, without indentation",
       G_PROCESS, aliases=("stats-min",)),
    _o("stats-http", BOOL, "send the statistics as an HTTP response", G_PROCESS),
    _o("stats", STRING, "uWSGI's instance statistics server, which uwsgi-fastrouter does not have "
       "(giving it is an error): use --fastrouter-stats ADDR for the router's statistics",
       G_PROCESS, aliases=("stats-server",), metavar="ADDR", status=REPLACED),
    _o("no-fd-passing", BOOL, "never hand client connections over to unix-socket nodes; always "
       "relay", G_PROCESS),
    _o("fastrouter-trust-fd-passing", BOOL, "the unix-socket nodes take handed-over clients "
       "(uWSGI 1.x nodes, this package's --socket workers): once a node has taken 8 in a row, "
       "the router closes its side right after the handoff instead of waiting for the node's "
       "verdict; one handoff in 64 is still verified and a node found ignoring descriptors is "
       "verified from scratch (the unverified requests sent to it meanwhile are lost)",
       G_ROUTER),
    _o("buffer-size", UINT64, "largest request vars block the local app workers (--socket) accept; "
       "the router forwards any size", G_PROCESS, short="b", default=4096, zero_means=4096),
    _o("socket", LIST, "bind a uwsgi socket for this instance's application workers; repeatable",
       G_PROCESS, short="s", aliases=("uwsgi-socket",), default=[], metavar="ADDR",
       status=SUPPORTED),
    _o("shared-socket", LIST, "bind a socket before anything else; the k-th one is referenced as "
       "=k; repeatable", G_PROCESS, default=[], metavar="ADDR", status=SUPPORTED),
    _o("undeferred-shared-socket", LIST, "like --shared-socket, without TCP_DEFER_ACCEPT; numbered "
       "after the --shared-socket ones; repeatable", G_PROCESS, default=[], metavar="ADDR"),
    _o("processes", INT, "number of application worker processes", G_PROCESS, short="p",
       aliases=("workers",), default=1, zero_means=1, status=SUPPORTED),
    _o("harakiri", INT, "kill and respawn an application worker whose request has taken more than "
       "SECS seconds; 0 is off (for the router processes see --fastrouter-harakiri)", G_PROCESS,
       short="t", default=0, metavar="SECS"),
    _o("enable-threads", BOOL, "accepted for uWSGI configurations: Python threads always work in "
       "the application workers, and the router runs none", G_PROCESS, short="T", status=NOOP),
    _o("thunder-lock", BOOL, "accepted for uWSGI configurations: the processes sharing a "
       "listening socket accept from it without a lock", G_PROCESS, status=NOOP),
    _o("auto-procname", BOOL, "name the processes after their jobs (uWSGI master, uWSGI "
       "fastrouter N, uWSGI worker N) as ps and top show them; on Linux, at most 15 bytes", G_PROCESS),
    _o("procname-prefix", STRING, "put PREFIX in front of the process names (implies "
       "--auto-procname)", G_PROCESS, metavar="PREFIX"),
    _o("procname-prefix-spaced", STRING, "put PREFIX and a space in front of the process names "
       "(implies --auto-procname)", G_PROCESS, metavar="PREFIX"),
    _o("procname-append", STRING, "put SUFFIX after the process names (implies --auto-procname)",
       G_PROCESS, metavar="SUFFIX"),
    _o("procname", STRING, "name every process NAME (implies --auto-procname)", G_PROCESS,
       metavar="NAME"),
    _o("procname-master", STRING, "name the master process NAME (implies --auto-procname)",
       G_PROCESS, metavar="NAME"),
    _o("force-gateway", BOOL, "without a master, run the first router in the main process (what "
       "uwsgi-fastrouter always does without --master)", G_PROCESS),
    _o("uid", STRING, "switch to USER (name or number) after binding the sockets", G_PROCESS,
       metavar="USER", status=SUPPORTED),
    _o("gid", STRING, "switch to GROUP (name or number) after binding the sockets", G_PROCESS,
       metavar="GROUP", status=SUPPORTED),
    _o("pidfile", STRING, "write the pid of the master to PATH", G_PROCESS, metavar="PATH",
       status=SUPPORTED),
    _o("daemonize", STRING, "detach from the terminal and log to LOGFILE", G_PROCESS, short="d",
       metavar="LOGFILE", status=SUPPORTED),
    _o("umask", MODE, "set the process umask to the octal MODE (e.g. 022) at start-up, before "
       "any socket, pidfile or log file is created; without it the umask is inherited, also "
       "by --daemonize", G_PROCESS),
    _o("logto", STRING, "log to the file PATH instead of stderr", G_PROCESS, metavar="PATH",
       status=SUPPORTED),
    _o("log-date", STRING, "start every log line with the date and ' - ': by default as C's ctime() "
       "writes it (Thu Dec  3 02:02:03 2026), or formatted by strftime(FORMAT) (in INI files "
       "write %% for each %)", G_PROCESS, arg=OPTIONAL, bare="", aliases=("logdate",),
       metavar="FORMAT"),
    _o("log-reopen", BOOL, "reopen the --logto or --daemonize file on a reload, instead of "
       "keeping the one already open", G_PROCESS),
    _o("touch-logreopen", LIST, "reopen the --logto or --daemonize file (in every process) when "
       "the modification time of FILE changes, checked once a second: logrotate renames the log, "
       "then touches FILE; repeatable", G_PROCESS, default=[], metavar="FILE"),
    _o("touch-reload", LIST, "gracefully reload when the modification time of FILE changes, "
       "checked once a second (implies --master); repeatable", G_PROCESS, default=[],
       metavar="FILE"),
    _o("zerg-server", STRING, "hand this instance's listening sockets to zergs connecting to the "
       "unix socket PATH", G_PROCESS, metavar="PATH", status=SUPPORTED),
    _o("zerg", LIST, "the local app workers also accept on the listening sockets of the zerg "
       "server at PATH; repeatable", G_PROCESS, default=[], metavar="PATH"),
    _o("zerg-fallback", BOOL, "start with the own --socket listeners when no zerg server can be "
       "reached (else that is a start-up error)", G_PROCESS),
    # -- Cache and application loading -------------------------------------------
    _o("cache", UINT64, "create the default cache with N items; 0 creates none", G_APPS, default=0,
       status=SUPPORTED),
    _o("cache-blocksize", UINT64, "largest value, in bytes, the default cache stores", G_APPS,
       default=65536, metavar="BYTES", status=SUPPORTED),
    _o("cache2", LIST, "create a cache from name=NAME,items=N[,blocksize=B][,keysize=K]; "
       "repeatable", G_APPS, default=[], metavar="SPEC", status=SUPPORTED),
    _o("file", STRING, "run the Python file PATH once at startup, before the router starts",
       G_APPS, metavar="PATH", status=SUPPORTED),
    _o("wsgi-file", STRING, "the WSGI app of the local workers (with --socket); without --socket, "
       "run once at startup like --file", G_APPS, metavar="PATH", status=SUPPORTED),
    _o("module", STRING, "the local workers' WSGI app as a module (NAME or NAME:CALLABLE, with "
       "--socket); without --socket, imported once at startup",
       G_APPS, short="w", aliases=("wsgi",), metavar="NAME", status=SUPPORTED),
    _o("need-app", BOOL, "exit at start-up when the application cannot be loaded (what "
       "uwsgi-fastrouter always does)", G_APPS, arg=OPTIONAL, bare="1", metavar="BOOL"),
    # -- Subscriptions -------------------------------------------------------------
    _o("subscribe-to", LIST, "announce this instance to a subscription server: "
       "[SOCKNAME=]SERVER:KEY[,MOD1[,DIGEST:KEYFILE]] or SERVER:@MAPFILE; repeatable", G_SUBS,
       aliases=("st", "subscribe"), default=[], metavar="SPEC", status=SUPPORTED),
    _o("subscribe2", LIST, "announce this instance using key=value pairs (server, key, socket, "
       "addr, weight, modifier1, modifier2, sign...); repeatable", G_SUBS, default=[],
       metavar="SPEC", status=SUPPORTED),
    _o("subscribe-hmac-key", STRING, "prove every announce with an hmac var (HMAC-SHA256 under "
       "the shared key in FILE, mode 0600 or 0640, at least 16 bytes) and a unix timestamp, for "
       "a router started with --subscriptions-hmac-key; a uWSGI 2.0 router ignores both",
       G_SUBS, metavar="FILE"),
    _o("subscribe-freq", INT, "seconds between two announces", G_SUBS, default=10, zero_means=10,
       metavar="SECS",
       status=SUPPORTED),
    _o("subscribe-with-modifier1", STRING, "announce every subscription with modifier1 N", G_SUBS,
       metavar="N", status=SUPPORTED),
    _o("weight", UINT64, "weight announced with the subscriptions (0 counts as 1)", G_SUBS,
       default=0, status=SUPPORTED),
    _o("auto-weight", BOOL, "announce processes x cores as the weight; takes a value", G_SUBS,
       arg=REQUIRED, status=SUPPORTED),
    _o("unsubscribe-on-graceful-reload", BOOL, "unsubscribe before a graceful reload", G_SUBS,
       status=SUPPORTED),
    _o("drain-on-graceful-reload", BOOL, "before a graceful reload, announce drain=1 instead: "
       "our routers send this instance nothing new and let the requests in flight finish (a "
       "uWSGI router ignores the field)", G_SUBS),
    _o("start-unsubscribed", BOOL, "prepare the subscriptions but send none until enabled", G_SUBS,
       status=SUPPORTED),
    _o("subscription-notify-socket", STRING, "unix datagram socket on which subscription servers "
       "report back (our router does so only for signed or credentials-checked announces)",
       G_SUBS, metavar="PATH", status=SUPPORTED),
    _o("subscription-tolerance", INT, "seconds a subscribed node is kept without a new announce",
       G_SUBS, default=17, zero_means=17, metavar="SECS", status=SUPPORTED),
    _o("subscription-algo", STRING, "balancing among subscribed nodes: wrr, lrc, wlrc or iphash "
       "(rendezvous hashing of the client's REMOTE_ADDR, sticky); other names mean wrr; a key's "
       "first announce may name its own with algo=", G_SUBS, default="wrr", metavar="NAME",
       status=SUPPORTED),
    _o("subscription-slow-start", INT, "seconds over which a node that joins a key (or comes back "
       "to it) ramps from a tenth of its weight to all of it, for wrr, lrc and wlrc keys; 0 (the "
       "default) is off", G_SUBS, default=0, metavar="SECS"),
    _o("subscription-drain-timeout", INT, "seconds a node that announced drain=1 keeps its "
       "requests in flight before it is marked as failed (it goes when the last one ends); 0 "
       "waits for them however long", G_SUBS, default=60, metavar="SECS"),
    _o("subscription-mountpoints", INT, "route by host plus the first N segments of PATH_INFO "
       "(example.com/app) when such a key is subscribed, else by the host; PATH_INFO is passed "
       "unchanged", G_SUBS, aliases=("subscription-mountpoint",), default=0),
    _o("subscription-resolve-names", BOOL, "resolve announced node addresses that are "
       "HOST:PORT with a host name (one node per address of the name); off, such a node cannot "
       "be reached, as in uWSGI", G_SUBS),
    _o("subscription-dotsplit", BOOL, "when a key is unknown, retry with its leftmost label "
       "removed (www.example.com -> .example.com)", G_SUBS, status=SUPPORTED),
    _o("subscriptions-sign-check", STRING, "accept only subscriptions signed with the public keys "
       "in DIR (e.g. SHA1:/etc/uwsgi/keys)", G_SUBS, metavar="DIGEST:DIR", status=SUPPORTED),
    _o("subscriptions-sign-check-tolerance", INT, "seconds a signed subscription's timestamp may "
       "lag behind; as long, the last timestamp of a removed node (at most 10000 of them) is "
       "kept, so that its captured packets cannot bring it back", G_SUBS, default=86400,
       metavar="SECS", status=SUPPORTED),
    _o("subscriptions-hmac-key", STRING, "accept only subscriptions proven with the shared key in "
       "FILE (an hmac var, HMAC-SHA256; the same unix freshness and replay rules as signatures); "
       "with --subscriptions-sign-check too, either proof will do, and any proof carried must "
       "verify; FILE must not be open to others and holds at least 16 bytes", G_SUBS,
       metavar="FILE"),
    _o("subscription-allow", LIST, "accept subscription datagrams only from the senders listed: "
       "ADDRESS[/PREFIX] for UDP, /PATH (a trailing / or * makes it a prefix) or @NAME for bound "
       "unix sockets, 'unbound' for unix sockets without an address; repeatable; others are "
       "dropped, counted and logged", G_SUBS, default=[], metavar="CIDR|PATH"),
    _o("subscriptions-sign-skip-uid", LIST, "do not require signatures from unix peers running as "
       "UID; repeatable", G_SUBS, default=[], metavar="UID", status=SUPPORTED),
    _o("subscriptions-use-credentials", BOOL, "send and check unix credentials with subscriptions "
       "on unix sockets", G_SUBS, status=SUPPORTED),
    _o("subscriptions-credentials-check", LIST, "accept a key from a unix peer only if DIR followed "
       "by the key belongs to the peer's uid; repeatable", G_SUBS, default=[], metavar="DIR",
       status=SUPPORTED),
    _o("subscription-max-keys", INT, "most keys the subscription table holds; while it is full a "
       "new key is refused (counted, logged once a second), nothing is evicted and subscribed "
       "nodes keep refreshing; a key announced more than once keeps its slot for twice the "
       "tolerance after its nodes go", G_SUBS, default=10000, metavar="N"),
    _o("subscription-max-nodes", INT, "most nodes one key holds; more are dropped with a log line",
       G_SUBS, default=64, metavar="N"),
    # -- Configuration ---------------------------------------------------------------
    _o("ini", ACTION, "read the [uwsgi] section (or [SECTION]) of FILE here; :SECTION reads "
       "another section of the last file", G_CONFIG, metavar="FILE[:SECTION]"),
    _o("set", ACTION, "define the placeholder NAME; when NAME is an option, set it too", G_CONFIG,
       short="S", metavar="NAME=VALUE"),
    _o("set-ph", ACTION, "define the placeholder NAME only", G_CONFIG,
       aliases=("set-placeholder",), metavar="NAME=VALUE"),
    _o("strict", BOOL, "reject INI keys and --set names that are not options, instead of keeping "
       "them as placeholders", G_CONFIG),
    _o("plugins", LIST, "uWSGI plugins to load: fastrouter, corerouter, python and python3 are "
       "built in (one log line, nothing to load); any other name is a start-up error; comma or "
       "space separated, repeatable", G_CONFIG, aliases=("plugin",), default=[], metavar="NAMES"),
    _o("master-fifo", LIST, "commands for the master on the named pipe PATH: r graceful reload, "
       "R brutal reload, q or Q shutdown, S block/unblock the subscriptions, D ADDR (to the end "
       "of the line) drain a node, U ADDR undrain it; repeatable", G_PROCESS,
       default=[], metavar="PATH"),
    _o("reload", STRING, "gracefully reload the master whose pid is in PIDFILE (SIGHUP) and exit",
       G_PROCESS, metavar="PIDFILE"),
    _o("brutal-reload", STRING, "brutally reload the master whose pid is in PIDFILE (SIGTERM) and "
       "exit", G_PROCESS, metavar="PIDFILE"),
    _o("stop", STRING, "shut down the master whose pid is in PIDFILE (SIGINT) and exit", G_PROCESS,
       metavar="PIDFILE"),
    _o("fastrouter-drain", LIST, "tell the master reading --master-fifo to drain the node ADDR "
       "(no new requests to it, those in flight finish) and exit; repeatable", G_PROCESS,
       default=[], metavar="ADDR"),
    _o("fastrouter-undrain", LIST, "tell the master reading --master-fifo to take back the drain "
       "of the node ADDR and exit; repeatable", G_PROCESS, default=[], metavar="ADDR"),
    _o("help", ACTION, "print this help and exit", G_CONFIG, short="h", arg=NONE),
    _o("version", ACTION, "print the version and exit", G_CONFIG, arg=NONE),
)

# name or alias -> option
_BY_NAME: Dict[str, Option] = {}
# short letter -> option
_BY_SHORT: Dict[str, Option] = {}
# every long name in table order (for prefix matching)
_LONG_NAMES: List[str] = []

for _opt in OPTIONS:
    for _name in _opt.names:
        if _name in _BY_NAME:
            raise RuntimeError("duplicate option name " + _name)
        _BY_NAME[_name] = _opt
        _LONG_NAMES.append(_name)
    if _opt.short:
        if _opt.short in _BY_SHORT:
            raise RuntimeError("duplicate short option -" + _opt.short)
        _BY_SHORT[_opt.short] = _opt
del _opt, _name

# Environment variables uWSGI uses for its own bookkeeping: never options.
ENV_SKIP = frozenset({
    "UWSGI_RELOADS", "UWSGI_VASSALS_DIR", "UWSGI_EMPEROR_FD", "UWSGI_BROODLORD_NUM",
    "UWSGI_EMPEROR_FD_CONFIG", "UWSGI_EMPEROR_PROXY", "UWSGI_JAIL_PID", "UWSGI_ORIGINAL_PROC_NAME",
})

# Values that make a boolean false (compared lower-cased; "0" is checked apart).
_FALSE_WORDS = frozenset({"false", "off", "no"})


def find_option(name: str) -> Optional[Option]:
    """The option called *name* (canonical name or alias, exact), or None."""
    return _BY_NAME.get(name)


# ---------------------------------------------------------------------------
# Errors and the result object
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration is unusable; ``str(e)`` is the message to print, exit 1."""


class StartupError(Exception):
    """A configuration that loaded but cannot run (a cross-option check, a socket that
    cannot be bound, ...); the message names the option.  Exit status 1."""


class EarlyExit(Exception):
    """``--help`` / ``--version``: print :attr:`text` to stdout, exit :attr:`code`."""

    def __init__(self, text: str, code: int = 0) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class Config:
    """The effective configuration: one attribute per option (``-`` -> ``_``).

    Every attribute starts at the option's default; :meth:`given` says whether
    a source set it.  ``placeholders`` maps each non-option key to its first value.
    Once :func:`load_config` returns it the object is frozen: setting or deleting an
    attribute raises :class:`AttributeError`.  Each value has its option's type
    (:data:`KIND_TYPES`; None for an option with no default that was not given), and
    an option with ``zero_means`` never holds 0: uWSGI's "0 means the default" is
    applied on load, so the users of a value never restate its default.
    """

    _frozen = False

    def __init__(self) -> None:
        for option in OPTIONS:
            default = option.default
            if option.kind == ACTION:
                default = [] if option.arg == REQUIRED else False
            elif isinstance(default, list):
                default = list(default)
            setattr(self, option.attr, default)
        self.placeholders: Dict[str, str] = {}
        self._given: Set[str] = set()

    def given(self, name: str) -> bool:
        """Was the option *name* (canonical, with dashes) set by any source?"""
        return name in self._given

    def freeze(self) -> "Config":
        """Apply the ``zero_means`` rules, check every value's type, and forbid changes."""
        for option in OPTIONS:
            value = getattr(self, option.attr)
            if option.zero_means is not None and not value:
                setattr(self, option.attr, option.zero_means)
            _check_type(option, getattr(self, option.attr))
        object.__setattr__(self, "_frozen", True)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError("the configuration is frozen: %s cannot be set" % name)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise AttributeError("the configuration is frozen: %s cannot be deleted" % name)
        object.__delattr__(self, name)

    def __repr__(self) -> str:
        shown = ", ".join(
            "%s=%r" % (o.attr, getattr(self, o.attr)) for o in OPTIONS if o.name in self._given
        )
        return "Config(%s)" % shown


def _check_type(option: Option, value: Any) -> None:
    """A loaded value has its kind's type; None only for an option left at a None default."""
    if value is None and option.default is None:
        return
    wanted = option.value_type
    if option.kind in (INT, UINT64, MODE) and isinstance(value, bool):
        wanted = None   # bool is an int subclass: never a number here
    if wanted is None or not isinstance(value, wanted):
        raise TypeError("option %s holds %r, not a %s value" % (option.name, value, option.kind))


def option_default(name: str) -> Any:
    """The default of the option *name*, as the table has it."""
    return _BY_NAME[name].default


# ---------------------------------------------------------------------------
# Value conversion (C semantics)
# ---------------------------------------------------------------------------

_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]*)")


def _digits_value(digits: str) -> int:
    """The value of a run of ASCII digits ("" is 0), saturated at 2**64: the callers
    clamp at or below that, and int() refuses strings of thousands of digits."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 20 else 1 << 64


def c_atoi(text: str) -> int:
    """C ``atoi`` on glibc: leading digits, junk gives 0, result wrapped to a C int."""
    match = _NUMBER.match(text)
    sign, digits = match.group(1), match.group(2)
    value = _digits_value(digits)
    if sign == "-":
        value = -value
    value = max(-(1 << 63), min((1 << 63) - 1, value))  # strtol clamps to long
    value &= 0xFFFFFFFF  # then the cast to int keeps the low 32 bits
    return value - (1 << 32) if value >= (1 << 31) else value


def c_strtoul(text: str) -> int:
    """C ``strtoul(text, NULL, 10)`` for a 64-bit unsigned long."""
    match = _NUMBER.match(text)
    sign, digits = match.group(1), match.group(2)
    value = _digits_value(digits)
    if value > (1 << 64) - 1:
        return (1 << 64) - 1
    if sign == "-":
        value = (-value) % (1 << 64)
    return value


def parse_bool(value: Optional[str]) -> bool:
    """uWSGI's boolean: no value is true; false/off/no (any case) and 0 are false."""
    if value is None:
        return True
    return not (value.lower() in _FALSE_WORDS or value == "0")


def log_date_format(value: Optional[str]) -> Optional[str]:
    """``--log-date``'s value as :func:`log.set_date_format` takes it: None (off) when
    not given or false, "" (uWSGI's ctime layout) when bare or true, else the format."""
    if value is None or value.lower() in _FALSE_WORDS or value == "0":
        return None
    if value == "" or value.lower() in ("true", "on", "yes", "1"):
        return ""
    return value


# --plugins: what uWSGI builds as plugins and this program has built in.
BUILTIN_PLUGINS = ("fastrouter", "corerouter", "python", "python3")
_PYTHON_PLUGIN = re.compile(r"python3[0-9]*\Z")
_PLUGIN_FILE = re.compile(r"(_plugin)?(\.so)?\Z")


def plugin_names(values: Iterable[str]) -> List[str]:
    """The plugin names in ``--plugins`` values: comma or space separated; a path to a
    plugin file (``/usr/lib/uwsgi/plugins/python3_plugin.so``) counts as its name."""
    names: List[str] = []
    for value in values:
        for word in re.split(r"[,\s]+", value):
            if word:
                names.append(_PLUGIN_FILE.sub("", word.rsplit("/", 1)[-1]))
    return names


def check_plugins(values: Iterable[str]) -> Optional[str]:
    """The log line for the ``--plugins`` given (None if none).

    Raises :class:`ConfigError` naming the first plugin that is not built in."""
    names = plugin_names(values)
    for name in names:
        if name not in BUILTIN_PLUGINS and not _PYTHON_PLUGIN.match(name):
            raise ConfigError('unable to load plugin "%s": %s has the plugins %s built in and '
                              "loads no others" % (name, PROGRAM, ", ".join(BUILTIN_PLUGINS)))
    if not names:
        return None
    unique = list(dict.fromkeys(names))
    return "plugins %s: built into %s, nothing to load" % (", ".join(unique), PROGRAM)


# ---------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------


class _Entry:
    """One collected ``key = value`` occurrence."""

    __slots__ = ("key", "value", "option", "placeholder_only")

    def __init__(self, key: str, value: Optional[str], option: Optional[Option], placeholder_only: bool = False) -> None:
        self.key = key
        self.value = value
        self.option = option
        self.placeholder_only = placeholder_only


MAX_INI_DEPTH = 32
#: a %(NAME) whose value refers to another, and so on: resolved recursively, so bounded
MAX_PLACEHOLDER_DEPTH = 100


HELP_POINTER = "run %s --help to list every option" % PROGRAM


def _getopt_error(message: str, hint: Optional[str] = None) -> ConfigError:
    """uWSGI's two lines, then (for a name nobody knows) our hint on a third."""
    text = message + "\ngetopt_long() error"
    if hint:
        text += "\n" + hint
    return ConfigError(text)


def close_option(written: str) -> Optional[str]:
    """The option name *written* most likely meant (a typo), or None."""
    found = difflib.get_close_matches(written, _LONG_NAMES, n=1, cutoff=0.75)
    return found[0] if found else None


def _unknown_hint(written: str) -> str:
    guess = close_option(written)
    if guess is None:
        return HELP_POINTER
    return "did you mean --%s? (%s)" % (guess, HELP_POINTER)


class _Collector:
    """Gathers entries from the environment, argv and INI files, in order."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.entries: List[_Entry] = []
        self.warn = warn
        self.ini = IniLoader()
        self.ini_specs: List[str] = []
        self.ini_unknown: List[Tuple[str, str]] = []   # (key, file) of INI keys that are no option
        self.sets: List[str] = []
        self.set_phs: List[str] = []
        self.depth = 0  # INI files being read right now, nested

    # -- the common path for every source -----------------------------------------

    def take(self, option: Option, key: str, value: Optional[str]) -> None:
        """Record one occurrence of *option* (written as *key*)."""
        if option.kind != ACTION:
            self.entries.append(_Entry(key, value, option))
            return
        name = option.name
        if name == "ini":
            self.load_ini(value or "")
        elif name == "set":
            self.sets.append(value or "")
            ph_key, ph_value = self._split_set(value)
            self.take_key(ph_key, ph_value)
        elif name == "set-ph":
            self.set_phs.append(value or "")
            ph_key, ph_value = self._split_set(value)
            if ph_key in _BY_NAME:
                raise ConfigError(
                    "you cannot use %s as a placeholder, it is already available as an option" % ph_key
                )
            self.entries.append(_Entry(ph_key, ph_value, None, placeholder_only=True))
        elif name == "help":
            if parse_bool(value):
                raise EarlyExit(help_text(), 0)
        elif name == "version":
            if parse_bool(value):
                raise EarlyExit(version_text(), 0)
        else:  # pragma: no cover - every ACTION is handled above
            raise AssertionError(name)

    def take_key(self, key: str, value: Optional[str]) -> None:
        """Record a key from a config source (INI, --set): exact names only."""
        option = _BY_NAME.get(key)
        if option is None:
            self.entries.append(_Entry(key, value, None))
        else:
            self.take(option, key, value)

    @staticmethod
    def _split_set(value: Optional[str]) -> Tuple[str, str]:
        key, eq, rest = (value or "").partition("=")
        if not eq:
            raise ConfigError("invalid placeholder/--set value")
        return key, rest

    def load_ini(self, spec: str) -> None:
        if self.depth >= MAX_INI_DEPTH:
            raise ConfigError(
                'INI files nested more than %d deep at "%s" (does a file include itself?)' % (MAX_INI_DEPTH, spec)
            )
        try:
            result = self.ini.load(spec)
        except IniError as exc:
            raise ConfigError(str(exc)) from None
        self.ini_specs.append(spec)
        if result.warning:
            self.warn(result.warning)
        self.depth += 1
        try:
            for key, value in result.entries:
                if key not in _BY_NAME:
                    self.ini_unknown.append((key, result.path))
                self.take_key(key, value)
        finally:
            self.depth -= 1

    # -- sources --------------------------------------------------------------------

    def from_environ(self, environ: Mapping[str, str]) -> None:
        for var, value in environ.items():
            if not var.startswith("UWSGI_") or var in ENV_SKIP:
                continue
            key = var[6:].lower().replace("_", "-")
            option = _BY_NAME.get(key)
            if option is not None:
                self.take(option, key, value)

    def from_argv(self, argv: List[str]) -> None:
        positionals: List[str] = []
        index = 0
        count = len(argv)
        while index < count:
            arg = argv[index]
            index += 1
            if arg == "--":
                positionals.extend(argv[index:])
                break
            if arg.startswith("--"):
                index = self._long(arg, argv, index)
            elif arg.startswith("-") and arg != "-":
                index = self._shorts(arg, argv, index)
            else:
                positionals.append(arg)
        for path in positionals:
            if path.endswith(".ini"):
                self.load_ini(path)
            else:
                raise ConfigError("unable to load configuration from %s" % path)

    def _long(self, arg: str, argv: List[str], index: int) -> int:
        body = arg[2:]
        written, eq, attached = body.partition("=")
        name = self._match_long(written)
        option = _BY_NAME[name]
        if option.arg == NONE:
            if eq:
                raise _getopt_error("option '--%s' doesn't allow an argument" % name)
            value: Optional[str] = None
        elif option.arg == OPTIONAL:
            value = attached if eq else None
        elif eq:
            value = attached
        elif index < len(argv):
            value = argv[index]
            index += 1
        else:
            raise _getopt_error("option '--%s' requires an argument" % name)
        self.take(option, name, value)
        return index

    @staticmethod
    def _match_long(written: str) -> str:
        if written in _BY_NAME:
            return written
        candidates = [n for n in _LONG_NAMES if n.startswith(written)]
        if not candidates:
            raise _getopt_error("unrecognized option '--%s'" % written, _unknown_hint(written))
        if len(candidates) > 1:
            # getopt accepts an abbreviation shared by names that all behave
            # the same (same option with the same short letter); otherwise
            # it is ambiguous.
            first = _BY_NAME[candidates[0]]
            same = all(_BY_NAME[c] is first for c in candidates) and first.short is not None
            if not same:
                raise _getopt_error(
                    "option '--%s' is ambiguous; possibilities: %s"
                    % (written, " ".join("'--%s'" % c for c in candidates))
                )
        return candidates[0]

    def _shorts(self, arg: str, argv: List[str], index: int) -> int:
        letters = arg[1:]
        pos = 0
        while pos < len(letters):
            letter = letters[pos]
            pos += 1
            option = _BY_SHORT.get(letter)
            if option is None:
                raise _getopt_error("invalid option -- '%s'" % letter, HELP_POINTER)
            rest = letters[pos:]
            if option.arg == NONE:
                self.take(option, option.name, None)
                continue
            if rest:
                value: Optional[str] = rest
            elif option.arg == OPTIONAL:
                value = None
            elif index < len(argv):
                value = argv[index]
                index += 1
            else:
                raise _getopt_error("option requires an argument -- '%s'" % letter)
            self.take(option, option.name, value)
            break
        return index


# ---------------------------------------------------------------------------
# Substitution passes
# ---------------------------------------------------------------------------


def _expand(text: str, symbol: str, lookup: Callable[[str], Optional[str]]) -> str:
    """Replace every ``<symbol>(KEY)`` in *text* by ``lookup(KEY)``.

    Parentheses inside KEY nest; a new ``<symbol>(`` inside a KEY starts over
    from there, so the innermost one wins.  An empty KEY, or a lookup giving
    None, leaves the text as written.  Inserted text is not scanned again.
    """
    opener = symbol + "("
    if opener not in text:
        return text
    out: List[str] = []
    copied = 0  # text[copied:] is not in out yet
    start = -1  # index of the current candidate's symbol
    depth = 0
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char == symbol:
            if text.startswith("(", index + 1):
                start = index
                depth = 0
                index += 2
                continue
            start = -1
        elif start >= 0:
            if char == "(":
                depth += 1
            elif char == ")":
                if depth:
                    depth -= 1
                else:
                    key = text[start + 2:index]
                    begin = start
                    start = -1
                    if key:
                        value = lookup(key)
                        if value is not None:
                            out.append(text[copied:begin])
                            out.append(value)
                            copied = index + 1
        index += 1
    out.append(text[copied:])
    return "".join(out)


def _read_at_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError('open("%s"): %s' % (path, exc.strerror or exc)) from None
    except ValueError as exc:  # a NUL byte, from an INI file
        raise ConfigError('open("%s"): %s' % (path.replace("\0", "\\0"), exc)) from None
    if data[-1:] in (b"\n", b"\r"):
        data = data[:-1]
    return data.decode("utf-8", "surrogateescape")


def _substitute(entries: List[_Entry], environ: Mapping[str, str]) -> Set[str]:
    """Run the ``$()``, ``@()`` and ``%()`` passes over every entry, in place.

    Returns the keys some ``%(KEY)`` referred to."""
    for entry in entries:
        if entry.value is not None:
            entry.value = _expand(entry.value, "$", environ.get)
    for entry in entries:
        if entry.value is not None:
            entry.value = _expand(entry.value, "@", _read_at_file)

    first: Dict[str, _Entry] = {}
    for entry in entries:
        first.setdefault(entry.key, entry)
    done: Dict[int, str] = {}
    active: Set[int] = set()
    used: Set[str] = set()

    def resolve(entry: _Entry) -> Optional[str]:
        if entry.value is None:
            return None
        ident = id(entry)
        if ident in done:
            return done[ident]
        if ident in active:  # a reference cycle: leave it as written
            return None
        if len(active) >= MAX_PLACEHOLDER_DEPTH:
            raise ConfigError("placeholder references nested more than %d deep at %s"
                              % (MAX_PLACEHOLDER_DEPTH, entry.key))
        active.add(ident)
        try:
            result = _expand(entry.value, "%", lookup)
        finally:
            active.discard(ident)
        done[ident] = result
        return result

    def lookup(key: str) -> Optional[str]:
        target = first.get(key)
        if target is None:
            return None
        used.add(key)
        return resolve(target)

    for entry in entries:
        resolve(entry)
    for entry in entries:
        if entry.value is not None:
            entry.value = done.get(id(entry), entry.value)
    return used


# ---------------------------------------------------------------------------
# Apply
# ---------------------------------------------------------------------------


def _convert(option: Option, key: str, value: Optional[str]) -> Any:
    if option.arg == OPTIONAL and not value:
        value = option.bare
    kind = option.kind
    if kind == INT:
        number = 1 if value is None else c_atoi(value)
        if number < 0:
            raise ConfigError('invalid value for option "%s": must be > 0' % key)
        return number
    if kind == UINT64:
        return 1 if value is None else c_strtoul(value)
    if kind == BOOL:
        return parse_bool(value)
    if kind == MODE:
        return parse_mode(key, value)
    return "" if value is None else value


_OCTAL_MODE = re.compile(r"[0-7]{1,4}")


def parse_mode(key: str, value: Optional[str]) -> int:
    """An octal mode such as ``022`` or ``0022`` (at most 0777); anything else is an error.

    uWSGI logs ``invalid umask`` for a value shorter than three characters and goes
    on with a umask of 0 (every file it creates world-writable); here a value that
    is not a mode stops the start-up.
    """
    text = (value or "").strip()
    if not _OCTAL_MODE.fullmatch(text) or int(text, 8) > 0o777:
        raise ConfigError('invalid value for option "%s": %r is not an octal mode from 000 to 777 '
                          '(example: 022)' % (key, value or ""))
    return int(text, 8)


def _apply(entries: List[_Entry], warn: Callable[[str], None]) -> Config:
    config = Config()
    strict = False
    for entry in entries:
        if entry.option is not None and entry.option.name == "strict":
            strict = parse_bool(entry.value)

    for entry in entries:
        option = entry.option
        if option is None:
            if strict and not entry.placeholder_only:
                raise ConfigError("[strict-mode] unknown config directive: %s" % entry.key)
            config.placeholders.setdefault(entry.key, entry.value if entry.value is not None else "")
            continue
        if option.status == PENDING:
            raise ConfigError('option "--%s" is not supported yet by %s' % (entry.key, PROGRAM))
        if option.status == REPLACED:
            raise ConfigError('option "--%s" is refused: %s' % (entry.key, option.help))
        config._given.add(option.name)
        if option.status == DEPRECATED:
            warn('[WARNING] option "%s" is deprecated: useless thanks to the new implementation' % entry.key)
            continue
        value = _convert(option, entry.key, entry.value)
        if option.kind == LIST:
            getattr(config, option.attr).append(value)
        else:
            setattr(config, option.attr, value)
        if option.name == "procname-prefix-spaced":
            # uWSGI keeps one prefix: the last of --procname-prefix and this one wins.
            config.procname_prefix = value + " "
    return config


def load_config(
    argv: List[str],
    environ: Mapping[str, str],
    warn: Optional[Callable[[str], None]] = None,
) -> Config:
    """Build the :class:`Config` from *environ* then *argv* (without the program name).

    Raises :class:`ConfigError` for an unusable configuration and
    :class:`EarlyExit` for ``--help`` / ``--version``.  Warnings (a missing INI
    section, a deprecated option) go to *warn*, by default the log (stderr).
    """
    if warn is None:
        warn = _log.log
    collector = _Collector(warn)
    collector.from_environ(environ)
    collector.from_argv(list(argv))
    used = _substitute(collector.entries, environ)
    config = _apply(collector.entries, warn)
    ignored = ignored_ini_keys(collector.ini_unknown, used)
    if ignored:
        warn(ignored)
    plugins = check_plugins(config.plugins)
    if plugins:
        warn(plugins)
    # The immediate options keep what they were given, for the record.
    for attr, values, name in (
        ("ini", collector.ini_specs, "ini"),
        ("set", collector.sets, "set"),
        ("set_ph", collector.set_phs, "set-ph"),
    ):
        setattr(config, attr, list(values))
        if values:
            config._given.add(name)
    return config.freeze()


def ignored_ini_keys(unknown: List[Tuple[str, str]], used: Set[str]) -> Optional[str]:
    """The warning about INI keys that are neither options nor used as ``%(KEY)``
    placeholders (None when there are none); ``--strict`` turns them into errors."""
    by_file: Dict[str, List[str]] = {}
    for key, path in unknown:
        if key in used:
            continue
        keys = by_file.setdefault(path, [])
        guess = close_option(key)
        shown = key if guess is None else "%s (did you mean %s?)" % (key, guess)
        if shown not in keys:
            keys.append(shown)
    if not by_file:
        return None
    files = "; ".join("%s in %s" % (", ".join(keys), path) for path, keys in by_file.items())
    return ("*** WARNING: ignoring INI keys that are not %s options: %s "
            "(--strict makes this an error) ***" % (PROGRAM, files))


# ---------------------------------------------------------------------------
# --help and --version
# ---------------------------------------------------------------------------


def option_flags(option: Option) -> str:
    """``-M, --master`` / ``--fastrouter-timeout SECS`` as shown in --help."""
    flag = "--" + option.name + option.argument_text()
    if option.short:
        return "-%s, %s" % (option.short, flag)
    return "    " + flag


def options_in_group(group: str) -> Iterable[Option]:
    return (o for o in OPTIONS if o.group == group)


def version_text() -> str:
    return "%s %s (uWSGI %s compatible)\n" % (PROGRAM, __version__, UWSGI_COMPAT_VERSION)


_HELP_COLUMN = 44      # where the descriptions start on a wide enough terminal
_HELP_NARROW = 8       # their indent when the terminal is too narrow for two columns
_HELP_MIN_TEXT = 30    # the narrowest description column worth keeping beside the flags
_NBSP = "\xa0"         # glues "(default: 60)" so that wrapping never splits it


def help_width() -> int:
    """The terminal's width (``COLUMNS`` wins), 80 when output is not a terminal."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def _wrap(text: str, width: int, indent: int) -> List[str]:
    lines = textwrap.wrap(text, width=max(20, width - indent), break_long_words=False,
                          break_on_hyphens=False)
    return [line.replace(_NBSP, " ") for line in lines] or [""]


def help_entry(option: Option, width: Optional[int] = None) -> str:
    """The --help lines of one option, wrapped to *width* columns (default: the terminal).

    The flags stand on the left; the description starts on the same line in column 44
    when both fit, else on the next line, indented."""
    if width is None:
        width = help_width()
    left = "  " + option_flags(option)
    notes = [note.replace(" ", _NBSP) for note in option.notes()]
    if option.aliases:   # may break between two aliases, never inside one
        notes.append("[alias:" + _NBSP + ", ".join("--" + a for a in option.aliases) + "]")
    text = " ".join([option.help] + notes)
    column = _HELP_COLUMN if width - _HELP_COLUMN >= _HELP_MIN_TEXT else _HELP_NARROW
    body = _wrap(text, width, column)
    pad = " " * column
    if len(left) + 2 > column:
        return "\n".join([left] + [pad + line for line in body])
    return "\n".join([left.ljust(column) + body[0]] + [pad + line for line in body[1:]])


def help_text(width: Optional[int] = None) -> str:
    """What ``--help`` prints, generated from :data:`OPTIONS`, wrapped to *width* columns
    (default: the terminal's width, 80 when not a terminal)."""
    if width is None:
        width = help_width()
    intro = ("A drop-in replacement for the uWSGI %s FastRouter. Options also come from INI "
             "files (--ini FILE, or FILE.ini as an argument) and from UWSGI_<NAME> environment "
             "variables; see %s(1)." % (UWSGI_COMPAT_VERSION, PROGRAM))
    lines = ["Usage: %s [options...] [file.ini...]" % PROGRAM, ""]
    lines.extend(_wrap(intro, width, 0))
    for group in GROUPS:
        lines.append("")
        lines.append(group + ":")
        lines.extend(help_entry(option, width) for option in options_in_group(group))
    lines.append("")
    return "\n".join(lines)
