#!/usr/bin/env python3
"""The least Python a bodyless uwsgi request can cost: a yardstick, not a router.

``bench/instructions.py --floor`` runs this instead of the router and counts its
instructions per request the same way.  It makes the router's system calls for a
bodyless TCP request (accept4, getsockname, recv, socket, connect, write, epoll_ctl,
2 epoll_wait, recv, send, 2 close) from the fewest bytecodes that can make them: one
``select.epoll`` loop, a dict of callbacks, no timers, no logging, no counters, no
error handling worth the name (a failed request just closes).  ``--scan`` also
validates the vars and picks the key with the router's own
``protocol.scan_request`` (the one piece of the router it runs), so the difference
between the two runs is the price of the strict vars walk.

What the router costs above this floor is what its features cost per request
(records, counters, timeouts, retries, balancing, access log hooks...), and what a
rewrite of the engine could at most win.

    python3 bench/floor_proxy.py --fastrouter 127.0.0.1:PORT --fastrouter-to HOST:PORT [--scan]
"""

from __future__ import annotations

import argparse
import select
import socket
import sys


def serve(listen: str, node: str, scan: bool) -> None:
    host, port = listen.rsplit(":", 1)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # as the router: accept() only once the request's first bytes are in
    lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 4)
    lsock.bind((host, int(port)))
    lsock.listen(1024)
    nhost, nport = node.rsplit(":", 1)
    node_addr = (nhost, int(nport))
    if scan:
        sys.path.insert(0, __file__.rsplit("/", 2)[0])
        from uwsgi_fastrouter.protocol import scan_request
    else:
        scan_request = None
    ep = select.epoll()
    poll = ep.poll
    register = ep.register
    callbacks = {}
    scratch = bytearray(65536)
    view = memoryview(scratch)
    new_socket = socket.socket
    family, kind, proto = lsock.family, lsock.type, lsock.proto
    nonblocking = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
    dontwait = socket.MSG_DONTWAIT
    accept = lsock._accept
    lfd = lsock.fileno()

    def on_accept(_event: int) -> None:
        fd, _addr = accept()
        client = new_socket(family, kind, proto, fd)
        try:
            n = client.recv_into(scratch, 65536, dontwait)
            if n < 4 or n < 4 + (scratch[1] | scratch[2] << 8):
                raise OSError("a partial head: not on the floor's path")
            if scan_request is not None and not scan_request(bytes(view[4:n])).key:
                raise OSError("no key")
            nsock = new_socket(socket.AF_INET, nonblocking)
            nsock.connect_ex(node_addr)
            nfd = nsock.fileno()
            nsock.send(view[:n])
        except OSError:
            client.close()
            return

        def on_node(_event: int) -> None:
            del callbacks[nfd]
            got = nsock.recv_into(scratch, 16384)
            client.send(view[:got], dontwait)
            nsock.close()
            client.close()

        callbacks[nfd] = on_node
        register(nfd, select.EPOLLIN)

    callbacks[lfd] = on_accept
    register(lfd, select.EPOLLIN)
    print("floor proxy on %s" % listen, flush=True)
    while True:
        for fd, event in poll():
            callbacks[fd](event)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fastrouter", required=True)
    parser.add_argument("--fastrouter-to", required=True)
    parser.add_argument("--listen", type=int, default=1024)
    parser.add_argument("--scan", action="store_true")
    args = parser.parse_args()
    try:
        serve(args.fastrouter, args.fastrouter_to, args.scan)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
