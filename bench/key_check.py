#!/usr/bin/env python3
"""What the file-name check of a key costs use-pattern and use-base (docs/decisions.md D14).

Usage::

    python3 bench/key_check.py [--number 1000000] [--repeat 7]

Times one mapper call for a plain key (``www.example.com``) with the check
(``PatternMapper``/``BaseMapper`` as the router builds them) and without it (the
same mappers built with ``check_keys=False``, which is what a forced key gets),
and the check alone next to the other ways it could be written.  Prints the best
of ``--repeat`` runs in nanoseconds per call; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uwsgi_fastrouter.router import BaseMapper, PatternMapper, key_is_file_name  # noqa: E402

KEY = b"www.example.com"
_SEARCH = re.compile(rb"[\x00-\x1f/\x7f]").search
_DELETE = bytes(range(0x20)) + b"/\x7f"


def _search(key: bytes) -> bool:
    return _SEARCH(key) is None and key != b"." and key != b".."


def _translate(key: bytes) -> bool:
    return len(key.translate(None, _DELETE)) == len(key) and key != b"." and key != b".."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    cases = [
        ("use-pattern, checked", PatternMapper("/srv/sockets/%s/uwsgi.sock")),
        ("use-pattern, unchecked", PatternMapper("/srv/sockets/%s/uwsgi.sock", check_keys=False)),
        ("use-base, checked", BaseMapper("/srv/sockets/")),
        ("use-base, unchecked", BaseMapper("/srv/sockets/", check_keys=False)),
        ("key_is_file_name()", key_is_file_name),
        ("check alone: one regex search", _search),
        ("check alone: bytes.translate delete", _translate),
        ("empty function (call overhead)", lambda key: True),
    ]
    print("key %r, best of %d x %d calls" % (KEY, args.repeat, args.number))
    for name, call in cases:
        best = min(timeit.repeat(lambda: call(KEY), number=args.number, repeat=args.repeat))
        print("%-40s %7.1f ns" % (name, best / args.number * 1e9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
