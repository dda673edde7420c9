#!/usr/bin/env python3
"""Run every fuzz target for a bounded time and summarise.

    python3 fuzz/run.py [SECONDS] [--target NAME]... [--fallback] [--python PY]

SECONDS (default 60) is per target.  Each target starts from its checked-in seed
corpus (fuzz/corpus/NAME, written by fuzz/make_corpus.py) and keeps what it
learns in fuzz/work/NAME; a crash lands in fuzz/crashes/ and makes the exit
status 1.  The targets run under PY (default: this interpreter), which needs
atheris for coverage-guided fuzzing; without it they run in the plain-Python
fallback mode (see fuzz/harness.py).  Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: target name -> (script, largest input libFuzzer may build)
TARGETS = {
    "request_head": ("fuzz_request_head.py", 4096),
    "subscription": ("fuzz_subscription.py", 8192),
}


def run_target(name: str, seconds: int, python: str, fallback: bool) -> dict:
    script, max_len = TARGETS[name]
    seeds = os.path.join(HERE, "corpus", name)
    work = os.path.join(HERE, "work", name)
    crashes = os.path.join(HERE, "crashes")
    os.makedirs(work, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    if not os.listdir(seeds):
        raise SystemExit("no seed corpus in %s: run fuzz/make_corpus.py" % seeds)
    command = [python, os.path.join(HERE, script), "-max_total_time=%d" % seconds,
               "-max_len=%d" % max_len, "-timeout=10",
               "-artifact_prefix=%s/%s-" % (crashes, name), work, seeds]
    if fallback:
        command.append("--fallback")
    print("== %s: %s" % (name, " ".join(command)), flush=True)
    started = time.monotonic()
    proc = subprocess.run(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace")
    elapsed = time.monotonic() - started
    output = proc.stdout
    # "Done N runs" ends a run that did not crash; otherwise the last "#N" status line
    runs = re.findall(r"Done (\d+) runs in", output) or re.findall(r"^#(\d+)\s", output, re.M)
    corpus = re.findall(r"corp: (\d+)/", output)
    coverage = re.findall(r"\bcov: (\d+)", output)
    crash = re.findall(r"(?:Test unit written to|input written to) (\S+)", output)
    if proc.returncode != 0:
        print(output[-6000:], flush=True)
    return {"name": name, "status": proc.returncode, "runs": int(runs[-1]) if runs else None,
            "seconds": elapsed, "corpus": int(corpus[-1]) if corpus else None,
            "coverage": int(coverage[-1]) if coverage else None,
            "crash": crash[-1] if crash else None,
            "mode": "fallback" if "fallback mode" in output else "atheris"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seconds", nargs="?", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="run only this target (repeatable)")
    parser.add_argument("--fallback", action="store_true", help="plain-Python mode even with atheris")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the targets")
    args = parser.parse_args(argv)
    results = [run_target(name, args.seconds, args.python, args.fallback)
               for name in (args.target or sorted(TARGETS))]
    print()
    print("%-14s %-9s %12s %9s %8s %8s  %s" % ("target", "mode", "executions", "exec/s",
                                              "corpus", "cov", "result"))
    for r in results:
        rate = r["runs"] / r["seconds"] if r["runs"] and r["seconds"] else 0
        result = "crash: %s" % r["crash"] if r["crash"] else (
            "ok" if r["status"] == 0 else "exit status %d" % r["status"])
        print("%-14s %-9s %12s %9.0f %8s %8s  %s" % (
            r["name"], r["mode"], r["runs"] if r["runs"] is not None else "?", rate,
            r["corpus"] if r["corpus"] is not None else "-",
            r["coverage"] if r["coverage"] is not None else "-", result))
    return 1 if any(r["status"] != 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
