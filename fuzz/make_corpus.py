#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets from valid packets.

    python3 fuzz/make_corpus.py        # (re)writes fuzz/corpus/request_head and fuzz/corpus/subscription

Every seed is a valid input in the target's layout (see the target's docstring):
requests as nginx and uWSGI send them, and subscription datagrams as uWSGI 2.0.31
instances build them.  The files are small and checked in; a run never writes here.
Files named ``crash-*`` are inputs that once crashed a target: they are kept.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from uwsgi_fastrouter.protocol import encode_packet  # noqa: E402
from uwsgi_fastrouter.subscription import build_announcement  # noqa: E402

NGINX_VARS = [
    (b"QUERY_STRING", b""), (b"REQUEST_METHOD", b"GET"), (b"CONTENT_TYPE", b""),
    (b"CONTENT_LENGTH", b""), (b"REQUEST_URI", b"/"), (b"PATH_INFO", b"/"),
    (b"DOCUMENT_ROOT", b"/srv"), (b"SERVER_PROTOCOL", b"HTTP/1.1"), (b"REQUEST_SCHEME", b"http"),
    (b"REMOTE_ADDR", b"10.0.0.1"), (b"REMOTE_PORT", b"51234"), (b"SERVER_PORT", b"80"),
    (b"SERVER_NAME", b"example.com"), (b"HTTP_HOST", b"example.com"),
    (b"HTTP_USER_AGENT", b"curl/8.0"), (b"HTTP_ACCEPT", b"*/*"),
]


def requests():
    """(name, split prefix, stream) for the request head target."""
    whole = b"\x00\x00"           # no split, the default limit
    yield "example", whole, encode_packet([(b"HTTP_HOST", b"example.com"), (b"PATH_INFO", b"/")])
    yield "nginx-get", whole, encode_packet(NGINX_VARS)
    post = [(k, b"11" if k == b"CONTENT_LENGTH" else b"POST" if k == b"REQUEST_METHOD" else v)
            for k, v in NGINX_VARS]
    yield "nginx-post-split", b"\x03\x02\x01\x10\x00", encode_packet(post) + b"hello world"
    yield "chunked", whole, encode_packet([(b"HTTP_HOST", b"h"), (b"HTTP_TRANSFER_ENCODING",
                                                                   b"chunked")]) + b"5\r\nhello\r\n0\r\n\r\n"
    yield "key-precedence", b"\x01\x07\x00", encode_packet([
        (b"SERVER_NAME", b"s"), (b"HTTP_HOST", b""), (b"UWSGI_FASTROUTER_KEY", b"k" * 256),
        (b"HTTP_HOST", b"h" * 255), (b"UWSGI_FASTROUTER_KEY", b"key")])
    yield "ping-empty-vars", whole, encode_packet([], modifier1=100)
    yield "small-limit", b"\x00\x03", encode_packet([(b"HTTP_HOST", b"example.com")] * 4)
    yield "duplicates", b"\x02\x01\x01\x00", encode_packet([
        (b"CONTENT_LENGTH", b"5"), (b"CONTENT_LENGTH", b"0007"), (b"REMOTE_ADDR", b"::1"),
        (b"REMOTE_ADDR", b""), (b"X", b"")]) + b"1234567"


def framed(*packets: bytes) -> bytes:
    return b"".join(struct.pack("<H", len(p)) + p for p in packets)


def subscriptions():
    """(name, input) for the subscription target: u16-framed datagrams."""
    example = build_announcement(b"example.com", b"127.0.0.1:3031", cores=1)
    yield "example", framed(example)
    yield "subscribe-unsubscribe", framed(
        example, build_announcement(b"example.com", b"127.0.0.1:3031", cores=1, unsubscribe=True))
    yield "every-field", framed(build_announcement(
        b"unbit.it:8000", b"/run/app/x.sock", modifier1=5, modifier2=255, cores=8, load=3, weight=12,
        sni_key=b"/k.pem", sni_crt=b"/c.pem", sni_ca=b"/ca.pem", notify=b"/run/n.sock",
        unix=1_700_000_000, signer=lambda data: b"good"))
    yield "forwarded", framed(build_announcement(b"k", b"@abstract", forwarded=True, weight=3))
    yield "two-keys-three-nodes", framed(*(
        build_announcement(key, b"127.0.0.1:%d" % port, weight=port % 3)
        for key in (b"a.example", b"b.example") for port in (3031, 3032, 3033)))
    # the first datagram filled to 40 bytes short of the limit (see the target's layout)
    full = build_announcement(b"big.example", b"127.0.0.1:3031", cores=1)
    yield "filled-to-the-limit", struct.pack("<H", 0x8000 | len(full)) + full + b"\x28"
    yield "signed-bad", framed(build_announcement(b"k", b"a:1", unix=1_700_000_001,
                                                  signer=lambda data: b"bad"))


def write(directory: str, name: str, data: bytes) -> None:
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:12]
    with open(os.path.join(directory, "%s-%s" % (name, digest)), "wb") as handle:
        handle.write(data)


def main() -> int:
    for sub in ("request_head", "subscription"):
        directory = os.path.join(HERE, "corpus", sub)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if not name.startswith("crash-"):  # crash inputs found by a run stay
                    os.unlink(os.path.join(directory, name))
    for name, prefix, stream in requests():
        write(os.path.join(HERE, "corpus", "request_head"), name, prefix + stream)
    for name, data in subscriptions():
        write(os.path.join(HERE, "corpus", "subscription"), name, data)
    print("seed corpora written under %s" % os.path.join(HERE, "corpus"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
