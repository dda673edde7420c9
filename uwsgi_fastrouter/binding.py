"""One record of the sockets this instance holds: bound, adopted after a re-exec, or lent.

Theory of operation
-------------------
:class:`Bindings` is made in exactly one of two ways, before anything else runs:

* :meth:`Bindings.bind` binds what the configuration asks for, in uWSGI's order
  (shared sockets first, since the others may name them as ``=N``; then the router
  listeners, the app sockets, the zerg attachments, the zerg server, the subscription
  sockets, the stats and the metrics endpoints), logging uWSGI's line for each with
  the real address and descriptor.  Sockets received from a zerg server (``--zerg``,
  ``--fastrouter-zerg``) are recorded like the bound ones.
* :meth:`Bindings.adopt` rebuilds the same record from the descriptors a previous
  image of the master left open across its re-exec (a graceful reload never closes a
  listening socket); :meth:`Bindings.inheritable_state` is what that previous image
  wrote for it.

``owned`` lists every socket once, in binding order: it is what is closed at the end
(removing the UNIX socket files this process created) and what crosses a re-exec.
The other members are views on it by role.

Per-process listening sockets (``--fastrouter-reuse-port``, docs/decisions.md): the
router's TCP listeners are bound with ``SO_REUSEPORT`` and, for each router process
after the first, bound once more on the same address (``per_process``).  The master
binds them all and keeps them for its whole life (and across a reload's re-exec), so
the connections the kernel queued on a process's socket wait there for that
process's successor instead of being reset.  :meth:`Bindings.for_process` says which
of them a router process polls; :meth:`Bindings.keep_for_process` makes a forked
router process keep only those.
"""

from __future__ import annotations

import os
import socket
from typing import List, Optional

from . import zerg
from .addresses import shared_socket_index
from .log import log
from .options import StartupError
from .sockets import AddressError, Listener, bind_listener, bind_sibling, bind_stream_server
from .subserver import DatagramListener, bind_datagram


class Bindings:
    """The bound sockets, by role."""

    def __init__(self) -> None:
        self.owned: list = []           # every socket below, once, in binding order
        self.listeners: list = []       # the router's (--fastrouter, --fastrouter-zerg)
        # --fastrouter-reuse-port: for router processes 2..N, a copy of `listeners` each
        self.per_process: List[list] = []
        self.datagram: list = []        # --fastrouter-subscription-server
        self.shared: list = []          # --shared-socket, --undeferred-shared-socket, in order
        self.app: list = []             # --socket and --zerg (the local app's)
        self.stats: Optional[Listener] = None       # --fastrouter-stats
        self.metrics: Optional[Listener] = None     # --fastrouter-metrics
        self.zerg_server: Optional[Listener] = None  # --zerg-server

    # ------------------------------------------------------------ binding

    @classmethod
    def bind(cls, cfg, chmod: Optional[int]) -> "Bindings":
        """Bind everything *cfg* asks for (*chmod*: the checked ``--chmod-socket`` mode).
        A failure closes what was bound and is a :class:`StartupError` naming the option."""
        self = cls()
        binder = _Binder(cfg, chmod, self)
        try:
            binder.bind_all()
        except AddressError as exc:
            self.close_all()
            raise StartupError('option "--%s": %s' % (binder.option, exc))
        return self

    def _own(self, item):
        self.owned.append(item)
        return item

    # ------------------------------------------------------ across a re-exec

    @classmethod
    def adopt(cls, state: dict) -> "Bindings":
        """Rebuild the record from the descriptors a previous image left open."""
        self = cls()
        for kind, name, fd, unix_path in state["sockets"]:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            os.set_inheritable(fd, False)
            self.owned.append((DatagramListener if kind == "dgram" else Listener)(sock, name, unix_path))
        pick = lambda key: [self.owned[i] for i in state.get(key, [])]
        one = lambda key: (pick(key) or [None])[0]
        self.listeners = pick("listeners")
        self.per_process = [[self.owned[i] for i in group] for group in state.get("per_process", [])]
        self.datagram = pick("datagram")
        self.shared = pick("shared")
        self.app = pick("app")
        self.stats = one("stats")
        self.metrics = one("metrics")
        self.zerg_server = one("zerg")
        return self

    def inheritable_state(self) -> dict:
        """Descriptor numbers for the next image; close-on-exec is cleared on them."""
        index = {id(item): i for i, item in enumerate(self.owned)}
        sockets = []
        for item in self.owned:
            fd = item.sock.fileno()
            os.set_inheritable(fd, True)
            kind = "dgram" if item.sock.type == socket.SOCK_DGRAM else "stream"
            sockets.append([kind, item.name, fd, item.unix_path])
        refs = lambda items: [index[id(item)] for item in items if id(item) in index]
        maybe = lambda item: [item] if item is not None else []
        return {"sockets": sockets, "listeners": refs(self.listeners),
                "per_process": [refs(group) for group in self.per_process],
                "datagram": refs(self.datagram),
                "shared": refs(self.shared), "app": refs(self.app),
                "stats": refs(maybe(self.stats)), "metrics": refs(maybe(self.metrics)),
                "zerg": refs(maybe(self.zerg_server))}

    # ------------------------------------------- per-process listening sockets

    def for_process(self, index: int, processes: int) -> list:
        """The listeners router process *index* (1-based) of *processes* polls.

        Without per-process sockets, all of ``listeners`` (shared by every process).
        With them, group *index* (group 1 is ``listeners``).  After a reload whose
        configuration asks for another number of processes than the inherited groups
        serve, process *i* takes every group whose number is *i* modulo *processes*
        (more groups than processes: none is left unpolled), or group *i* modulo the
        number of groups (fewer): a queued connection is never stranded.
        """
        groups = [self.listeners] + self.per_process
        if len(groups) == 1 or processes < 1:
            return list(self.listeners)
        slot = (index - 1) % processes
        if len(groups) >= processes:
            return [item for number, group in enumerate(groups) if number % processes == slot
                    for item in group]
        return list(groups[slot % len(groups)])

    def keep_for_process(self, index: int, processes: int) -> None:
        """In a forked router process: poll this process's listeners, and close this
        process's copies of the other processes' (the master keeps them open)."""
        mine = self.for_process(index, processes)
        kept = {id(item) for item in mine}
        for group in [self.listeners] + self.per_process:
            for item in group:
                if id(item) not in kept:
                    item.sock.close()
        self.listeners = mine
        self.per_process = []

    # -------------------------------------------------------------- closing

    def master_only(self) -> list:
        """The sockets only the master serves: a forked child closes them."""
        return self.datagram + [item for item in (self.stats, self.zerg_server, self.metrics)
                                if item is not None]

    def close_master_only(self) -> None:
        """In a child: the master's own sockets are not the child's business."""
        for item in self.master_only():
            try:
                item.sock.close()
            except OSError:
                pass

    def close_all(self, unlink: bool = True) -> None:
        for item in self.owned:
            item.close(unlink=unlink)


class _Binder:
    """The binding steps of :meth:`Bindings.bind`; ``option`` names the one under way."""

    def __init__(self, cfg, chmod: Optional[int], bindings: Bindings) -> None:
        self.cfg = cfg
        self.chmod = chmod
        self.bound = bindings
        self.option = "shared-socket"

    def _listener(self, spec: str, deferred: bool = True, reuse_port: bool = False) -> Listener:
        cfg = self.cfg
        return bind_listener(spec, backlog=cfg.listen, chmod=self.chmod, abstract_all=cfg.abstract_socket,
                             defer_accept=cfg.socket_timeout if deferred else 0,
                             reuse_port=reuse_port or cfg.reuse_port)

    def _resolve(self, spec: str):
        """(listener, shared socket number or None): ``=N`` names a shared socket."""
        index = shared_socket_index(spec)   # "=N": atoi, as uWSGI
        if index is None:
            return self.bound._own(self._listener(spec)), None
        if index >= len(self.bound.shared):
            raise AddressError(spec, "unable to use shared socket %d" % index)
        return self.bound.shared[index], index

    def bind_all(self) -> None:
        self.shared()
        self.router()
        self.app()
        self.zergs()
        self.endpoints()

    def shared(self) -> None:
        cfg = self.cfg
        specs = [(spec, True) for spec in cfg.shared_socket] + \
            [(spec, False) for spec in cfg.undeferred_shared_socket]
        for number, (spec, deferred) in enumerate(specs):
            listener = self.bound._own(self._listener(spec, deferred))
            self.bound.shared.append(listener)
            log("uwsgi shared socket %d bound to %s address %s fd %d"
                % (number, _family(listener, spec), listener.name, listener.sock.fileno()))

    def router(self) -> None:
        self.option = "fastrouter"
        per_process = self.cfg.fastrouter_reuse_port
        for spec in self.cfg.fastrouter:
            if per_process:   # TCP only (validation.py): never "=N"
                listener = self.bound._own(self._listener(spec, reuse_port=True))
            else:
                listener, _index = self._resolve(spec)
            self.bound.listeners.append(listener)
            log("uWSGI fastrouter bound on %s fd %d" % (listener.name, listener.sock.fileno()))
        if per_process:
            self.per_process_copies()

    def per_process_copies(self) -> None:
        """--fastrouter-reuse-port: the listeners once more for each router process
        after the first, on the very address each is bound to."""
        cfg = self.cfg
        self.option = "fastrouter-reuse-port"
        for number in range(2, cfg.fastrouter_processes + 1):
            group = []
            for listener in self.bound.listeners:
                copy = self.bound._own(bind_sibling(listener, backlog=cfg.listen,
                                                    defer_accept=cfg.socket_timeout))
                group.append(copy)
                log("uWSGI fastrouter %d has its own socket on %s fd %d (SO_REUSEPORT)"
                    % (number, copy.name, copy.sock.fileno()))
            self.bound.per_process.append(group)

    def app(self) -> None:
        self.option = "socket"
        for number, spec in enumerate(self.cfg.socket):
            listener, index = self._resolve(spec)
            self.bound.app.append(listener)
            if index is None:
                log("uwsgi socket %d bound to %s address %s fd %d"
                    % (number, _family(listener, spec), listener.name, listener.sock.fileno()))
            else:
                log("uwsgi socket %d mapped to shared socket %d (%s) fd %d"
                    % (number, index, listener.name, listener.sock.fileno()))

    def zergs(self) -> None:
        cfg = self.cfg
        self.option = "zerg"
        for path in cfg.zerg:
            try:
                lent = zerg.attach(path)
            except zerg.ZergError as exc:
                if cfg.zerg_fallback:
                    log("%s: going on with this instance's own sockets (--zerg-fallback)" % exc)
                    continue
                raise AddressError(path, str(exc))
            for listener in lent:
                self.bound.app.append(self.bound._own(listener))
                log("uwsgi socket %d attached from the zerg server %s: %s fd %d"
                    % (len(self.bound.app) - 1, path, listener.name, listener.sock.fileno()))
        if cfg.fastrouter_zerg:
            self.option = "fastrouter-zerg"
            try:
                lent = zerg.attach(cfg.fastrouter_zerg)
            except zerg.ZergError as exc:
                raise AddressError(cfg.fastrouter_zerg, str(exc))
            for listener in lent:
                self.bound.listeners.append(self.bound._own(listener))
                log("uWSGI fastrouter bound on %s fd %d (from the zerg server %s)"
                    % (listener.name, listener.sock.fileno(), cfg.fastrouter_zerg))

    def endpoints(self) -> None:
        cfg = self.cfg
        bound = self.bound
        if cfg.zerg_server:
            self.option = "zerg-server"
            bound.zerg_server = bound._own(bind_stream_server(cfg.zerg_server, backlog=cfg.listen))
            log("*** zerg server enabled on %s ***" % bound.zerg_server.name)
        self.option = "fastrouter-subscription-server"
        for spec in cfg.fastrouter_subscription_server:
            listener = bound._own(bind_datagram(spec, credentials=cfg.subscriptions_use_credentials))
            bound.datagram.append(listener)
            log("uWSGI fastrouter subscription server bound on %s fd %d"
                % (listener.name, listener.sock.fileno()))
        if cfg.fastrouter_stats:
            self.option = "fastrouter-stats"
            bound.stats = bound._own(bind_stream_server(cfg.fastrouter_stats, backlog=cfg.listen))
            log("*** fastrouter stats server enabled on %s fd: %d ***"
                % (bound.stats.name, bound.stats.sock.fileno()))
        if cfg.fastrouter_metrics:
            self.option = "fastrouter-metrics"
            bound.metrics = bound._own(bind_stream_server(cfg.fastrouter_metrics, backlog=cfg.listen))
            log("*** fastrouter metrics server enabled on %s fd: %d ***"
                % (bound.metrics.name, bound.metrics.sock.fileno()))


def _family(listener, spec: str) -> str:
    return "UNIX" if listener.unix_path or spec.startswith("@") else "TCP"

