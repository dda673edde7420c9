"""Runs one fuzz target: coverage-guided with atheris when it is installed, else a
plain-Python random mutator over the same corpus.

Theory of operation
-------------------
A target is a module with ``test_one_input(data: bytes) -> None`` that raises only
when it finds a bug (an exception the code under test must never raise, or a
broken invariant as ``AssertionError``).  :func:`main` is the whole command line
of a target script:

* with atheris importable (and ``--fallback`` not given), the package is imported
  under ``atheris.instrument_imports()`` so libFuzzer sees Python line coverage,
  and every libFuzzer flag and corpus directory on the command line is passed on
  (``-max_total_time=60 -artifact_prefix=DIR/ WORK_DIR SEED_DIR``);
* otherwise the fallback loop mutates the seed files at random (bit flips, byte
  runs, 16-bit length fields set to edge values, splices) for ``-max_total_time``
  seconds.  It has no coverage feedback, so it is much weaker; it exists so the
  harness runs where atheris has no wheel.  It stops at the first crash, writes
  the input as ``<artifact_prefix>crash-<sha1>`` and exits 1, as libFuzzer does.

Either way, file arguments (not directories) are run once each: that is how a
crash file is reproduced.  Both modes end with a ``Done N runs in S second(s)``
line, which ``fuzz/run.py`` reads.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import struct
import sys
import time
import traceback
from typing import Callable, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

Target = Callable[[bytes], None]

_EDGE_U16 = (0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)


def _flag(argv: Sequence[str], name: str, default: str) -> str:
    prefix = "-" + name + "="
    for arg in argv:
        if arg.startswith(prefix):
            return arg[len(prefix):]
    return default


def load_target(module_name: str, instrument: bool) -> Target:
    """Import the target module (and through it the package), instrumented or not."""
    if instrument:
        import atheris

        with atheris.instrument_imports(include=["uwsgi_fastrouter"]):
            module = importlib.import_module(module_name)
    else:
        module = importlib.import_module(module_name)
    return module.test_one_input


def _read_files(paths: Sequence[str]) -> List[bytes]:
    out = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if os.path.isfile(full):
                    with open(full, "rb") as handle:
                        out.append(handle.read())
        elif os.path.isfile(path):
            with open(path, "rb") as handle:
                out.append(handle.read())
    return out


# ---------------------------------------------------------------------------
# the fallback mutator


def mutate(data: bytes, rng: random.Random, others: Sequence[bytes], max_len: int) -> bytes:
    """One to four random edits of *data*."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:                          # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:                        # set a byte
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:                                # insert a few bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:                                # delete a run
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 4 and len(buf) >= 2:              # a 16-bit length field gets an edge value
            i = rng.randrange(len(buf) - 1)
            value = rng.choice(_EDGE_U16 + (len(buf) - i, len(buf) - i - 2, len(buf) - i + 1))
            buf[i:i + 2] = struct.pack("<H", max(0, min(0xFFFF, value)))
        elif op == 5 and buf:                        # duplicate a run
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randint(1, 32)]
            buf[pos:pos] = chunk
        elif op == 6 and others:                     # splice with another input
            other = rng.choice(others)
            cut = rng.randint(0, len(other))
            buf = buf[:pos] + bytearray(other[cut:])
        elif op == 7:                                # truncate
            del buf[pos:]
    return bytes(buf[:max_len])


def _save_crash(data: bytes, prefix: str) -> str:
    path = "%scrash-%s" % (prefix, hashlib.sha1(data).hexdigest())
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def fallback(target: Target, argv: Sequence[str]) -> int:
    seconds = float(_flag(argv, "max_total_time", "60"))
    runs_limit = int(_flag(argv, "runs", "-1"))
    max_len = int(_flag(argv, "max_len", "4096"))
    prefix = _flag(argv, "artifact_prefix", "./")
    seed = int(_flag(argv, "seed", str(int(time.time()))))
    paths = [a for a in argv if not a.startswith("-")]
    files = [p for p in paths if os.path.isfile(p)]
    rng = random.Random(seed)
    corpus = _read_files(paths) or [b""]
    print("fallback mode (no atheris): random mutation, seed %d, %d input(s)" % (seed, len(corpus)),
          flush=True)
    started = time.monotonic()
    runs = 0
    if files:  # reproduce: run these inputs once each
        queue = iter(corpus)
    else:
        queue = None
    while True:
        if queue is not None:
            data = next(queue, None)
            if data is None:
                break
        else:
            if time.monotonic() - started >= seconds or runs == runs_limit:
                break
            data = mutate(rng.choice(corpus), rng, corpus, max_len) if runs >= len(corpus) \
                else corpus[runs]
        runs += 1
        try:
            target(data)
        except Exception:
            traceback.print_exc()
            print("==CRASH== input written to %s" % _save_crash(data, prefix), flush=True)
            print("Done %d runs in %d second(s)" % (runs, time.monotonic() - started), flush=True)
            return 1
    print("Done %d runs in %d second(s)" % (runs, time.monotonic() - started), flush=True)
    return 0


# ---------------------------------------------------------------------------


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main(module_name: str, argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    use_fallback = "--fallback" in argv or not atheris_available()
    argv = [a for a in argv if a != "--fallback"]
    if use_fallback:
        return fallback(load_target(module_name, instrument=False), argv[1:])
    import atheris

    atheris.Setup(argv, load_target(module_name, instrument=True))
    atheris.Fuzz()
    return 0
